"""Image grids and small image utilities (PIL only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw


def make_grid(images: Sequence[Image.Image], cols: int | None = None, pad: int = 2, upscale: int = 1) -> Image.Image:
    """Tile images row by row on a white background; `upscale` enlarges tiny images (nearest neighbour)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or min(len(images), 8)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    w, h = w * upscale, h * upscale
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, img in enumerate(images):
        img = img.convert("RGB")
        if upscale != 1:
            img = img.resize((w, h), Image.NEAREST)
        r, c = divmod(i, cols)
        grid.paste(img, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def labelled_rows(rows: Sequence[tuple[str, Sequence[Image.Image]]], upscale: int = 1, label_width: int = 220) -> Image.Image:
    """One row of images per label, the label written at the left (for prompt-by-prompt comparison grids)."""
    grids = [make_grid(images, cols=len(images), upscale=upscale) for _, images in rows]
    width = label_width + max(g.width for g in grids)
    out = Image.new("RGB", (width, sum(g.height for g in grids)), "white")
    draw = ImageDraw.Draw(out)
    y = 0
    for (label, _), g in zip(rows, grids, strict=True):
        out.paste(g, (label_width, y))
        draw.text((4, y + g.height // 2 - 6), label[:40], fill="black")
        y += g.height
    return out
