"""What every reward shares: the result type, the callable protocol, and image conversions.

Images enter a reward as a float tensor `[B, 3, H, W]` in [0, 1] on any device and in any dtype; a reward
converts them itself and returns a `RewardOutput` whose tensors are float32 `[B]` on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from dagcli.errors import DagError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class RewardOutput:
    """The scores of one batch."""

    scores: torch.Tensor  # [B] float32 on CPU: the total (weighted sum for a spec with several rewards)
    components: dict[str, torch.Tensor]  # name -> [B] float32, each reward's own (unweighted) scores
    info: dict = field(default_factory=dict)  # optional extra per-batch information


@runtime_checkable
class Reward(Protocol):
    """A picklable callable that scores a batch of images for their prompts."""

    name: str
    slow: bool  # expensive enough that the trainer should overlap it with sampling in a thread

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> RewardOutput: ...


@dataclass(frozen=True)
class RewardInfo:
    """One row of `dag rewards`."""

    name: str
    description: str  # one line
    unit: str  # what the numbers mean, e.g. "-kB" or "cosine x scale"
    needs: str  # model ids, files or extras the reward needs
    differentiable: bool = False  # gradients flow from the score back to the images


def single_output(name: str, scores: torch.Tensor, info: dict | None = None) -> RewardOutput:
    """The output of a reward with one component: float32 CPU scores, `{name: scores}`."""
    scores = scores.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    return RewardOutput(scores=scores, components={name: scores}, info=dict(info or {}))


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Raise a DagError unless `images` is a float tensor `[B, 3, H, W]`; return it unchanged."""
    if not isinstance(images, torch.Tensor):
        raise DagError(f"rewards take a tensor of images, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise DagError(f"rewards take images shaped [B, 3, H, W], got {list(images.shape)}")
    if not images.is_floating_point():
        raise DagError(f"rewards take float images in [0, 1], got dtype {images.dtype}")
    return images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] floats in [0, 1] -> uint8 CPU tensor, as `(x * 255).round().clamp(0, 255)` in float32."""
    x = check_images(images).detach().to(device="cpu", dtype=torch.float32)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def to_hwc_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] floats in [0, 1] -> a list of uint8 `[H, W, 3]` arrays (what PIL and processors take)."""
    return list(to_uint8(images).permute(0, 2, 3, 1).numpy())


def images_from_pil(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float32 tensor [B, 3, H, W] in [0, 1]."""
    if not images:
        raise DagError("no images given")
    arrays = [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) != 1:
        raise DagError(f"images must share one size to be scored together, got sizes {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _read_prompts(folder: Path) -> dict[str, str]:
    """file name -> prompt, from `samples.jsonl` in the folder (empty when there is none)."""
    from dagcli.generate import read_manifest

    return {name: str(record.get("prompt", "")) for name, record in read_manifest(folder).items()}


def load_image_folder(directory: str | Path) -> tuple[torch.Tensor, list[str]]:
    """Every image of a folder (sorted by name) as [N, 3, H, W] in [0, 1], with prompts from samples.jsonl.

    A `samples.jsonl` line with `file` and `prompt` fields gives that file's prompt; images it does not list
    get the empty prompt.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise DagError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DagError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
    prompts = _read_prompts(folder)
    pil = []
    for f in files:
        with Image.open(f) as img:
            pil.append(img.convert("RGB"))
    return images_from_pil(pil), [prompts.get(f.name, "") for f in files]


def check_prompts(prompts: Sequence[str], batch: int) -> list[str]:
    """The prompts as a list of strings, one per image."""
    prompts = list(prompts)
    if len(prompts) != batch:
        raise DagError(f"got {batch} images but {len(prompts)} prompts; give one prompt per image")
    return [str(p) for p in prompts]


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering range(n) in chunks of at most `batch_size`."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'float16' / torch.bfloat16 ... -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise DagError(f"unknown dtype {dtype!r}; valid options: {', '.join(DTYPES)}")
    return DTYPES[key]


def parse_device(device: str | torch.device) -> torch.device:
    """'cpu' / 'cuda' / 'cuda:1' / 'auto' -> torch.device ('auto' is cuda when available)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DagError(f"unknown device {device!r}; valid options: auto, cpu, cuda, cuda:N") from e


def positive_int(name: str, value: object) -> int:
    """An option that must be a positive integer (strings from the command line accepted)."""
    try:
        number = int(str(value))
    except ValueError as e:
        raise DagError(f"option {name} must be a positive integer, got {value!r}") from e
    if number <= 0:
        raise DagError(f"option {name} must be a positive integer, got {value!r}")
    return number


def as_float(name: str, value: object) -> float:
    """An option that must be a number (strings from the command line accepted)."""
    try:
        return float(str(value))
    except ValueError as e:
        raise DagError(f"option {name} must be a number, got {value!r}") from e
