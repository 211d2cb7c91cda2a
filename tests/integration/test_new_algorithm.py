"""A new algorithm is its own module and one registry entry: written here, outside the package, with a settings
section of its own, it trains through `dag train`, its section's defaults, checks and saved values work, and a
resumed run equals an uninterrupted one — with no file of `src/dagcli` touched.

The algorithm: reward-weighted log-likelihood on transitions, loss = −scale · (r − mean r) · log π_θ(step), the
rewards centred over the epoch (`centre = "epoch"`) or not at all (`"none"`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from dagcli.algorithms import ALGORITHMS, AlgorithmInfo, register_algorithm
from dagcli.algorithms.base import LoraOnly
from dagcli.algorithms.settings import Section
from dagcli.config import load_config
from dagcli.errors import DagError
from helpers.cli import run_cli, write_tiny_config

NAME = "weighted-likelihood"


@dataclass(frozen=True)
class WeightedLikelihoodConfig:
    scale: float = 1.0  # multiplies the loss
    centre: str = "epoch"  # "epoch": rewards minus the epoch's mean | "none": rewards as they are


SECTION = Section("weighted", WeightedLikelihoodConfig, "weighted likelihood: scale, centring",
                  positive=("scale",), choices={"centre": ("epoch", "none")})
SEEN: list[dict] = []  # per micro-batch: the weights and log-probs the loss was computed from


class WeightedLikelihood(LoraOnly):
    name = NAME

    def prepare(self, batch, dist) -> None:
        rewards = batch.rewards.float()
        centre = dist.gather_floats(rewards).mean() if self.settings.centre == "epoch" else 0.0
        batch.advantages = rewards - centre

    def loss(self, mb, policy, batch, epoch: int):
        weight = batch.advantages[mb.traj_index].to(mb.x.device)
        log_prob = policy.step.log_prob
        SEEN.append({"weight": weight.clone(), "traj": mb.traj_index.clone(), "scale": self.settings.scale})
        return -self.settings.scale * weight * log_prob, {}


INFO = AlgorithmInfo(NAME, SECTION, "reward-weighted likelihood (an algorithm written outside the package)", 1,
                     lambda settings, ctx: WeightedLikelihood(settings, ctx))


@pytest.fixture
def registered():
    """The algorithm registered for one test; the registry (and so `Config`) as before afterwards."""
    register_algorithm(INFO)
    SEEN.clear()
    yield
    del ALGORITHMS[NAME]


def _config(tmp_path, model_dir, **weighted):
    return write_tiny_config(tmp_path, model_dir, ["a red circle", "a blue square"], sampling={"batch_size": 4},
                             train={"algorithm": NAME}, weighted=weighted, lora={"init": "true"},
                             output={"checkpoint_every": 1, "keep_last": 3})


def test_it_trains_with_its_own_section(registered, tmp_path, tiny_pipeline_dir, capsys):
    cfg = _config(tmp_path, tiny_pipeline_dir, scale=0.5)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", cfg, "--epochs", "1", "-o", run], capsys)
    assert code == 0, err
    assert load_config(run / "config.toml").weighted == WeightedLikelihoodConfig(scale=0.5, centre="epoch")
    assert "[weighted]" in (run / "config.toml").read_text()
    # the engine called its loss with the section's values and the epoch-centred rewards
    assert SEEN and all(s["scale"] == 0.5 for s in SEEN)
    per_trajectory = {}
    for s in SEEN:
        per_trajectory.update(zip(s["traj"].tolist(), s["weight"].tolist(), strict=True))
    assert sorted(per_trajectory) == list(range(4))  # one sampler call of 4, every trajectory trained
    assert abs(sum(per_trajectory.values())) < 1e-5  # r minus the epoch's mean
    assert len(set(per_trajectory.values())) > 1
    lora = load_file(run / "checkpoints" / "step-000001" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if ".lora.up." in k)  # it trained


def test_its_checks_join_every_other_problem_in_one_message(registered, tmp_path, tiny_pipeline_dir, capsys):
    cfg = _config(tmp_path, tiny_pipeline_dir, scale=-1.0, centre="median")
    code, _, err = run_cli(["train", "--config", cfg, "--epochs", "1", "--set", "train.learning_rate=-1",
                            "-o", tmp_path / "run"], capsys)
    assert code == 2 and "Traceback" not in err
    text = " ".join(err.split())
    assert "weighted.scale = -1.0: must be positive" in text
    assert "weighted.centre = 'median': valid options: epoch, none" in text
    assert "train.learning_rate" in text
    assert not (tmp_path / "run").exists()


def test_resume_equals_uninterrupted(registered, tmp_path, tiny_pipeline_dir, capsys):
    cfg = _config(tmp_path, tiny_pipeline_dir, centre="none")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["train", "--config", cfg, "--epochs", "2", "-o", a], capsys)[0] == 0
    assert run_cli(["train", "--config", cfg, "--epochs", "1", "-o", b], capsys)[0] == 0
    assert run_cli(["train", "--config", cfg, "--epochs", "2", "-o", b, "--resume"], capsys)[0] == 0
    wa = load_file(a / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors")
    wb = load_file(b / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_taken_names_and_sections_are_refused(registered):
    with pytest.raises(DagError, match="already registered"):
        register_algorithm(INFO)
    other = Section("grpo", WeightedLikelihoodConfig, "a second [grpo]")
    with pytest.raises(DagError, match=r"\[grpo\] already belongs to grpo"):
        register_algorithm(AlgorithmInfo("other", other, "", 1, INFO.build))


def test_the_registry_and_config_are_as_before_without_it(tmp_path, tiny_pipeline_dir):
    assert NAME not in ALGORITHMS
    with pytest.raises(DagError, match=r"unknown section \[weighted\]"):
        load_config(_config(tmp_path, tiny_pipeline_dir))
