"""JPEG file size rewards: how (in)compressible an image is.

Each image is converted to uint8 as `(x * 255).round().clamp(0, 255)`, saved by PIL as JPEG at quality 95
(PIL's default settings otherwise), and its size counted in kB (bytes / 1000).
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from dagcli.errors import DagError
from dagcli.rewards.base import RewardOutput, positive_int, single_output, to_hwc_arrays
from dagcli.rewards.registry import register_reward

JPEG_QUALITY = 95


def jpeg_sizes_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> torch.Tensor:
    """[B] float32: the size in kB of each image saved as JPEG at `quality`."""
    sizes = []
    for array in to_hwc_arrays(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegSize:
    """`sign * size_kB`: +1 for incompressibility, -1 for compressibility."""

    slow = False

    def __init__(self, name: str, sign: float, quality: int = JPEG_QUALITY):
        self.name = name
        self.sign = sign
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        return single_output(self.name, self.sign * jpeg_sizes_kb(images, self.quality))


def _quality(quality: object) -> int:
    """The JPEG quality option, 1..100."""
    value = positive_int("quality", quality)
    if value > 100:
        raise DagError(f"option quality must be in 1..100, got {quality!r}")
    return value


@register_reward(
    "compressibility",
    description="minus the JPEG size (PIL, quality 95): smaller files score higher",
    unit="-kB (bytes/1000)",
    needs="-",
)
def compressibility(quality: int = JPEG_QUALITY) -> JpegSize:
    """Minus the JPEG size in kB."""
    return JpegSize("compressibility", -1.0, _quality(quality))


@register_reward(
    "incompressibility",
    description="the JPEG size (PIL, quality 95): larger files score higher",
    unit="kB (bytes/1000)",
    needs="-",
)
def incompressibility(quality: int = JPEG_QUALITY) -> JpegSize:
    """The JPEG size in kB."""
    return JpegSize("incompressibility", 1.0, _quality(quality))
