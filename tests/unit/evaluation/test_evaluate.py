"""`dag eval`: metric functions against independent computations, the reports end to end, bad inputs."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from dagcli.cli import main
from dagcli.evaluation import (
    EvalInputs,
    ImageSet,
    evaluate_sets,
    fidelity,
    frechet_distance,
    frechet_from_stats,
    hacking_warnings,
    judge_images,
    pairwise_cosine_distance,
    sqrtm_psd,
    uses_pixel_judges,
    warning_lines,
)
from dagcli.evaluation.render import render_html, render_markdown
from helpers.cli import run_cli
from helpers.eval_run import make_lora_run
from helpers.reward_models import make_tiny_clip

# --- metrics ------------------------------------------------------------------------------------------


def test_pairwise_cosine_distance_matches_double_loop():
    emb = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    pairs = []
    for i, j in itertools.combinations(range(6), 2):
        a, b = emb[i].tolist(), emb[j].tolist()
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        pairs.append(1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))))
    assert pairwise_cosine_distance(emb) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert pairwise_cosine_distance(torch.ones(3, 4)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(pairwise_cosine_distance(emb[:1]))


def closed_form_fd(mu1, s1, mu2, s2) -> float:
    """|μ1−μ2|² + tr(Σ1+Σ2) − 2 Σ sqrt(eig(Σ1Σ2)) (the eigenvalues of Σ1Σ2 are real, ≥ 0 for SPD inputs)."""
    eig = np.linalg.eigvals(np.asarray(s1) @ np.asarray(s2)).real
    d = np.asarray(mu1, float) - np.asarray(mu2, float)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def test_frechet_exact_formula_on_given_moments():
    assert frechet_from_stats([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(4 + 4 + 1 - 2 * 2)
    assert frechet_from_stats([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([4.0, 9.0])) == pytest.approx(
        5 + 5 + 13 - 16
    )
    s1 = np.array([[2.0, 0.6], [0.6, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 0.5]])
    assert frechet_from_stats([1, -1], s1, [0, 2], s2) == pytest.approx(
        closed_form_fd([1, -1], s1, [0, 2], s2), abs=1e-10
    )
    assert frechet_from_stats([1, 2], s1, [1, 2], s1) == pytest.approx(0.0, abs=1e-9)
    root = sqrtm_psd(s1)
    np.testing.assert_allclose(root @ root, s1, atol=1e-12)


@pytest.mark.parametrize(
    "mu1, s1, mu2, s2",
    [
        ([0.0], [[1.0]], [2.0], [[4.0]]),
        ([0.0, 1.0], [[2.0, 0.6], [0.6, 1.0]], [1.0, -1.0], [[1.0, -0.3], [-0.3, 0.5]]),
    ],
)
def test_frechet_distance_of_samples_approaches_closed_form(mu1, s1, mu2, s2):
    rng = np.random.default_rng(0)
    a = rng.multivariate_normal(mu1, s1, size=40_000)
    b = rng.multivariate_normal(mu2, s2, size=40_000)
    expected = closed_form_fd(mu1, s1, mu2, s2)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b), ridge=0.0) == pytest.approx(
        expected, rel=0.03, abs=0.02
    )
    assert frechet_distance(a, a, ridge=1e-6) == pytest.approx(0.0, abs=1e-6)


def test_fidelity_counts_best_matching_caption():
    text = torch.eye(3)
    images = torch.tensor([[1.0, 0.1, 0], [0.2, 1.0, 0], [0.9, 0.1, 0.2], [0, 0, 1.0]])
    assert fidelity(images, text, [0, 1, 2, 2]) == pytest.approx(0.75)  # image 2 looks like caption 0
    assert fidelity(images, text, [0, 1, 0, 2]) == pytest.approx(1.0)


def test_hacking_monitor_flags_reward_gain_with_collapse():
    base = {"rewards": {"r": {"mean": 1.0}, "q": {"mean": 5.0}}, "diversity": 0.5, "fidelity": 0.9}
    hacked = {"rewards": {"r": {"mean": 2.0}, "q": {"mean": 4.0}}, "diversity": 0.3, "fidelity": 0.85}
    warnings = hacking_warnings(base, hacked, "ckpt", threshold=0.2)
    assert [(w["reward"], w["metric"]) for w in warnings] == [("r", "diversity")]  # q fell; fidelity −5.6%
    assert warnings[0]["relative_drop"] == pytest.approx(0.4)
    assert hacking_warnings(base, hacked, "ckpt", threshold=0.5) == []


def synthetic_sets():
    """Two prompts x 3 images for a base and a checkpoint whose images collapse onto one embedding."""
    img = Image.new("RGB", (8, 8))
    prompts = ["a", "a", "a", "b", "b", "b"]
    sets = [
        ImageSet(label, prompts, [img] * 6, list(range(6)), [f"{label}{i}.png" for i in range(6)])
        for label in ("base", "ckpt")
    ]
    g = torch.Generator().manual_seed(1)
    base_emb = torch.randn(6, 4, generator=g)
    ckpt_emb = torch.tensor([[1.0, 0, 0, 0]] * 3 + [[0, 1.0, 0, 0]] * 3) + 1e-3 * torch.randn(
        6, 4, generator=g
    )
    inputs = EvalInputs(
        rewards={"base": {"r": torch.arange(6.0)}, "ckpt": {"r": torch.arange(6.0) + 10}},
        embeddings={"base": base_emb, "ckpt": ckpt_emb},
        text_embeddings=torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]),
        settings={"mode": "test"},
    )
    return sets, inputs, base_emb, ckpt_emb


def test_evaluate_sets_numbers_and_rendering():
    sets, inputs, base_emb, ckpt_emb = synthetic_sets()
    report = evaluate_sets(sets, inputs)
    base, ckpt = report["models"]
    assert report["prompts"] == ["a", "b"] and report["rewards"] == ["r"]
    assert base["per_prompt"][1]["rewards"]["r"]["mean"] == pytest.approx(4.0)
    assert base["per_prompt"][1]["rewards"]["r"]["std"] == pytest.approx(np.std([3, 4, 5]))
    assert ckpt["overall"]["rewards"]["r"]["mean"] == pytest.approx(12.5)
    assert base["per_prompt"][0]["diversity"] == pytest.approx(pairwise_cosine_distance(base_emb[:3]))
    assert ckpt["per_prompt"][1]["drift"] == pytest.approx(frechet_distance(base_emb[3:], ckpt_emb[3:]))
    assert ckpt["overall"]["fidelity"] == 1.0 and base["overall"]["drift"] is None
    assert any(w["metric"] == "diversity" and w["model"] == "ckpt" for w in report["warnings"])
    json.dumps(report, allow_nan=False)  # strictly valid JSON
    assert "possible reward hacking in ckpt" in render_markdown(report)
    page = render_html(report, {"base": {"a": [sets[0].images[0]]}})
    assert (
        "possible reward hacking in ckpt" in page and page.count("data:image/png;base64,") == 2
    )  # grid + histogram


def test_hacking_threshold_is_inclusive():
    base = {"rewards": {"r": {"mean": 1.0}}, "diversity": 0.5}
    at = {"rewards": {"r": {"mean": 2.0}}, "diversity": 0.4}  # (0.5 - 0.4) / 0.5 = 20 %, 0.19999... in floats
    assert [w["relative_drop"] for w in hacking_warnings(base, at, "ckpt")] == [pytest.approx(0.2)]
    assert hacking_warnings(base, {**at, "diversity": 0.41}, "ckpt") == []


# Unit vectors whose pairwise cosine distances are known: orthogonal -> 1, equal -> 0, 120° apart -> 1.5.
E1, E2, E3, E4 = torch.eye(4)
TRIAD = torch.tensor([[1.0, 0, 0, 0], [-0.5, 3**0.5 / 2, 0, 0], [-0.5, -(3**0.5) / 2, 0, 0]])
PROMPTS = ["a green triangle"] * 3 + ["a red circle"] * 3


def monitor_report(ckpt_emb: torch.Tensor) -> dict:
    """Base: 'a green triangle' diversity 1 (orthogonal), 'a red circle' 2/3; the checkpoint's reward +10."""
    img = Image.new("RGB", (8, 8))
    sets = [ImageSet(label, PROMPTS, [img] * 6, list(range(6)), [""] * 6) for label in ("base", "ckpt")]
    inputs = EvalInputs(
        rewards={"base": {"r": torch.arange(6.0)}, "ckpt": {"r": torch.arange(6.0) + 10}},
        embeddings={"base": torch.stack([E1, E2, E3, E1, E1, E2]), "ckpt": ckpt_emb},
    )
    return evaluate_sets(sets, inputs)


def test_hacking_monitor_names_the_prompt_that_collapses_while_overall_diversity_holds():
    # 'a green triangle' collapses 1 -> 0; 'a red circle' spreads 2/3 -> 1.5; overall 5/6 -> 3/4 (-10 %).
    report = monitor_report(torch.cat([torch.stack([E1, E1, E1]), TRIAD]))
    base, ckpt = (m["overall"]["diversity"] for m in report["models"])
    assert (base, ckpt) == (pytest.approx(5 / 6), pytest.approx(3 / 4))
    [warning] = report["warnings"]
    assert warning["prompt"] == "a green triangle" and warning["metric"] == "diversity"
    assert (warning["metric_base"], warning["metric_value"]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert warning["reward_base"] == pytest.approx(1.0) and warning["reward_value"] == pytest.approx(11.0)
    assert "on prompt 'a green triangle'" in warning["message"]
    assert "on prompt 'a green triangle'" in render_markdown(report)
    page = render_html(report, {})
    assert "on prompt &#x27;a green triangle&#x27;" in page and page.count("class='flag'") == 1


def test_hacking_monitor_quiet_when_nothing_collapses():
    report = monitor_report(torch.stack([E1, E2, E4, E2, E2, E1]))  # same diversities as the base
    assert report["warnings"] == []
    assert "No checkpoint raised a reward, over all prompts or on one prompt" in render_markdown(report)


def shape_image(colour: str, background: str, shape: str) -> Image.Image:
    """A 32x32 image drawn here (not with the data set's renderer): a filled square or disc of 16 px."""
    from PIL import ImageDraw

    from dagcli.builtin.dataset import BACKGROUNDS, COLOURS

    img = Image.new("RGB", (32, 32), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    (draw.rectangle if shape == "square" else draw.ellipse)([8, 8, 23, 23], fill=COLOURS[colour])
    return img


def pixel_report() -> dict:
    """'a green square on a black background' and 'a red circle', 2 images each; the checkpoint's images
    keep the square's colour on the wrong background and turn the red circles into blue squares."""
    prompts = ["a green square on a black background"] * 2 + ["a red circle"] * 2
    base = [shape_image("green", "black", "square")] * 2 + [shape_image("red", "gray", "circle")] * 2
    ckpt = [shape_image("green", "white", "square")] * 2 + [shape_image("blue", "gray", "square")] * 2
    sets = [
        ImageSet(n, prompts, imgs, [0, 1, 2, 3], [""] * 4) for n, imgs in (("base", base), ("ckpt", ckpt))
    ]
    inputs = EvalInputs(
        rewards={"base": {"r": torch.zeros(4)}, "ckpt": {"r": torch.ones(4)}},
        pixels={s.label: judge_images(s.images) for s in sets},
    )
    return evaluate_sets(sets, inputs)


def test_pixel_judges_share_of_matching_colour_and_background():
    report = pixel_report()
    base, ckpt = report["models"]
    assert report["pixel_judges"] == ["colour", "background", "shape"]
    shares = lambda block: tuple(block[k] for k in ("pixel_colour", "pixel_background", "pixel_shape"))  # noqa: E731
    assert shares(base["overall"]) == (1.0, 1.0, 1.0)
    assert [shares(p) for p in base["per_prompt"]] == [
        (1.0, 1.0, 1.0),
        (1.0, None, 1.0),
    ]  # no background named
    assert [shares(p) for p in ckpt["per_prompt"]] == [(1.0, 0.0, 1.0), (0.0, None, 0.0)]
    assert shares(ckpt["overall"]) == (0.5, 0.0, 0.5)  # 2 of 4 colours; 0 of the 2 images with a background
    assert (
        ckpt["per_prompt"][1]["pixels"] == [{"colour": "blue", "background": "gray", "shape": "square"}] * 2
    )
    found = {(w["prompt"], w["metric"]) for w in report["warnings"]}
    assert found == {  # the shape share is reported, not monitored
        (None, "pixel_colour"),
        (None, "pixel_background"),
        ("a green square on a black background", "pixel_background"),
        ("a red circle", "pixel_colour"),
    }
    md = render_markdown(report)
    assert (
        "| model | r | diversity | fidelity | pixel colour | pixel background | pixel shape | drift |" in md
    )
    assert "| ckpt | 1 ± 0 | – | – | 50 % ⚠ | 0 % ⚠ | 50 % | – |" in md
    lines = warning_lines(report["warnings"])
    assert lines == [
        "possible reward hacking in ckpt: r 0 -> 1 rose while pixel_colour 1 -> 0.5 (50%), "
        "pixel_background 1 -> 0 (100%) fell",
        "possible reward hacking in ckpt on prompt 'a green square on a black background': r 0 -> 1 rose while "
        "pixel_background 1 -> 0 (100%) fell",
        "possible reward hacking in ckpt on prompt 'a red circle': r 0 -> 1 rose while pixel_colour 1 -> 0 "
        "(100%) fell",
    ]


def test_pixel_judges_only_for_builtin_models_and_shapes_captions():
    assert uses_pixel_judges("tiny", ["a cat", "a red circle"])
    assert not uses_pixel_judges("tiny", ["a photo of a cat"])
    assert not uses_pixel_judges("stable-diffusion-v1-5/stable-diffusion-v1-5", ["a red circle"])
    assert not uses_pixel_judges(None, ["a red circle"])
    sets, inputs, *_ = synthetic_sets()
    report = evaluate_sets(sets, inputs)
    assert report["pixel_judges"] == [] and "pixel" not in render_markdown(report)
    assert report["models"][0]["per_prompt"][0]["pixel_colour"] is None


def test_per_prompt_grids_side_by_side_with_a_legend(tmp_path):
    sets, inputs, *_ = synthetic_sets()
    report = evaluate_sets(sets, inputs)
    images = {
        label: {"a": [Image.new("RGB", (8, 8), (9 * k, 0, 0)) for k in range(3)]}
        for label in ("base", "ckpt")
    }
    page = render_html(report, images)
    table = re.search(r"<h3>a</h3><div class='scroll'><table class='compare'>(.*?)</table>", page).group(1)
    header, first_row = re.findall(r"<tr>(.*?)</tr>", table)[:2]
    assert re.findall(r"<th>(.*?)</th>", header) == ["", "base", "ckpt"]
    assert first_row.startswith("<td>images</td>") and first_row.count("<img ") == 2  # one row, two columns
    for needle in ("mean pairwise cosine distance", "Fréchet distance", "ridge", "1e-06", "own prompt"):
        assert needle in page
    # Markdown: the grids `dag sample` wrote, as the first row of a table with one column per model.
    for label in ("base", "ckpt"):
        (tmp_path / label).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / label / "grid-000-a.png")
    report["models"][0]["per_prompt"][0]["files"] = ["base/0.png"]
    report["models"][1]["per_prompt"][0]["files"] = ["ckpt/0.png"]
    md = render_markdown(report, tmp_path)
    assert (
        "## a\n\n|  | base | ckpt |\n|---|---|---|\n| images | ![base](base/grid-000-a.png) | ![ckpt](ckpt/grid-000-a.png) |"
        in md
    )
    assert "- **ridge**: 1e-06, added to the covariances' diagonals in drift" in md


# --- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_run(tiny_pipeline_dir, tmp_path_factory):
    """One `dag eval` of the tiny pipeline and a LoRA checkpoint (2 prompts x 3 images, 2 steps, no CFG)."""
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    run = make_lora_run(root / "run", tiny_pipeline_dir)
    clip = make_tiny_clip(root / "clip")
    out = root / "out"
    args = [
        "eval",
        "--prompts",
        prompts,
        "--ckpt",
        run,
        "--reward",
        "compressibility,colorfulness",
        "-n",
        "3",
        "--steps",
        "2",
        "--guidance",
        "1",
        "--batch-size",
        "6",
        "--model",
        tiny_pipeline_dir,
        "--embed-model",
        clip,
        "--device",
        "cpu",
        "-o",
        out,
    ]
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert e.code == 0
    return {"out": out, "clip": clip, "run": run, "report": json.loads((out / "report.json").read_text())}


def test_eval_writes_three_reports_with_embedded_images(eval_run, capsys):
    out, report = eval_run["out"], eval_run["report"]
    assert all((out / f"report.{ext}").is_file() for ext in ("json", "md", "html"))
    page = (out / "report.html").read_text()
    uris = re.findall(r'src=["\']data:image/png;base64,([A-Za-z0-9+/=]+)', page)
    assert len(uris) == 2 * 2 + 2 + 1  # a grid per model and prompt, two histograms, the training curves
    assert "Training curves" in page and "run@step-000002" in page
    assert [m["label"] for m in report["models"]] == ["base", "run@step-000002"]
    assert report["rewards"] == ["compressibility", "colorfulness"]
    base, ckpt = report["models"]
    assert [p["seeds"] for p in base["per_prompt"]] == [[0, 1, 2], [3, 4, 5]]
    assert [p["seeds"] for p in ckpt["per_prompt"]] == [[0, 1, 2], [3, 4, 5]]
    assert base["overall"]["drift"] is None and ckpt["overall"]["drift"] > 0
    assert "| base |" in (out / "report.md").read_text()


def test_eval_on_the_builtin_tiny_model_judges_pixels_side_by_side(tmp_path, capsys):
    from dagcli.builtin import dataset as ds

    run = make_lora_run(tmp_path / "run", "tiny", scale=0.05)
    prompts = ["a green triangle", "a red circle on a black background"]
    out = tmp_path / "out"
    args = [
        "eval",
        "--model",
        "tiny",
        "--ckpt",
        run,
        "-p",
        prompts[0],
        "-p",
        prompts[1],
        "--reward",
        "compressibility",
    ]
    args += ["-n", "2", "--steps", "3", "--batch-size", "4", "--device", "cpu", "--no-lpips", "-o", out]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["pixel_judges"] == ["colour", "background", "shape"] and report["prompts"] == prompts
    for model in report["models"]:
        colours, backgrounds = [], []
        for p in model["per_prompt"]:
            want = ds.parse_caption(p["prompt"])
            seen = [ds.judge_pixels(Image.open(out / f).convert("RGB")) for f in p["files"]]
            colours += [s.colour == want.colour for s in seen]
            assert p["pixel_colour"] == pytest.approx(np.mean(colours[-2:]))
            assert p["pixel_shape"] == pytest.approx(np.mean([s.shape == want.shape for s in seen]))
            if want.background is None:
                assert p["pixel_background"] is None
            else:
                backgrounds += [s.background == want.background for s in seen]
                assert p["pixel_background"] == pytest.approx(np.mean(backgrounds))
        assert model["overall"]["pixel_colour"] == pytest.approx(np.mean(colours))
        assert model["overall"]["pixel_background"] == pytest.approx(np.mean(backgrounds))
        assert model["overall"]["fidelity"] is not None  # the built-in tiny CLIP, beside the pixel judges
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert "<th>pixel colour</th><th>pixel background</th><th>pixel shape</th>" in page
    assert page.count("<th></th><th>base</th><th>run@step-000002</th>") == 2  # a comparison per prompt
    assert "median colour of the pixels" in page and "Fréchet distance" in page
    grids = "| images | ![base](images/base/grid-000-a-green-triangle.png) | ![run@step-000002]("
    assert "|  | base | run@step-000002 |" in md and grids in md


def load_pngs(out, files):
    from dagcli.rewards import images_from_pil

    pil = []
    for f in files:
        with Image.open(out / f) as img:
            pil.append(img.convert("RGB"))
    return images_from_pil(pil)


def test_report_numbers_match_independent_recomputation(eval_run):
    from dagcli.rewards import build_reward
    from dagcli.rewards.clip import load_clip

    out, report = eval_run["out"], eval_run["report"]
    encoder = load_clip(eval_run["clip"])
    compress, colour = build_reward("compressibility"), build_reward("colorfulness")
    base_emb = {}
    for model in report["models"]:
        every = []
        for p in model["per_prompt"]:
            images = load_pngs(out, p["files"])
            for name, reward in (("compressibility", compress), ("colorfulness", colour)):
                scores = reward(images, [p["prompt"]] * len(images)).scores.double()
                every += scores.tolist() if name == "compressibility" else []
                assert p["rewards"][name]["scores"] == pytest.approx(scores.tolist(), abs=1e-6)
                assert p["rewards"][name]["mean"] == pytest.approx(float(scores.mean()), abs=1e-6)
                assert p["rewards"][name]["std"] == pytest.approx(float(np.std(scores.numpy())), abs=1e-6)
            emb = encoder.embed_images(images).double()
            pairs = [
                1 - float(torch.nn.functional.cosine_similarity(emb[i], emb[j], dim=0))
                for i, j in itertools.combinations(range(len(emb)), 2)
            ]
            assert p["diversity"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-5, abs=1e-9)
            if model["label"] == "base":
                base_emb[p["prompt"]] = emb
            else:
                assert p["drift"] == pytest.approx(
                    frechet_distance(base_emb[p["prompt"]], emb), rel=1e-4, abs=1e-8
                )
        assert model["overall"]["rewards"]["compressibility"]["mean"] == pytest.approx(
            np.mean(every), abs=1e-6
        )


def test_images_mode_and_alias_rescore_the_same_numbers(eval_run, tmp_path, capsys):
    images = eval_run["out"] / "images"
    out = tmp_path / "again"
    code, stdout, err = run_cli(
        [
            "evaluate",
            "--images",
            images / "base",
            "--images",
            images / "run-step-000002",
            "--reward",
            "compressibility",
            "--embed-model",
            "none",
            "-o",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    assert "compressibility" in stdout  # the terminal table
    again = json.loads((out / "report.json").read_text())
    for old, new in zip(eval_run["report"]["models"], again["models"], strict=True):
        assert new["overall"]["rewards"]["compressibility"] == pytest.approx(
            old["overall"]["rewards"]["compressibility"]
        )
        assert [p["prompt"] for p in new["per_prompt"]] == [p["prompt"] for p in old["per_prompt"]]
        assert new["overall"]["diversity"] is None  # no embedding model
    assert again["models"][1]["label"] == "run-step-000002"


def test_images_mode_with_prompt_for_bare_folder(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 10, 10)).save(folder / f"{i}.png")
    code, _, err = run_cli(
        [
            "eval",
            "--images",
            folder,
            "--prompt",
            "a red square",
            "--reward",
            "compressibility",
            "--embed-model",
            "none",
            "-o",
            tmp_path / "out",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["prompts"] == ["a red square"] and report["models"][0]["overall"]["images"] == 3


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--prompts", "missing-prompts.txt", "--reward", "compressibility"], "missing-prompts.txt"),
        (["-p", "x", "--reward", "no-such-reward"], "unknown reward 'no-such-reward'"),
        (["-p", "x", "--reward", "compressibility", "--ckpt", "no/such/run"], "no/such/run"),
        (["-p", "x"], "no reward"),
        (["--images", "no/such/folder", "--reward", "compressibility"], "no/such/folder"),
        (["-p", "x", "--reward", "compressibility", "--hack-threshold", "2"], "--hack-threshold"),
    ],
)
def test_bad_input_one_line_exit_2(args, needle, tmp_path, capsys):
    code, _, err = run_cli(["eval", *args, "-o", tmp_path / "o"], capsys)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


# --- the page in a real browser -----------------------------------------------------------------------

WIDTH_PROBE = """<script>
window.addEventListener('load', () => {
  const widths = Array.from(document.images).map(img => img.naturalWidth);
  const out = document.createElement('pre');
  out.id = 'img-widths';
  out.textContent = JSON.stringify(widths);
  document.body.appendChild(out);
});
</script>"""


def chromium_binary() -> str | None:
    """Debian's chromium, installed with apt-get when missing and possible."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900, check=False
        )
    return shutil.which("chromium")


@pytest.mark.slow
def test_report_html_renders_in_headless_chromium(eval_run, tmp_path):
    browser = chromium_binary()
    if browser is None:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` did not provide it")
    page = (eval_run["out"] / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", WIDTH_PROBE + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--dump-dom",
    ]
    result = subprocess.run([browser, *flags, probe.as_uri()], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r'<pre id="img-widths">(.*?)</pre>', result.stdout)
    assert match, "the page did not finish loading"
    widths = json.loads(match.group(1))
    assert len(widths) == page.count("<img ") and all(w > 0 for w in widths), widths
    assert "Uncaught" not in result.stderr
    assert "Evaluation report" in result.stdout
