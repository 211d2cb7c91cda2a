"""`dag sample` end to end through the real CLI entry point."""

from __future__ import annotations

import json

import pytest

from helpers.cli import run_cli


def test_sample_writes_images_grid_and_manifest(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["sample", "--model", str(tiny_pipeline_dir), "-p", "a red circle", "-p", "a blue square",
                            "-n", "2", "--steps", "4", "--batch-size", "3", "-o", str(out)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1, 2, 3]
    assert all((out / r["file"]).is_file() for r in records)
    assert len(list(out.glob("grid-*.png"))) == 2
    assert records[0]["settings"]["steps"] == 4


def test_same_seed_same_images_any_batch_size(tiny_pipeline_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    images = {}
    for run, bs in (("a", 1), ("b", 1), ("c", 4)):
        out = tmp_path / run
        code, _, err = run_cli(["sample", "--model", str(tiny_pipeline_dir), "-p", "a red circle", "-n", "3",
                                "--steps", "3", "--batch-size", str(bs), "-o", str(out)], capsys)
        assert code == 0, err
        images[run] = [np.asarray(Image.open(p)).astype(int) for p in sorted(out.glob("000-*.png"))]
    # same seed and batch size: the same files; another batch size: the same images up to float rounding
    assert all((x == y).all() for x, y in zip(images["a"], images["b"], strict=True))
    assert all(np.abs(x - y).max() <= 1 for x, y in zip(images["a"], images["c"], strict=True))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["sample", "-p", "x", "--model", "nope"], "unknown model 'nope'"),
        (["sample", "--prompts", "missing-file.txt"], "missing-file.txt"),
        (["sample", "-p", "x", "--eta", "1.5"], "--eta"),
        (["sample", "-p", "x", "--steps", "0"], "--steps"),
        (["sample", "-p", "x", "--steps", "-3"], "--steps"),
        (["sample"], "no prompts"),
        (["sample", "-p", "x", "--ckpt", "no/such/run"], "no/such/run"),
    ],
)
def test_bad_input_one_line_exit_2(args, needle, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_empty_prompt_file(tmp_path, capsys):
    f = tmp_path / "empty.txt"
    f.write_text("\n# nothing\n")
    code, _, err = run_cli(["sample", "--prompts", str(f)], capsys)
    assert code == 2 and "no prompts" in err


def test_help_for_every_command(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "sample" in out
    code, out, _ = run_cli(["sample", "--help"], capsys)
    assert code == 0 and "--num-per-prompt" in out
