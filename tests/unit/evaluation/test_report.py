"""What the evaluation report shows besides its numbers: settings, training curves, labelled image grids."""

from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dagcli.cli import main
from dagcli.images import LINE_HEIGHT, label_lines, labelled_rows, make_grid
from helpers.eval_run import make_lora_run
from helpers.reward_models import make_tiny_clip

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def evaluated(tiny_pipeline_dir, tmp_path_factory):
    """`dag eval` of the tiny pipeline and two checkpoints of one run (2 prompts x 2 images, 2 steps)."""
    root = tmp_path_factory.mktemp("report")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run = make_lora_run(root / "run", tiny_pipeline_dir)
    (run / "checkpoints" / "step-000002").rename(run / "checkpoints" / "step-000001")
    make_lora_run(root / "run", tiny_pipeline_dir, seed=1, scale=0.3)  # adds step-000002 beside it
    clip = make_tiny_clip(root / "clip")
    out = root / "out"
    args = ["eval", "--prompts", prompts, "--ckpt", run / "checkpoints" / "step-000001", "--ckpt",
            run / "checkpoints" / "step-000002", "-r", "compressibility", "-n", "2", "--steps", "2", "--guidance",
            "1", "--model", tiny_pipeline_dir, "--embed-model", clip, "--device", "cpu", "--no-lpips", "-o", out]
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert e.code == 0
    return {"root": root, "out": out, "pipeline": tiny_pipeline_dir}


def settings_lines(text: str) -> list[str]:
    """The markdown report's settings list."""
    return [line for line in text.split("## Overall")[0].splitlines() if line.startswith("- **")]


def test_settings_show_paths_relative_to_the_report_folder(evaluated):
    out, root = evaluated["out"], evaluated["root"]
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    settings = dict(re.match(r"- \*\*(\w+)\*\*: `(.*)`$", line).groups() for line in settings_lines(md))
    assert settings["checkpoints"] == "../run/checkpoints/step-000001, ../run/checkpoints/step-000002"
    assert settings["embed_model"] == "../clip"
    assert settings["model"] == os.path.relpath(evaluated["pipeline"], out)  # ../../tiny-sd0 or alike
    assert not any(str(root) in line for line in settings_lines(md)), settings_lines(md)
    shown = page.split("<h2>Overall</h2>")[0]
    assert str(root) not in shown and html.escape("../run/checkpoints/step-000001") in shown
    assert "paths relative to this report's folder" in md and "(../clip)" in md  # the legend's embedding model
    assert json.loads((out / "report.json").read_text())["settings"]["checkpoints"][0].startswith(str(root))


def test_the_built_in_tiny_clip_is_named_not_its_install_path():
    from dagcli.builtin import TINY_CLIP_DIR
    from dagcli.evaluation.render import shown_path

    assert shown_path(str(TINY_CLIP_DIR), None) == "the built-in tiny CLIP"
    assert shown_path("openai/clip-vit-large-patch14", None) == "openai/clip-vit-large-patch14"
    assert shown_path("/far/away/folder", Path("/work/runs/demo/eval")) == "/far/away/folder"  # 4 folders up
    assert shown_path("/work/runs/demo/checkpoints/step-000016", Path("/work/runs/demo/eval")) == \
        "../checkpoints/step-000016"


def test_training_curves_are_one_panel_per_run_titled_with_the_run(evaluated, monkeypatch):
    from matplotlib.figure import Figure

    from dagcli.evaluation.render import render_html

    titles = []
    original = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda fig, text, **kw: (titles.append(text), original(fig, text, **kw))[1])
    report = json.loads((evaluated["out"] / "report.json").read_text())
    page = render_html(report, {}, evaluated["out"])
    assert titles == ["run run: reward_mean and loss per epoch against trajectories_seen (metrics.jsonl)"]
    assert page.count("training curves'") == 1 and "alt='run run training curves'" in page


def test_every_grid_of_the_page_is_labelled_with_its_prompt(evaluated):
    import base64
    import io

    from dagcli.evaluation.render import thumbnail_grid

    out = evaluated["out"]
    page = (out / "report.html").read_text()
    for folder, label in (("base", "base"), ("run-step-000001", "run@step-000001")):
        for i, prompt in enumerate(PROMPTS):
            uri = re.search(f'<img src="data:image/png;base64,([^"]+)" alt="{re.escape(html.escape(f"{label}: {prompt}"))}"',
                            page)
            grid = Image.open(io.BytesIO(base64.b64decode(uri.group(1)))).convert("RGB")
            tiles = [Image.open(f).convert("RGB") for f in sorted((out / "images" / folder).glob(f"{i:03d}-*.png"))]
            assert_labelled(grid, thumbnail_grid(tiles), prompt)


def test_the_grid_files_of_dag_sample_are_labelled_with_their_prompt(tmp_path):
    from dagcli.generate import GeneratedImage, SampleSettings, write_samples

    tiles = {p: [Image.new("RGB", (32, 32), (40 * i, 90, 200 - 40 * i)) for i in range(3)] for p in PROMPTS}
    images = [GeneratedImage(p, seed, tile, {}) for p, group in tiles.items() for seed, tile in enumerate(group)]
    write_samples(images, SampleSettings(), tmp_path)
    for i, prompt in enumerate(PROMPTS):
        grid = Image.open(next(tmp_path.glob(f"grid-{i:03d}-*.png"))).convert("RGB")
        assert_labelled(grid, make_grid(tiles[prompt], upscale=4), prompt)


def assert_labelled(grid: Image.Image, bare: Image.Image, prompt: str) -> None:
    """`grid` is the unlabelled grid `bare` under a strip holding `prompt`'s text (dark pixels)."""
    strip = grid.height - bare.height
    assert strip == LINE_HEIGHT * len(label_lines(prompt, bare.width - 4)) + 2
    np.testing.assert_array_equal(np.asarray(grid)[strip:], np.asarray(bare))
    assert (np.asarray(grid)[:strip] < 128).any()


def test_labels_differ_by_prompt_wrap_at_spaces_and_are_never_cut():
    tiles = [Image.new("RGB", (32, 32), (200, 30, 30))] * 2
    a = np.asarray(make_grid(tiles, label="a red circle"))
    b = np.asarray(make_grid(tiles, label="a blue square"))
    assert a.shape == b.shape and not np.array_equal(a[:LINE_HEIGHT], b[:LINE_HEIGHT])
    long = "a small green triangle on a black background " * 3
    lines = label_lines(long, 60)
    assert " ".join(lines) == " ".join(long.split()) and len(lines) > 3
    rows = labelled_rows([(long, tiles), ("a red circle", tiles)], label_width=160)
    assert rows.height >= LINE_HEIGHT * len(label_lines(long, 152)) + 34  # the long label is all there


def test_training_sample_grids_label_each_row_with_its_prompt(tiny_model, tmp_path):
    from types import SimpleNamespace

    from dagcli.metrics import write_sample_grid

    settings = SimpleNamespace(steps=2, guidance=1.0, eta=0.0)
    prompts = ["a small green triangle on a black background", "a red circle"]
    write_sample_grid(tiny_model, tiny_model.pipe.unet, prompts, settings, 32, 32, tmp_path / "epoch-0001.png")
    grid = np.asarray(Image.open(tmp_path / "epoch-0001.png").convert("RGB"))
    row = 96 + 2 * 2  # four 32 px samples enlarged 3 times, padded
    assert grid.shape == (2 * row, 160 + 4 * (96 + 2) + 2, 3)
    for r, prompt in enumerate(sorted(prompts)):  # rows in prompt order, each label in its row's band
        band = grid[r * row : (r + 1) * row, :160]
        assert (band < 128).any(), prompt
        assert len(label_lines(prompt, 152)) * LINE_HEIGHT <= row
