"""A deterministic, file-free data set of captioned 32x32 images of coloured shapes.

Every image shows one shape (circle, square or triangle) of one colour, small or large, somewhere on a plain
background. Captions are short templates ("a red circle", "a small blue square on a gray background"), so
the colour, shape, size and background can be parsed back out of a caption for evaluation.

A fixed set of colour x shape x background combinations is held out: no training image ever shows them, and
the prompt set `shapes-heldout` asks for exactly those combinations.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32  # output images are RESOLUTION x RESOLUTION RGB
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for clean anti-aliased edges

# Shape colours (name -> RGB). Kept far apart so a colour can be read back from pixels.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (245, 220, 30),
    "purple": (140, 50, 190),
    "orange": (250, 130, 10),
    "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (120, 120, 120),
    "white": (245, 245, 245),
    "brown": (105, 65, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Radius range (pixels at RESOLUTION) of each size class.
_SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (4.5, 6.5), "large": (9.0, 12.0)}

# (colour, shape, background) combinations that never appear in training images.
HELDOUT_COMBOS: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "gray"),
    ("green", "circle", "white"),
    ("blue", "square", "gray"),
    ("yellow", "triangle", "black"),
    ("purple", "square", "white"),
    ("orange", "circle", "black"),
    ("white", "triangle", "brown"),
    ("red", "square", "brown"),
    ("green", "triangle", "black"),
    ("blue", "circle", "brown"),
    ("yellow", "circle", "gray"),
    ("orange", "square", "gray"),
)
# Size word used by the held-out prompt of each combination (None: size not mentioned).
_HELDOUT_SIZE: tuple[str | None, ...] = (None, None, "small", None, "large", None, None, "large", "small", None,
                                         "large", None)

VOCABULARY: tuple[str, ...] = tuple(
    sorted({"a", "an", "on", "background", *COLOURS, *BACKGROUNDS, *SHAPES, *SIZES})
)


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to render one image. Positions and radius are in pixels of the 32x32 output."""

    colour: str
    shape: str
    background: str
    size: str  # "small" or "large"
    radius: float  # circumscribed radius of the shape
    cx: float  # centre x
    cy: float  # centre y


@dataclass(frozen=True)
class ParsedCaption:
    """The attributes a caption mentions; None where the caption does not say."""

    colour: str | None
    shape: str | None
    size: str | None = None
    background: str | None = None


def is_heldout(colour: str, shape: str, background: str) -> bool:
    """Whether this colour x shape x background combination is reserved for evaluation."""
    return (colour, shape, background) in HELDOUT_COMBOS


def _valid_combos(split: str) -> list[tuple[str, str, str]]:
    """All (colour, shape, background) triples of a split; the shape colour never equals the background."""
    if split == "heldout":
        return list(HELDOUT_COMBOS)
    if split != "train":
        raise ValueError(f"unknown split {split!r}; valid: train, heldout")
    return [
        (c, s, b)
        for c, s, b in itertools.product(COLOURS, SHAPES, BACKGROUNDS)
        if COLOURS[c] != BACKGROUNDS[b] and not is_heldout(c, s, b)
    ]


def _random_geometry(rng: np.random.Generator, size: str) -> tuple[float, float, float]:
    """(radius, cx, cy) for a shape of the given size class, fully inside the image with a 1 px margin."""
    lo, hi = _SIZE_RADIUS[size]
    radius = float(rng.uniform(lo, hi))
    margin = radius + 1.0
    cx = float(rng.uniform(margin, RESOLUTION - margin))
    cy = float(rng.uniform(margin, RESOLUTION - margin))
    return radius, cx, cy


def sample_specs(n: int, seed: int, split: str = "train") -> list[ShapeSpec]:
    """`n` random specs from a split ("train" or "heldout"); the same seed always gives the same specs."""
    combos = _valid_combos(split)
    rng = np.random.default_rng(seed)
    specs = []
    for _ in range(n):
        colour, shape, background = combos[int(rng.integers(len(combos)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        radius, cx, cy = _random_geometry(rng, size)
        specs.append(ShapeSpec(colour, shape, background, size, radius, cx, cy))
    return specs


def _polygon(spec: ShapeSpec, scale: float) -> list[tuple[float, float]] | None:
    """Vertices of the shape at `scale` x resolution, or None for a circle."""
    r, cx, cy = spec.radius * scale, spec.cx * scale, spec.cy * scale
    if spec.shape == "square":
        h = r / np.sqrt(2.0) * 1.15  # half side; slightly larger than inscribed so areas look alike
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if spec.shape == "triangle":
        # Upward equilateral triangle, centred on its centroid.
        return [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in np.deg2rad([90.0, 210.0, 330.0])]
    return None


def render(spec: ShapeSpec, fill: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw a spec as a RESOLUTION x RESOLUTION RGB image (deterministic); `fill` overrides the shape colour."""
    big = RESOLUTION * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(img)
    fill = COLOURS[spec.colour] if fill is None else fill
    poly = _polygon(spec, _SUPERSAMPLE)
    if poly is None:
        r, cx, cy = (v * _SUPERSAMPLE for v in (spec.radius * 0.92, spec.cx, spec.cy))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)
    return img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX)


def render_array(specs: list[ShapeSpec], fills: np.ndarray | None = None) -> np.ndarray:
    """Render many specs into a uint8 array of shape (N, 32, 32, 3); `fills` (N, 3) overrides shape colours."""
    if fills is None:
        return np.stack([np.asarray(render(s), dtype=np.uint8) for s in specs])
    return np.stack([np.asarray(render(s, tuple(int(v) for v in f)), dtype=np.uint8) for s, f in zip(specs, fills,
                                                                                                     strict=True)])


def caption(spec: ShapeSpec, mention_size: bool = True, mention_background: bool = True) -> str:
    """The caption of a spec, e.g. "a small red circle on a gray background"."""
    words = []
    if mention_size:
        words.append(spec.size)
    words += [spec.colour, spec.shape]
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    if mention_background:
        words += ["on", "a", spec.background, "background"]
    return " ".join(words)


def random_caption(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A caption of the spec from a random template (size and background each mentioned half the time)."""
    return caption(spec, mention_size=bool(rng.random() < 0.5), mention_background=bool(rng.random() < 0.5))


def _captions_of(combos: list[tuple[str, str, str]]) -> list[str]:
    """Every template caption of every size of the given combinations, sorted and de-duplicated."""
    out = set()
    for (colour, shape, background), size in itertools.product(combos, SIZES):
        spec = ShapeSpec(colour, shape, background, size, 0.0, 0.0, 0.0)
        for ms, mb in itertools.product((False, True), repeat=2):
            out.add(caption(spec, ms, mb))
    return sorted(out)


def train_captions() -> list[str]:
    """All captions that training can produce (sorted)."""
    return _captions_of(_valid_combos("train"))


def heldout_captions() -> list[str]:
    """The 12 held-out prompts (the built-in prompt set `shapes-heldout`); none is a training caption."""
    out = []
    for (colour, shape, background), size in zip(HELDOUT_COMBOS, _HELDOUT_SIZE, strict=True):
        spec = ShapeSpec(colour, shape, background, size or "small", 0.0, 0.0, 0.0)
        out.append(caption(spec, mention_size=size is not None, mention_background=True))
    return out


_CAPTION_RE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+)(?: on a (?P<background>\w+) background)?$"
)


def parse_caption(text: str) -> ParsedCaption:
    """Read colour / shape / size / background back out of a caption; unknown words come back as None."""
    m = _CAPTION_RE.match(" ".join(text.lower().split()))
    if m is None:
        words = set(re.findall(r"[a-z]+", text.lower()))
        colour = next((c for c in COLOURS if c in words), None)
        shape = next((s for s in SHAPES if s in words), None)
        return ParsedCaption(colour, shape)
    colour = m["colour"] if m["colour"] in COLOURS else None
    shape = m["shape"] if m["shape"] in SHAPES else None
    background = m["background"] if m["background"] in BACKGROUNDS else None
    return ParsedCaption(colour, shape, m["size"], background)


def consistent(spec: ShapeSpec, parsed: ParsedCaption) -> bool:
    """Whether the image of `spec` fits every attribute the parsed caption mentions."""
    checks = (
        (parsed.colour, spec.colour),
        (parsed.shape, spec.shape),
        (parsed.size, spec.size),
        (parsed.background, spec.background),
    )
    return all(want is None or want == have for want, have in checks)


def nearest_colour(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]] | None = None) -> str:
    """Name of the palette colour (default: shape colours) nearest to an RGB triple in 0..255."""
    palette = COLOURS if palette is None else palette
    names = list(palette)
    ref = np.asarray([palette[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((ref - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)))]


@dataclass(frozen=True)
class PixelJudgement:
    """What an image's pixels show: background and shape colour names (palette-nearest), and the shape guess."""

    background: str
    colour: str | None  # None when no foreground pixels were found
    shape: str | None  # the nearest of SHAPES (`shape_errors`)
    fill_ratio: float  # foreground pixels / bounding-box area


def judge_pixels(image: Image.Image | np.ndarray) -> PixelJudgement:
    """Read an image's colours and shape from its pixels, without any learned model.

    The background is the median of the border pixels; foreground pixels differ from it by more than a
    threshold; the shape colour is the median foreground colour, named by its nearest palette entry (a
    shape colour equal to the background name is excluded). The shape is the one whose rendering, of the
    same area at the same centroid, differs least from the image's per-pixel coverage (`shape_errors`).
    """
    arr = np.asarray(image, dtype=np.float64)  # (H, W, 3)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb, BACKGROUNDS)
    dist = np.sqrt(((arr - bg_rgb) ** 2).sum(axis=-1))  # (H, W)
    mask = dist > 60.0
    if mask.sum() < 4:
        return PixelJudgement(background, None, None, 0.0)
    palette = {k: v for k, v in COLOURS.items() if v != BACKGROUNDS[background]}
    # Core pixels (far from the background) avoid anti-aliased edge colours.
    core = dist > 0.5 * dist[mask].max()
    fill_rgb = np.median(arr[core], axis=0)
    colour = nearest_colour(fill_rgb, palette)
    cover = coverage(arr, bg_rgb, fill_rgb)
    if cover.shape != (RESOLUTION, RESOLUTION):  # the templates are drawn at the data set's size
        cover = np.asarray(Image.fromarray(cover.astype(np.float32)).resize((RESOLUTION, RESOLUTION), Image.BILINEAR))
    errors = shape_errors(cover)
    ys, xs = np.nonzero(mask)
    fill = float(mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
    return PixelJudgement(background, colour, min(errors, key=errors.get), fill)


def coverage(img: np.ndarray, background: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Per-pixel shape coverage in [0, 1] of an anti-aliased two-colour image (H, W, 3): its projection onto
    the line from the background colour to the fill colour."""
    d = np.asarray(fill, dtype=np.float64) - background
    a = ((np.asarray(img, dtype=np.float64) - background) @ d) / max(float(d @ d), 1e-6)
    return np.clip(a, 0.0, 1.0)


# Area of each rendered shape per squared circumscribed radius (see `_polygon` and `render`).
_AREA_PER_R2 = {"circle": np.pi * 0.92**2, "square": 2 * 1.15**2, "triangle": 3 * np.sqrt(3) / 4}


def shape_errors(cover: np.ndarray) -> dict[str, float]:
    """Shape name -> L1 distance, relative to the area, between a coverage map (RESOLUTION x RESOLUTION) and
    that shape rendered with the same area and centroid (squares axis-aligned, triangles pointing up, as in
    the data set). Robust to soft edges and rounded corners, which a bounding-box fill ratio is not."""
    area = float(cover.sum())
    ys, xs = np.mgrid[0 : cover.shape[0], 0 : cover.shape[1]] + 0.5  # pixel centres
    cx, cy = float((cover * xs).sum() / area), float((cover * ys).sum() / area)
    white, black = np.asarray(COLOURS["white"], dtype=np.float64), np.asarray(BACKGROUNDS["black"], dtype=np.float64)
    errors = {}
    for shape, per_r2 in _AREA_PER_R2.items():
        spec = ShapeSpec("white", shape, "black", "small", float(np.sqrt(area / per_r2)), cx, cy)
        template = coverage(np.asarray(render(spec), dtype=np.float64), black, white)
        errors[shape] = float(np.abs(cover - template).sum() / area)
    return errors
