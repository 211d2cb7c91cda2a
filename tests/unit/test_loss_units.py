"""The three loss units behind one loop, each with a real (test-only) user: what each epoch trains, that the
per-trajectory pass runs once, and that a zero learning rate leaves the LoRA as it was. Exact resume of every
unit: tests/cli/test_resume.py."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dagcli.config import epoch_sizes, load_config, replace
from helpers import unit_algorithms
from helpers.cli import write_tiny_config

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture
def units(monkeypatch):
    unit_algorithms.register(monkeypatch)


def _trainer(tmp_path, tiny_pipeline_dir, algorithm, learning_rate: float = 3e-2, **train):
    from dagcli.trainer import Trainer

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, PROMPTS, train={"algorithm": algorithm, **train},
                            lora={"init": "true"}, output={"dir": str(tmp_path / "run")})
    # a zero learning rate is refused from a preset: set after validation
    return Trainer(replace(load_config(cfg), "train", learning_rate=learning_rate), PROMPTS)


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.raw_denoiser.named_parameters() if "lora" in n}


def test_trajectory_unit_trains_every_step_once_after_one_pass_per_trajectory(units, tmp_path, tiny_pipeline_dir):
    trainer = _trainer(tmp_path, tiny_pipeline_dir, unit_algorithms.TRAJECTORY, epochs=2, timestep_fraction=0.5)
    trainer.train()
    algo = unit_algorithms.BUILT[unit_algorithms.TRAJECTORY][-1]
    n, steps = 3, 4  # 3 trajectories of 4 steps per epoch; timestep_fraction does not apply to whole trajectories
    assert len(algo.prepared) == 2  # once per epoch
    per_epoch = len(algo.trained) // 2
    assert per_epoch == n * steps
    for epoch in range(2):
        seen = Counter(algo.trained[epoch * per_epoch : (epoch + 1) * per_epoch])
        assert seen == Counter({(b, i): 1 for b in range(n) for i in range(steps)})
    for prepared in algo.prepared:
        log_pf = prepared["log_pf"]
        assert log_pf.shape == (n, steps) and torch.isfinite(log_pf).all()  # every step scored
    # at an epoch's start the policy is the one that sampled: Σ log-ratio = 0, so δ_b = −β r_b
    first = algo.prepared[0]
    torch.testing.assert_close(first["delta"], -unit_algorithms.BETA * first["rewards"], rtol=0, atol=1e-4)
    assert trainer.state.optimizer_steps == 2 * epoch_sizes(trainer.config).optimizer_steps


def test_sample_unit_renoises_each_final_latent_at_fresh_states(units, tmp_path, tiny_pipeline_dir):
    trainer = _trainer(tmp_path, tiny_pipeline_dir, unit_algorithms.SAMPLES, epochs=1)
    batch, _ = trainer.collect(0)
    items = trainer.unit.items(trainer, batch, 0)
    again = trainer.unit.items(trainer, batch, 0)
    assert torch.equal(items, again) and not torch.equal(items, trainer.unit.items(trainer, batch, 1))
    assert Counter(items[:, 0].tolist()) == {0: 4, 1: 4, 2: 4}  # steps · timestep_fraction = 4 draws per sample
    assert ((0 <= items[:, 1]) & (items[:, 1] < 4)).all() and len(set(items[:, 2].tolist())) == len(items)
    trainer.train_epoch(0, batch)
    algo = unit_algorithms.BUILT[unit_algorithms.SAMPLES][-1]
    assert sorted(algo.trained) == sorted(map(tuple, items[:, :2].tolist()))


@pytest.mark.parametrize("algorithm", [unit_algorithms.TRAJECTORY, unit_algorithms.SAMPLES])
def test_zero_learning_rate_leaves_the_lora_unchanged(units, tmp_path, tiny_pipeline_dir, algorithm):
    trainer = _trainer(tmp_path, tiny_pipeline_dir, algorithm, epochs=1, learning_rate=0.0)
    before = _lora(trainer)
    trainer.train()
    after = _lora(trainer)
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.state.optimizer_steps > 0


@pytest.mark.parametrize("algorithm, fraction, items, micro", [
    ("dag-db", 0.5, 6, 2),  # 3 trajectories x 2 of 4 steps, micro-batches of 4 (the last smaller)
    (unit_algorithms.TRAJECTORY, 0.5, 12, 3),  # every step of each trajectory
    (unit_algorithms.SAMPLES, 0.5, 6, 2),  # 2 fresh draws per final latent
])
def test_epoch_sizes_follow_the_unit(units, tmp_path, tiny_pipeline_dir, algorithm, fraction, items, micro):
    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, PROMPTS, train={"algorithm": algorithm})
    s = epoch_sizes(replace(load_config(cfg), "train", timestep_fraction=fraction))
    assert (s.items, s.micro_batches, s.accumulation) == (items, micro, 1 if items < 12 else 2)
