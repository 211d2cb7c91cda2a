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


@dataclass(frozen=True)
class ImageFolder:
    """The images of a folder, one size, each with its file, prompt and `samples.jsonl` record."""

    files: list[Path]
    images: list  # PIL RGB images
    prompts: list[str]
    records: list[dict]  # each file's samples.jsonl line ({} without a manifest)

    def tensor(self) -> torch.Tensor:
        """[N, 3, H, W] float32 in [0, 1]."""
        return images_from_pil(self.images)


def is_grid_file(path: Path) -> bool:
    """The per-prompt overview `dag sample` writes beside the images (`grid-*.png`), not a sample."""
    return path.name.startswith("grid-") and path.suffix.lower() == ".png"


def image_files(folder: Path, records: dict[str, dict]) -> list[Path]:
    """The files `records` (a samples.jsonl) lists, in its order, else every image file but grids, by name."""
    if records:
        return [folder / name for name in records if (folder / name).is_file()]
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not is_grid_file(p)
    )


def read_image_folder(directory: str | Path, prompt: str = "") -> ImageFolder:
    """A folder of images as `dag sample` writes it, for `dag rewards --score` and `dag eval --images`.

    With a `samples.jsonl`, the images it lists (in its order, with its prompts); without one, every image
    file but the `grid-*.png` overviews, sorted by name, all with `prompt`. They must share one size.
    """
    from dagcli.generate import read_manifest

    folder = Path(directory)
    if not folder.is_dir():
        raise DagError(f"image folder {str(folder)!r} does not exist")
    records = read_manifest(folder)
    files = image_files(folder, records)
    if not files:
        listed = f"of the {len(records)} listed in samples.jsonl " if records else ""
        raise DagError(f"no images ({', '.join(IMAGE_SUFFIXES)}) {listed}in {str(folder)!r}")
    images = [_open_rgb(f) for f in files]
    for f, img in zip(files, images, strict=True):
        if img.size != images[0].size:
            raise DagError(
                f"images of {str(folder)!r} differ in size: {files[0].name} is {_size(images[0])} but "
                f"{f.name} is {_size(img)}; score images of one size together"
            )
    found = [records.get(f.name, {}) for f in files]
    return ImageFolder(files, images, [str(r.get("prompt", prompt)) for r in found], found)


def _open_rgb(path: Path) -> Image.Image:
    """An image file as a loaded RGB PIL image; an unreadable file is a DagError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as e:
        raise DagError(f"cannot read image {str(path)!r} ({e})") from e


def _size(img: Image.Image) -> str:
    return f"{img.width}x{img.height}"


def load_image_folder(directory: str | Path) -> tuple[torch.Tensor, list[str]]:
    """The images of `read_image_folder` as [N, 3, H, W] in [0, 1], and their prompts."""
    found = read_image_folder(directory)
    return found.tensor(), found.prompts


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
