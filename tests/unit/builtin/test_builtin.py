"""The built-in shapes data set, the shipped tiny pipeline and tiny CLIP, and the training script."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dagcli.builtin import TINY_CLIP_DIR, TINY_SD_DIR, WEIGHTS_DIR
from dagcli.builtin import dataset as ds

MAX_WEIGHT_BYTES = 28 * 1024 * 1024  # tiny + tiny CLIP + small decoder (14.7 MB) and tiny-flow (<= 15 MB)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run far faster on one thread than on two busy shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_render_is_deterministic() -> None:
    a = ds.render_array(ds.sample_specs(16, seed=3))
    b = ds.render_array(ds.sample_specs(16, seed=3))
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, ds.render_array(ds.sample_specs(16, seed=4)))


def test_captions_parse_back_to_spec() -> None:
    for spec in ds.sample_specs(50, seed=0) + ds.sample_specs(20, seed=0, split="heldout"):
        for ms, mb in itertools.product((False, True), repeat=2):
            parsed = ds.parse_caption(ds.caption(spec, ms, mb))
            assert (parsed.colour, parsed.shape) == (spec.colour, spec.shape)
            assert parsed.size == (spec.size if ms else None)
            assert parsed.background == (spec.background if mb else None)
            assert ds.consistent(spec, parsed)


def test_vocabulary_covers_captions() -> None:
    words = {w for c in ds.train_captions() + ds.heldout_captions() for w in c.split()}
    assert words <= set(ds.VOCABULARY)


def test_heldout_captions_never_in_training() -> None:
    held = ds.heldout_captions()
    assert len(held) == 12 and len(set(held)) == 12
    assert not set(held) & set(ds.train_captions())
    combos = {(s.colour, s.shape, s.background) for s in ds.sample_specs(3000, seed=1)}
    assert not combos & set(ds.HELDOUT_COMBOS)
    for text in held:
        p = ds.parse_caption(text)
        assert (p.colour, p.shape, p.background) in ds.HELDOUT_COMBOS


def test_pixel_judge_reads_rendered_images() -> None:
    specs = ds.sample_specs(200, seed=5)
    judged = [ds.judge_pixels(im) for im in ds.render_array(specs)]
    assert all(j.colour == s.colour and j.background == s.background for j, s in zip(judged, specs, strict=True))
    assert all(j.shape == s.shape for j, s in zip(judged, specs, strict=True))


def test_pixel_shape_judge_reads_every_colour_shape_background_and_size() -> None:
    """Rendered images of every colour x shape x background of the data set (both splits), both sizes, at
    random places: the judge names each one's true shape."""
    rng = np.random.default_rng(11)
    specs = [
        ds.ShapeSpec(colour, shape, background, size, *ds._random_geometry(rng, size))
        for colour, shape, background in itertools.product(ds.COLOURS, ds.SHAPES, ds.BACKGROUNDS)
        if ds.COLOURS[colour] != ds.BACKGROUNDS[background]
        for size in ds.SIZES
        for _ in range(2)
    ]
    wrong = [(s.colour, s.shape, s.background, s.size, j.shape)
             for s, j in zip(specs, map(ds.judge_pixels, ds.render_array(specs)), strict=True) if j.shape != s.shape]
    assert len(specs) == 7 * 3 * 4 * 2 * 2 - 3 * 2 * 2 and wrong == []  # white on white is never drawn


def test_pixel_shape_judge_reads_the_tiny_models_own_squares_and_triangles() -> None:
    """The base model's purple squares (soft, slightly rounded corners) and green triangles (blurred tips) are
    squares and triangles: a bounding-box fill ratio read most of them as circles."""
    from quality import generate, load_pipeline

    pipe = load_pipeline()
    for prompt in ("a purple square on a white background", "a green triangle"):
        images = generate(pipe, prompt, 8, guidance=3.0, steps=10, seed=0)
        shapes = [ds.judge_pixels(im).shape for im in images]
        assert shapes.count(ds.parse_caption(prompt).shape) >= 7, (prompt, shapes)


def test_shape_errors_prefer_the_rendered_shape_by_a_margin() -> None:
    """Each clean rendering is far closer to its own template than to the other shapes'."""
    for shape in ds.SHAPES:
        image = np.asarray(ds.render(ds.ShapeSpec("red", shape, "gray", "large", 10.0, 16.0, 16.0)), dtype=float)
        cover = ds.coverage(image, np.asarray(ds.BACKGROUNDS["gray"]), np.asarray(ds.COLOURS["red"]))
        errors = ds.shape_errors(cover)
        own = errors.pop(shape)
        assert own < 0.1 and min(errors.values()) > 2 * own, (shape, own, errors)


def test_shipped_pipeline_generates_32px_image() -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD_DIR)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert image.size == (32, 32)
    assert (TINY_SD_DIR / "dagcli.json").is_file()


def test_shipped_clip_ranks_right_caption_first() -> None:
    from quality import load_clip

    clip = load_clip(TINY_CLIP_DIR)
    specs = [ds.ShapeSpec(c, s, "black" if c != "white" else "gray", "large", 10.0, 16.0, 16.0)
             for c, s in [("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("green", "square"),
                          ("purple", "circle"), ("orange", "triangle")]]
    captions = [ds.caption(s, mention_size=False, mention_background=False) for s in specs]
    sims = clip.image_embeds(ds.render_array(specs)) @ clip.text_embeds(captions).T  # (6, 6)
    assert sims.argmax(dim=1).tolist() == list(range(len(specs)))


def test_weights_fit_size_budget() -> None:
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not any(p.suffix in {".bin", ".pt", ".pth", ".ckpt"} for p in files)
    assert sum(p.stat().st_size for p in files) <= MAX_WEIGHT_BYTES


@pytest.mark.slow
def test_training_script_end_to_end(tmp_path) -> None:
    import train
    from diffusers import StableDiffusionPipeline
    from quality import load_clip

    train.main(["--quick", "--seed", "1", "--output", str(tmp_path)])
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a blue square", num_inference_steps=2).images[0].size == (32, 32)
    clip = load_clip(tmp_path / "tiny-clip")
    assert clip.text_embeds(["a red circle"]).shape[0] == 1


def test_background_pool_shows_no_heldout_combination() -> None:
    import train

    from dagcli.builtin.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(ds.VOCABULARY, model_max_length=train.MAX_TOKENS)
    table = train.build_caption_table(ds.sample_specs(2000, seed=0), tokenizer)
    pool = train.render_background_pool(60, seed=0, table=table)
    assert pool.images.shape == (60, 3, 32, 32)
    palette_bg = np.asarray(list(ds.BACKGROUNDS.values()), dtype=np.float64)
    for image, cap, attrs in zip(pool.images, pool.captions.tolist(), pool.attrs.tolist(), strict=True):
        parsed = ds.parse_caption(table.captions[cap])
        assert parsed.background is None and attrs[3] == -2
        assert (list(ds.COLOURS).index(parsed.colour), ds.SHAPES.index(parsed.shape)) == tuple(attrs[:2])
        corner = ((image[:, 0, 0] + 1) * 127.5).double().numpy()  # shapes keep a 1 px margin: a background pixel
        assert np.sqrt(((palette_bg - corner) ** 2).sum(1)).min() >= 59
