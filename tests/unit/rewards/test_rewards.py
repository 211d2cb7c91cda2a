"""Reward registry: built-in rewards against independent computations, spec parsing, plugins, errors, CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
from typer.testing import CliRunner

from dagcli import builtin, extensions
from dagcli.errors import DagError
from dagcli.rewards import (
    REWARDS,
    RewardOutput,
    build_reward,
    images_from_pil,
    list_rewards,
    load_image_folder,
    parse_spec,
    validate_spec,
)
from dagcli.rewards.plugins import ValidatedReward
from dagcli.rewards.registry import WeightedReward, parse_reward_options
from helpers import ROOT
from helpers.reward_models import make_tiny_clip, mlp_by_hand, random_mlp_state, uint8_by_numpy

PROMPTS = ["a red circle", "a blue square", "a photo of a green circle", "red on white", "a square"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0, logit_scale=2.0)


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    """(state, .pth path, .safetensors path) of one random predictor head."""
    folder = tmp_path_factory.mktemp("mlp")
    state = random_mlp_state(seed=1)
    torch.save(state, folder / "mlp.pth")
    save_file(state, str(folder / "mlp.safetensors"))
    return state, folder / "mlp.pth", folder / "mlp.safetensors"


@pytest.fixture
def images():
    return torch.rand(5, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def manual_embeddings(clip_dir, images, prompts=None):
    """Normalised image (and text) embeddings computed directly with transformers."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        pixels = processor(images=uint8_by_numpy(images), return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        img = img / img.norm(dim=-1, keepdim=True)
        if prompts is None:
            return model, img, None
        tok = AutoTokenizer.from_pretrained(clip_dir)(prompts, padding=True, return_tensors="pt")
        txt = model.text_projection(
            model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
        )
        return model, img, txt / txt.norm(dim=-1, keepdim=True)


def check_output(out: RewardOutput, batch: int, names: list[str]):
    assert out.scores.shape == (batch,) and out.scores.dtype == torch.float32 and out.scores.device.type == "cpu"
    assert list(out.components) == names
    for v in out.components.values():
        assert v.shape == (batch,) and v.dtype == torch.float32


# ---------------------------------------------------------------- JPEG


def pil_jpeg_kb(images):
    sizes = []
    for array in uint8_by_numpy(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    return torch.tensor(sizes)


def test_jpeg_rewards_equal_pil_sizes_to_the_byte(images):
    expected = pil_jpeg_kb(images)
    inc = build_reward("incompressibility")(images, PROMPTS)
    comp = build_reward("compressibility")(images, PROMPTS)
    check_output(inc, 5, ["incompressibility"])
    assert torch.equal(inc.scores, expected.float())
    assert torch.equal(comp.scores, -expected.float())
    assert torch.equal(comp.components["compressibility"], comp.scores)


def test_flat_image_is_more_compressible_than_noise():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reward = build_reward("compressibility")
    assert reward(flat, [""]).scores.item() > reward(noise, [""]).scores.item()


def test_rewards_accept_other_dtypes_and_layouts(images):
    half = images.to(torch.bfloat16)
    out = build_reward("incompressibility")(half, PROMPTS)
    assert torch.equal(out.scores, pil_jpeg_kb(half.float()).float())
    strided = images.permute(0, 1, 3, 2)  # non-contiguous view
    assert build_reward("colorfulness")(strided, PROMPTS).scores.shape == (5,)


def test_colorfulness_grey_is_zero_and_colour_is_positive():
    grey = torch.full((1, 3, 8, 8), 0.3)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    scores = build_reward("colorfulness")(torch.cat([grey, red]), ["", ""]).scores
    assert scores[0].item() == pytest.approx(0.0, abs=1e-4)
    rg, yb = 255.0, 127.5  # constant image: no spread, only the mean offset term
    assert scores[1].item() == pytest.approx(0.3 * (rg**2 + yb**2) ** 0.5, rel=1e-5)


# ---------------------------------------------------------------- CLIP-based rewards


@pytest.mark.parametrize("which", ["pth", "safetensors"])
def test_aesthetic_equals_independent_recomputation(clip_dir, mlp_files, images, which):
    state, pth, st = mlp_files
    path = pth if which == "pth" else st
    reward = build_reward("aesthetic", options={"aesthetic": {"model_id": str(clip_dir), "mlp_path": str(path)}})
    out = reward(images, PROMPTS)
    check_output(out, 5, ["aesthetic"])
    _, img, _ = manual_embeddings(clip_dir, images)
    assert torch.allclose(out.scores, mlp_by_hand(state, img), atol=1e-5)


def test_aesthetic_is_independent_of_batch_size(clip_dir, mlp_files, images):
    _, pth, _ = mlp_files
    opts = {"model_id": str(clip_dir), "mlp_path": str(pth)}
    one = build_reward("aesthetic", options={"aesthetic": {**opts, "batch_size": 1}})(images, PROMPTS).scores
    five = build_reward("aesthetic", options={"aesthetic": {**opts, "batch_size": 5}})(images, PROMPTS).scores
    assert torch.allclose(one, five, atol=1e-5)


def test_aesthetic_errors_name_the_file(clip_dir, mlp_files, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DagError, match="ddpo-aesthetic-predictor"):  # the default weights, not cached here
        build_reward("aesthetic", options={"aesthetic": {"model_id": str(clip_dir)}})
    with pytest.raises(DagError, match="nope.pth"):
        build_reward("aesthetic", options={"aesthetic": {"model_id": str(clip_dir), "mlp_path": "nope.pth"}})
    wide = tmp_path / "wide.safetensors"
    save_file(random_mlp_state(embed_dim=768), str(wide))
    with pytest.raises(DagError, match="768-d"):
        build_reward("aesthetic", options={"aesthetic": {"model_id": str(clip_dir), "mlp_path": str(wide)}})


def test_clip_score_equals_cosine_times_scale(clip_dir, images):
    reward = build_reward("clip", options={"clip": {"model_id": str(clip_dir), "scale": 2.5, "batch_size": 2}})
    out = reward(images, PROMPTS)
    check_output(out, 5, ["clip"])
    _, img, txt = manual_embeddings(clip_dir, images, PROMPTS)
    assert torch.allclose(out.scores, 2.5 * (img * txt).sum(-1), atol=1e-5)
    one = build_reward("clip", options={"clip": {"model_id": str(clip_dir), "scale": 2.5, "batch_size": 1}})
    assert torch.allclose(one(images, PROMPTS).scores, out.scores, atol=1e-5)


def test_pickscore_equals_logit_scale_times_cosine(clip_dir, images):
    opts = {"model_id": str(clip_dir), "processor_id": str(clip_dir), "batch_size": 3}
    out = build_reward("pickscore", options={"pickscore": opts})(images, PROMPTS)
    check_output(out, 5, ["pickscore"])
    model, img, txt = manual_embeddings(clip_dir, images, PROMPTS)
    expected = model.logit_scale.exp() * (img * txt).sum(-1)
    assert torch.allclose(out.scores, expected, atol=1e-4)


def test_clip_uses_builtin_tiny_clip_for_tiny_model(clip_dir, images, monkeypatch, tmp_path):
    tiny_model = extensions.named_model("tiny")
    assert tiny_model.embed_model == builtin.TINY_CLIP_DIR  # the shipped model registers the shipped tiny CLIP
    monkeypatch.setitem(extensions._MODELS, "tiny", dataclasses.replace(tiny_model, embed_model=clip_dir))
    tiny = build_reward("clip", base_model="tiny")(images, PROMPTS).scores
    explicit = build_reward("clip", options={"clip": {"model_id": str(clip_dir)}})(images, PROMPTS).scores
    assert torch.equal(tiny, explicit)
    monkeypatch.setitem(extensions._MODELS, "tiny", dataclasses.replace(tiny_model, embed_model=tmp_path / "missing"))
    with pytest.raises(DagError, match="CLIP model of 'tiny' is not installed"):
        build_reward("clip", base_model="tiny")


def test_clip_rewards_pickle_and_dtype_option(clip_dir, images):
    reward = build_reward("clip", options={"clip": {"model_id": str(clip_dir)}})
    clone = pickle.loads(pickle.dumps(reward))
    assert torch.equal(clone(images, PROMPTS).scores, reward(images, PROMPTS).scores)
    bf16 = build_reward("clip", options={"clip": {"model_id": str(clip_dir), "dtype": "bf16"}})
    out = bf16(images, PROMPTS)
    assert out.scores.dtype == torch.float32
    assert torch.allclose(out.scores, reward(images, PROMPTS).scores, atol=0.05)


def test_uncached_hub_id_offline_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DagError, match="nobody-here/no-such-clip") as info:
        build_reward("clip", options={"clip": {"model_id": "nobody-here/no-such-clip"}})
    assert "HF_HOME" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DagError, match="does not exist"):
        build_reward("clip", options={"clip": {"model_id": "./no/such/folder"}})
    with pytest.raises(DagError, match="hf://nobody-here/repo/mlp.pth"):
        build_reward("aesthetic", options={"aesthetic": {"mlp_path": "hf://nobody-here/repo/mlp.pth"}})


# ---------------------------------------------------------------- spec, weights, options


def test_parse_spec_tells_weights_from_plugins():
    parts = parse_spec("aesthetic:1.0, clip:.5,my.mod:make,my.mod:make:-2e-1,jpeg")
    assert [(p.label, p.weight, p.plugin) for p in parts] == [
        ("aesthetic", 1.0, None),
        ("clip", 0.5, None),
        ("my.mod:make", None, ("my.mod", "make")),
        ("my.mod:make", -0.2, ("my.mod", "make")),
        ("jpeg", None, None),
    ]
    for bad in ["", "a:b:c:d", "a,,b", ":1"]:
        with pytest.raises(DagError):
            parse_spec(bad)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("compressibility:abc", "reward weight 'abc' in 'compressibility:abc' is not a number; use NAME:WEIGHT, "
                                "e.g. compressibility:0.5"),
        ("aesthetic:1,clip:0.5x", "reward weight '0.5x' in 'clip:0.5x' is not a number; use NAME:WEIGHT"),
        ("no_such_reward:1e", "reward weight '1e' in 'no_such_reward:1e' is not a number"),
        ("my.mod:make:half", "reward weight 'half' in 'my.mod:make:half' is not a number; use MODULE:FACTORY:WEIGHT, "
                             "e.g. my.mod:make:0.5"),
    ],
)
def test_a_misspelt_weight_is_named_as_a_weight(spec, message):
    with pytest.raises(DagError) as info:
        parse_spec(spec)
    assert str(info.value).startswith(message)


def test_plugins_are_still_plugins_next_to_weights():
    parts = parse_spec("compressibility:2,my_module:make_reward,path/to/file.py:make:0.5,./plug.py:make_2")
    assert [(p.label, p.weight, p.plugin) for p in parts] == [
        ("compressibility", 2.0, None),
        ("my_module:make_reward", None, ("my_module", "make_reward")),
        ("path/to/file.py:make", 0.5, ("path/to/file.py", "make")),
        ("./plug.py:make_2", None, ("./plug.py", "make_2")),
    ]


def test_weighted_sum_equals_sum_of_scaled_components(images):
    reward = build_reward("compressibility:2,colorfulness:0.01,incompressibility")
    assert isinstance(reward, WeightedReward)
    out = reward(images, PROMPTS)
    check_output(out, 5, ["compressibility", "colorfulness", "incompressibility"])
    c = out.components
    expected = 2 * c["compressibility"] + 0.01 * c["colorfulness"] + c["incompressibility"]
    assert torch.allclose(out.scores, expected)
    assert torch.equal(c["compressibility"], build_reward("compressibility")(images, PROMPTS).scores)
    assert reward.weights == {"compressibility": 2.0, "colorfulness": 0.01, "incompressibility": 1.0}
    single = build_reward("compressibility:3")(images, PROMPTS)
    assert torch.allclose(single.scores, 3 * single.components["compressibility"])


def test_unknown_names_and_options_list_the_valid_ones():
    with pytest.raises(DagError, match="unknown reward 'aesthetics'.*aesthetic, background-modes, clip") as info:
        build_reward("aesthetics")
    with pytest.raises(DagError, match="unknown reward 'aesthetics'"):
        validate_spec("clip:1,aesthetics:2")
    assert [p.label for p in validate_spec("aesthetic:1,clip:0.5")] == ["aesthetic", "clip"]
    assert "compressibility" in str(info.value)
    with pytest.raises(DagError, match="unknown option 'qualty' for reward 'compressibility'.*quality"):
        build_reward("compressibility", options={"compressibility": {"qualty": 90}})
    with pytest.raises(DagError, match="'clip'.*compressibility"):
        build_reward("compressibility", options={"clip": {"scale": 1}})
    with pytest.raises(DagError, match="twice"):
        build_reward("compressibility:1,compressibility:2")


def test_list_rewards_matches_registry():
    builtin = ["aesthetic", "background-modes", "clip", "colorfulness", "compressibility", "incompressibility",
               "pickscore"]
    rows = list_rewards()
    assert [r.name for r in rows[: len(builtin)]] == builtin  # the built-ins first, sorted by name
    assert sorted(REWARDS) == builtin
    assert all(r.description and r.unit and r.needs for r in rows)


# ---------------------------------------------------------------- plugins

PLUGIN = '''
import torch
from dagcli.rewards import RewardOutput


class Redness:
    name = "redness"
    slow = False

    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, images, prompts, metadata=None):
        s = self.scale * images[:, 0].float().mean(dim=(1, 2)).cpu()
        return RewardOutput(scores=s, components={"redness": s}, info={})


def make_reward(scale=1.0, device="cpu"):
    return Redness(float(scale))


def bare_tensor(**kw):
    return lambda images, prompts, metadata=None: images.mean(dim=(1, 2, 3))


def wrong_shape():
    return lambda images, prompts, metadata=None: torch.zeros(len(images), 1)


def not_a_tensor():
    return lambda images, prompts, metadata=None: [0.0] * len(images)


def with_nan():
    def fn(images, prompts, metadata=None):
        s = torch.zeros(len(images))
        s[0] = float("nan")
        return s
    return fn


def factory_raises():
    raise ValueError("weights missing on purpose")


def call_raises():
    def fn(images, prompts, metadata=None):
        raise RuntimeError("scorer exploded")
    return fn


NOT_CALLABLE = 3
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "my_reward_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_reward_plugin"
    sys.modules.pop("my_reward_plugin", None)


def test_plugin_by_module_and_factory(plugin_module, images):
    reward = build_reward(f"{plugin_module}:make_reward", options={f"{plugin_module}:make_reward": {"scale": 2}})
    assert isinstance(reward, ValidatedReward) and reward.name == "redness"
    out = reward(images, PROMPTS)
    check_output(out, 5, ["redness"])
    assert torch.allclose(out.scores, 2 * images[:, 0].mean(dim=(1, 2)))
    total = build_reward(f"compressibility:1,{plugin_module}:make_reward:0.5")(images, PROMPTS)
    assert torch.allclose(total.scores, total.components["compressibility"] + 0.5 * total.components["redness"])
    bare = build_reward(f"{plugin_module}:bare_tensor")(images, PROMPTS)
    check_output(bare, 5, [f"{plugin_module}:bare_tensor"])


def test_plugin_from_file(tmp_path, images):
    path = tmp_path / "file_plugin.py"
    path.write_text(textwrap.dedent(PLUGIN))
    out = build_reward(f"{path}:make_reward")(images, PROMPTS)
    assert torch.allclose(out.scores, images[:, 0].mean(dim=(1, 2)))


def test_example_plugin_runs(images):

    example = ROOT / "examples" / "reward_plugin.py"
    out = build_reward(f"{example}:make_reward")(images, PROMPTS)
    check_output(out, 5, ["redness"])


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("missing_function", "has no factory 'missing_function'.*make_reward"),
        ("NOT_CALLABLE", "not a factory"),
        ("factory_raises", "raised ValueError: weights missing on purpose"),
        ("call_raises", "raised RuntimeError: scorer exploded"),
        ("wrong_shape", r"shape \[5, 1\]; expected \[B\] = \[5\]"),
        ("not_a_tensor", "returned a list"),
        ("with_nan", "1 non-finite"),
    ],
)
def test_bad_plugins_raise_dag_errors_naming_the_plugin(plugin_module, images, factory, message):
    label = f"{plugin_module}:{factory}"
    with pytest.raises(DagError, match=message) as info:
        build_reward(label)(images, PROMPTS)
    assert label in str(info.value)


def test_missing_plugin_module_is_named():
    with pytest.raises(DagError, match="'no_such_reward_module:make'.*module 'no_such_reward_module' not found"):
        build_reward("no_such_reward_module:make")


def test_nan_passes_through_when_not_strict(plugin_module, images):
    reward = build_reward(f"{plugin_module}:with_nan", strict_finite=False)
    out = reward(images, PROMPTS)
    assert torch.isnan(out.scores[0]) and out.info["nonfinite"] == 1
    total = build_reward(f"compressibility:1,{plugin_module}:with_nan:1", strict_finite=False)(images, PROMPTS)
    assert torch.isnan(total.scores[0]) and total.info["nonfinite"] == 1


def test_entry_point_plugin_is_listed_without_import_and_built(tmp_path, monkeypatch, images):
    (tmp_path / "ep_reward_mod.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "ep_reward_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-reward-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dagcli.rewards]\nredness = ep_reward_mod:make_reward\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = {r.name: r for r in list_rewards()}
    assert rows["redness"].needs == "ep_reward_mod:make_reward"
    assert "ep_reward_mod" not in sys.modules
    out = build_reward("redness:1,compressibility:0")(images, PROMPTS)
    assert torch.allclose(out.components["redness"], images[:, 0].mean(dim=(1, 2)))
    sys.modules.pop("ep_reward_mod", None)


# ---------------------------------------------------------------- images and CLI


def test_images_from_pil_and_folder(tmp_path, images):
    arrays = uint8_by_numpy(images[:3])
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i:03d}.png")
    lines = [{"prompt": "a red circle", "file": "000.png"}, {"prompt": "a blue square", "file": "002.png"}]
    Image.new("RGB", (96, 40)).save(tmp_path / "grid-000-a-red-circle.png")  # an overview, never scored
    expected = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    loaded, prompts = load_image_folder(tmp_path)  # no manifest: every image but the grid, by name
    assert torch.equal(loaded, expected) and prompts == ["", "", ""]
    (tmp_path / "samples.jsonl").write_text("\n".join(json.dumps(x) for x in lines[::-1]) + "\n")
    loaded, prompts = load_image_folder(tmp_path)  # the manifest's images, in its order, with its prompts
    assert torch.equal(loaded, expected[[2, 0]]) and prompts == ["a blue square", "a red circle"]
    assert torch.equal(images_from_pil([Image.fromarray(a) for a in arrays]), expected)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DagError, match="no images"):
        load_image_folder(empty)
    with pytest.raises(DagError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


def test_dag_rewards_command_lists_and_scores(tmp_path, images, clip_dir):
    app = typer.Typer()
    from dagcli.commands.rewards import register

    register(app)

    @app.command()
    def other() -> None:  # a second command, so `rewards` stays a named subcommand
        pass

    runner = CliRunner()
    result = runner.invoke(app, ["rewards"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ["aesthetic", "clip", "compressibility", "pickscore", "kB"]:
        assert name in result.output
    for i, a in enumerate(uint8_by_numpy(images)):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    result = runner.invoke(
        app, ["rewards", "--score", str(tmp_path), "--reward", "compressibility:1,colorfulness:1"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    mean = -pil_jpeg_kb(images).mean().item()
    assert "compressibility" in result.output and f"{mean:.4f}" in result.output and "total" in result.output
    result = runner.invoke(app, ["rewards", "--score", str(tmp_path), "--reward", "nope"])
    assert isinstance(result.exception, DagError)
    result = runner.invoke(
        app, ["rewards", "--score", str(tmp_path), "--reward", "clip", "--reward-option", f"clip.model_id={clip_dir}",
              "--reward-option", "clip.scale=100", "--batch-size", "2"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "clip" in result.output and "total" not in result.output
    # `--option` still works (hidden); `-o` is `--output` elsewhere and nothing here
    result = runner.invoke(app, ["rewards", "--score", str(tmp_path), "--reward", "clip", "--option", "clip.scael=1"])
    assert isinstance(result.exception, DagError) and "unknown option 'scael'" in str(result.exception)
    result = runner.invoke(app, ["rewards", "--score", str(tmp_path), "-o", "clip.scale=1"])
    assert result.exit_code == 2 and "No such option: -o" in result.output


def test_parse_reward_options():
    assert parse_reward_options(["clip.scale=2.5", "my.mod:make.k=a=b"]) == {
        "clip": {"scale": "2.5"}, "my.mod:make": {"k": "a=b"}}
    with pytest.raises(DagError, match="REWARD.OPTION=VALUE"):
        parse_reward_options(["scale=2"])
