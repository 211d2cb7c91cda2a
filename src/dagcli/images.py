"""Image grids and small image utilities (PIL only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw


def make_grid(images: Sequence[Image.Image], cols: int | None = None, pad: int = 2, upscale: int = 1,
              label: str | None = None) -> Image.Image:
    """Tile images row by row on a white background; `upscale` enlarges tiny images (nearest neighbour);
    `label` (the prompt) is written above them, wrapped to the grid's width."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or min(len(images), 8)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    w, h = w * upscale, h * upscale
    width = cols * (w + pad) + pad
    lines = label_lines(label, width - 2 * pad) if label else []
    top = LINE_HEIGHT * len(lines) + (pad if lines else 0)
    grid = Image.new("RGB", (width, top + rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for n, line in enumerate(lines):
        draw.text((pad, pad + n * LINE_HEIGHT), line, fill="black")
    for i, img in enumerate(images):
        img = img.convert("RGB")
        if upscale != 1:
            img = img.resize((w, h), Image.NEAREST)
        r, c = divmod(i, cols)
        grid.paste(img, (pad + c * (w + pad), top + pad + r * (h + pad)))
    return grid


LINE_HEIGHT = 12  # pixels per line of a grid's label (PIL's default font)


def label_lines(text: str, width: int) -> list[str]:
    """`text` wrapped at spaces into lines at most `width` pixels wide in PIL's default font (a word wider
    than that is its own line)."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def labelled_rows(rows: Sequence[tuple[str, Sequence[Image.Image]]], upscale: int = 1, label_width: int = 220) -> Image.Image:
    """One row of images per label, the label written at the left, wrapped to `label_width` pixels (for
    prompt-by-prompt comparison grids)."""
    grids = [make_grid(images, cols=len(images), upscale=upscale) for _, images in rows]
    labels = [label_lines(label, label_width - 8) for label, _ in rows]
    heights = [max(g.height, LINE_HEIGHT * len(lines) + 4) for g, lines in zip(grids, labels, strict=True)]
    width = label_width + max(g.width for g in grids)
    out = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(out)
    y = 0
    for g, lines, height in zip(grids, labels, heights, strict=True):
        out.paste(g, (label_width, y))
        top = y + (height - LINE_HEIGHT * len(lines)) // 2
        for n, line in enumerate(lines):
            draw.text((4, top + n * LINE_HEIGHT), line, fill="black")
        y += height
    return out
