"""The `background-modes` reward, the prompt set without backgrounds, and the mode metrics against hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dagcli import modes
from dagcli.builtin import dataset
from dagcli.errors import DagError
from dagcli.prompts import load_prompts
from dagcli.rewards import build_reward


def _images(backgrounds: list[str]) -> torch.Tensor:
    """Rendered data-set images (a red circle) on the given backgrounds, as [B, 3, 32, 32] in [0, 1]."""
    specs = [dataset.ShapeSpec("red", "circle", b, "large", 10.0, 16.0, 16.0) for b in backgrounds]
    return torch.from_numpy(dataset.render_array(specs)).permute(0, 3, 1, 2).float() / 255


def test_background_modes_scores_the_chosen_backgrounds():
    images = _images(["black", "gray", "white", "brown"])
    assert build_reward("background-modes")(images, [""] * 4).scores.tolist() == [1.0, 0.0, 1.0, 0.0]
    reward = build_reward("background-modes", options={"background-modes": {"colours": "gray", "high": "2",
                                                                            "low": "-1"}})
    assert reward(images, [""] * 4).scores.tolist() == [-1.0, 2.0, -1.0, -1.0]
    reward = build_reward("background-modes", options={"background-modes": {"colours": ["brown", "black"]}})
    assert reward(images, [""] * 4).scores.tolist() == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("colours", ["black,pink", "", "white,white"])
def test_background_modes_refuses_unknown_or_repeated_colours(colours):
    with pytest.raises(DagError, match="valid options: black, gray, white, brown"):
        build_reward("background-modes", options={"background-modes": {"colours": colours}})


def test_prompt_set_without_backgrounds():
    prompts = [p.prompt for p in load_prompts("shapes-no-background")]
    assert len(prompts) == len(dataset.COLOURS) * len(dataset.SHAPES) == 21
    assert "a red circle" in prompts and "an orange triangle" in prompts
    for p in prompts:
        parsed = dataset.parse_caption(p)
        assert parsed.background is None and parsed.size is None and parsed.colour and parsed.shape


def test_effective_beta_follows_the_reduction():
    assert modes.effective_beta(50.0, "mean", 256) == 12800.0
    assert modes.effective_beta(50.0, "sum", 256) == 50.0
    with pytest.raises(ValueError, match="mean, sum"):
        modes.effective_beta(1.0, "max", 4)


def test_target_shares_hand_computed():
    base = {"black": 0.2, "gray": 0.3, "white": 0.1, "brown": 0.4}
    values = {"black": 1.0, "gray": 0.0, "white": 1.0, "brown": 0.0}
    assert modes.target_shares(base, values, 0.0) == pytest.approx(base)
    # β = ln 2 doubles the rewarded weights: 0.4, 0.3, 0.2, 0.4 over 1.3
    got = modes.target_shares(base, values, math.log(2))
    assert got == pytest.approx({"black": 0.4 / 1.3, "gray": 0.3 / 1.3, "white": 0.2 / 1.3, "brown": 0.4 / 1.3})
    # a very sharp target: the base restricted to the rewarded backgrounds, without overflow
    sharp = modes.target_shares({**base, "gray": 0.0}, values, 12800.0)
    assert sharp == pytest.approx({"black": 2 / 3, "gray": 0.0, "white": 1 / 3, "brown": 0.0})


def test_tv_distance_and_modes_kept():
    p = {"black": 0.5, "white": 0.5, "gray": 0.0}
    q = {"black": 0.9, "white": 0.05, "gray": 0.05}
    assert modes.tv_distance(p, q) == pytest.approx(0.5 * (0.4 + 0.45 + 0.05))
    assert modes.tv_distance(p, p) == 0.0
    target = {"black": 2 / 3, "white": 1 / 3, "gray": 0.0}
    assert modes.modes_kept(q, target, ["black", "white"]) == (1, 2)  # white 0.05 < ½ · 1/3
    assert modes.modes_kept(p, target, ["black", "white", "gray"]) == (2, 2)  # gray has no target share


def test_mode_report_per_prompt_and_mean():
    labels = {"a": ["black"] * 3 + ["white"], "b": ["gray", "gray"]}
    targets = {"a": {"black": 0.5, "white": 0.5, "gray": 0.0, "brown": 0.0},
               "b": {"black": 1.0, "white": 0.0, "gray": 0.0, "brown": 0.0}}
    r = modes.mode_report(labels, targets, ["black", "white"])
    assert r["per_prompt"]["a"]["shares"] == {"black": 0.75, "gray": 0.0, "white": 0.25, "brown": 0.0}
    assert r["per_prompt"]["a"]["tv"] == pytest.approx(0.25) and r["per_prompt"]["b"]["tv"] == pytest.approx(1.0)
    assert (r["modes_kept"], r["modes_possible"]) == (2, 3)  # a keeps both, b loses its only one
    assert r["tv"] == pytest.approx(0.625) and r["shares"]["gray"] == pytest.approx(0.5)
    # among the rewarded backgrounds: a splits 0.75 / 0.25 against 0.5 / 0.5; b has no rewarded sample at all
    assert r["per_prompt"]["a"]["split_tv"] == pytest.approx(0.25) and r["per_prompt"]["b"]["split_tv"] == 1.0
    assert r["split_tv"] == pytest.approx(0.625)


def test_split_tv_ignores_the_reward_level():
    target = {"black": 0.6, "white": 0.4, "gray": 0.0}
    low = {"black": 0.3, "white": 0.2, "gray": 0.5}  # half the samples rewarded, split as the target
    assert modes.split_tv(low, target, ["black", "white"]) == pytest.approx(0.0)
    assert modes.tv_distance(low, target) == pytest.approx(0.5)  # the full TV is the unrewarded share
    one_mode = {"black": 0.9, "white": 0.0, "gray": 0.1}
    assert modes.split_tv(one_mode, target, ["black", "white"]) == pytest.approx(0.4)


def test_sample_backgrounds_reads_every_sample(tiny_model):
    got = modes.sample_backgrounds(tiny_model, ["a red circle", "a blue square"], 3, steps=2, guidance=1.0,
                                   eta=1.0, batch_size=2)
    assert list(got) == ["a red circle", "a blue square"] and all(len(v) == 3 for v in got.values())
    assert all(b in dataset.BACKGROUNDS for v in got.values() for b in v)
    again = modes.sample_backgrounds(tiny_model, ["a red circle"], 3, steps=2, guidance=1.0, eta=1.0, batch_size=3)
    assert again["a red circle"] == got["a red circle"]  # a sample depends on its seed only, not on the batch
    base = {p: modes.shares(v, modes.background_names()) for p, v in got.items()}
    targets = modes.targets_for(base, {"black": 1.0, "white": 1.0, "gray": 0.0, "brown": 0.0}, 0.0)
    assert all(targets[p] == pytest.approx(base[p]) for p in base)  # β = 0: the target is the base model
    assert np.isclose(sum(targets["a blue square"].values()), 1.0)


# --- the exact target -------------------------------------------------------------------------------------------

VALUES = {"black": 1.0, "white": 1.0, "gray": 0.0, "brown": 0.0}
BASE = {"a": {"black": 0.1, "white": 0.3, "gray": 0.4, "brown": 0.2},
        "b": {"black": 0.5, "white": 0.0, "gray": 0.5, "brown": 0.0}}


def test_exact_target_and_log_z_by_hand():
    """β_eff = ln 4: prompt a, Z = 0.1·4 + 0.3·4 + 0.4 + 0.2 = 2.2, p* = (0.4, 1.2, 0.4, 0.2)/2.2, E[r] = 1.6/2.2;
    prompt b, Z = 0.5·4 + 0.5 = 2.5, p* = (0.8, 0, 0.2, 0), E[r] = 0.8."""
    a = modes.exact_target(BASE["a"], VALUES, math.log(4))
    assert a["log_z"] == pytest.approx(math.log(2.2), abs=1e-12)
    for b, want in {"black": 2 / 11, "white": 6 / 11, "gray": 2 / 11, "brown": 1 / 11}.items():
        assert a["p_star"][b] == pytest.approx(want, abs=1e-12)
    assert a["expected_reward"] == pytest.approx(8 / 11, abs=1e-12)
    b = modes.exact_target(BASE["b"], VALUES, math.log(4))
    assert b["log_z"] == pytest.approx(math.log(2.5), abs=1e-12)
    assert b["p_star"] == pytest.approx({"black": 0.8, "white": 0.0, "gray": 0.2, "brown": 0.0}, abs=1e-12)
    assert b["expected_reward"] == pytest.approx(0.8, abs=1e-12)
    base_reward = modes.expected_reward(BASE["a"], VALUES)
    assert base_reward < a["expected_reward"] < 1.0  # strictly between the base model and "always rewarded"


def test_target_report_of_a_run_by_hand():
    """A run putting everything on white for prompt a: TV = ½(2 + 5 + 2 + 1)/11 = 5/11, gap 1 − 8/11 = 3/11,
    split white 1 against the target's 3/4; prompt b on its target: TV 0, gap 0."""
    run = {"a": {"black": 0.0, "white": 1.0, "gray": 0.0, "brown": 0.0},
           "b": {"black": 0.8, "white": 0.0, "gray": 0.2, "brown": 0.0}}
    report = modes.target_report(run, BASE, VALUES, math.log(4), ("black", "white"))
    a = report["per_prompt"]["a"]
    assert a["tv"] == pytest.approx(5 / 11, abs=1e-12) and a["reward_gap"] == pytest.approx(3 / 11, abs=1e-12)
    assert a["split"] == {"black": 0.0, "white": 1.0}
    assert a["target_split"] == pytest.approx({"black": 0.25, "white": 0.75}, abs=1e-12)
    assert report["per_prompt"]["b"]["tv"] == pytest.approx(0.0, abs=1e-12)
    assert report["tv"] == pytest.approx(5 / 22, abs=1e-12)
    assert report["reward_gap"] == pytest.approx(3 / 22, abs=1e-12)
    assert report["split"] == pytest.approx({"black": 0.5, "white": 0.5}, abs=1e-12)


@pytest.mark.parametrize("model", ["tiny", "tiny-flow"])
def test_exact_target_presets_put_rewarded_odds_times_four(model):
    """β_eff = D·β with the model's own latent size D (read from its configs) is ln 4 in the preset."""
    import json

    from dagcli.builtin import PRETRAINED_DIRS
    from dagcli.config import load_config

    config = load_config(f"examples/configs/{model}-modes-exact-target.toml")
    folder = PRETRAINED_DIRS[model]
    vae = json.loads((folder / "vae" / "config.json").read_text())
    denoiser = json.loads((folder / ("unet" if model == "tiny" else "transformer") / "config.json").read_text())
    dims = vae["latent_channels"] * denoiser["sample_size"] ** 2
    beta_eff = modes.effective_beta(config.dag.beta, config.train.reduction, dims)
    assert beta_eff == pytest.approx(math.log(4), rel=1e-6)
    assert config.dag.beta == pytest.approx(modes.beta_for_odds(4, config.train.reduction, dims), rel=1e-6)
    assert config.reward.spec == "background-modes"
