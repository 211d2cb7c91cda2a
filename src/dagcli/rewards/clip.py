"""CLIP models as reward backbones, and the `clip` prompt-alignment reward.

`ClipEncoder` turns images (uint8, through the model's own image processor: bicubic resize of the short
side, centre crop, CLIP mean/std) and prompts into projected embeddings. `aesthetic` and `pickscore` build
on it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dagcli.errors import DagError
from dagcli.rewards.base import (
    RewardOutput,
    as_float,
    batches,
    check_prompts,
    parse_device,
    parse_dtype,
    positive_int,
    single_output,
    to_hwc_arrays,
)
from dagcli.rewards.loading import load_pretrained, reward_option
from dagcli.rewards.registry import register_reward

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_BATCH_SIZE = 32


def _projected(out: object) -> torch.Tensor:
    """Projected features from `get_*_features` (a tensor in older transformers, an output object in newer)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEncoder:
    """A CLIP model with its image processor (and tokenizer) on one device, in one dtype, in eval mode."""

    def __init__(self, model, image_processor, tokenizer, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype

    @property
    def projection_dim(self) -> int:
        """Size of the embeddings."""
        return int(self.model.config.projection_dim)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] floats in [0, 1] -> processed pixels on the device (images go through uint8 first)."""
        pixels = self.image_processor(images=to_hwc_arrays(images), return_tensors="pt")["pixel_values"]
        return pixels.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, D] projected image embeddings (not normalised), on the device."""
        return _projected(self.model.get_image_features(pixel_values=self.pixel_values(images)))

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """[B, D] projected text embeddings (not normalised), on the device; long prompts are truncated."""
        if self.tokenizer is None:
            raise DagError("this CLIP encoder was loaded without a tokenizer")
        max_len = min(int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _projected(self.model.get_text_features(**tokens))


def load_clip(
    model_id: str | Path,
    *,
    processor_id: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    text: bool = True,
    what: str = "CLIP model",
    fix: str | None = None,
    processor_fix: str | None = None,
) -> ClipEncoder:
    """Load a `CLIPModel` and its image processor (and tokenizer when `text`).

    `what` names the model in errors; `fix` (and `processor_fix` for a separate `processor_id`) is the
    option that passes a local folder instead (see `rewards.loading.reward_option`).
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    device, dtype = parse_device(device), parse_dtype(dtype)
    processor_id, processor_fix = (processor_id, processor_fix or fix) if processor_id else (model_id, fix)
    model = load_pretrained(CLIPModel.from_pretrained, model_id, what, fix)
    image_processor = load_pretrained(
        AutoImageProcessor.from_pretrained, processor_id, f"{what} image processor", processor_fix
    )
    tokenizer = None
    if text:
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, processor_id, f"{what} tokenizer", processor_fix)
    return ClipEncoder(model, image_processor, tokenizer, device, dtype)


def model_clip(base_model: str | None) -> Path | None:
    """The CLIP a named model registers as its judge (`NamedModel.embed_model`), else None."""
    from dagcli.extensions import named_model

    named = named_model(base_model)
    return named.embed_model if named is not None else None


def installed_clip(folder: Path, label: str) -> Path:
    """`folder` when it holds a CLIP model, or a DagError saying it is not installed."""
    if not (folder / "config.json").is_file():
        raise DagError(
            f"{label} is not installed (expected {str(folder)!r}); "
            "pass a CLIP folder or hub id as the clip option model_id"
        )
    return folder


def default_clip_id(base_model: str | None) -> str | Path:
    """The CLIP model used when none is given: the one the base model registers (the built-in models' small
    CLIP), else ViT-L/14."""
    folder = model_clip(base_model)
    return DEFAULT_CLIP if folder is None else installed_clip(folder, f"the CLIP model of {base_model!r}")


class ClipScore:
    """`scale * cos(image embedding, prompt embedding)` for each (image, prompt) pair."""

    name = "clip"
    slow = True

    def __init__(self, encoder: ClipEncoder, scale: float, batch_size: int):
        self.encoder = encoder
        self.scale = scale
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        prompts = check_prompts(prompts, len(images))
        out = []
        for part in batches(len(images), self.batch_size):
            img = torch.nn.functional.normalize(self.encoder.embed_images(images[part]).float(), dim=-1)
            txt = torch.nn.functional.normalize(self.encoder.embed_texts(prompts[part]).float(), dim=-1)
            out.append((img * txt).sum(dim=-1).cpu())
        return single_output(self.name, self.scale * torch.cat(out))


@register_reward(
    "clip",
    description="CLIP image-prompt cosine similarity (raw cosine, times `scale`; no clipping at 0)",
    unit="scale x cos, in [-scale, scale] (default scale 1)",
    needs=f"{DEFAULT_CLIP} (the base model's own CLIP where it has one, as the built-in ones); options model_id, scale",
)
def clip(
    model_id: str | None = None,
    scale: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "fp32",
    device: str = "cpu",
    base_model: str | None = None,
) -> ClipScore:
    """CLIP score; `model_id` is a local folder or hub id (default depends on `base_model`)."""
    encoder = load_clip(
        model_id or default_clip_id(base_model), device=device, dtype=dtype, fix=reward_option("clip", "model_id")
    )
    return ClipScore(encoder, as_float("scale", scale), positive_int("batch_size", batch_size))
