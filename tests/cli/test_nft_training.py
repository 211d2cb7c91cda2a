"""`--algorithm nft` in the engine: short runs on tiny-flow (rectified flow) and tiny (ε-prediction), a zero
learning rate that leaves the LoRA exactly as it was, the engine's loss on a micro-batch against
`nft.flow_nft_loss` computed here from the same tensors, and the sampling policy's refresh. Exact resume:
tests/cli/test_resume.py; the arithmetic itself: tests/unit/algorithms/test_nft.py."""

from __future__ import annotations

import pytest
import torch

from dagcli.algorithms import nft
from dagcli.algorithms.nft_settings import old_policy_decay
from dagcli.config import load_config, replace
from dagcli.models import lora_disabled, lora_swapped
from helpers.cli import run_cli, write_tiny_config

PROMPTS = ["a red circle", "a blue square"]


def _config(tmp_path, model, **sections):
    defaults = {"sampling": {"batch_size": 4, "guidance": 1.0}, "train": {"algorithm": "nft"},
                "nft": {"group_size": 2}, "lora": {"init": "true"}, "output": {"dir": str(tmp_path / "run")}}
    for name, keys in sections.items():
        defaults.setdefault(name, {}).update(keys)
    return write_tiny_config(tmp_path, model, PROMPTS, **defaults)


def _trainer(tmp_path, model, learning_rate: float = 3e-2, **sections):
    from dagcli.trainer import Trainer

    # a zero learning rate is refused from a preset: set after validation
    config = load_config(_config(tmp_path, model, **sections))
    return Trainer(replace(config, "train", learning_rate=learning_rate), PROMPTS)


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.raw_denoiser.named_parameters() if "lora_" in n}


@pytest.fixture(params=["tiny-flow", "tiny"])
def model(request, tiny_pipeline_dir):
    return "tiny-flow" if request.param == "tiny-flow" else str(tiny_pipeline_dir)


def test_two_epochs_train_and_sample_with_the_ode_by_default(model, tmp_path, capsys):
    cfg = _config(tmp_path, model)
    code, _, err = run_cli(["train", "--config", cfg, "--epochs", "2", "-o", tmp_path / "run"], capsys)
    assert code == 0, err
    saved = load_config(tmp_path / "run" / "config.toml")
    assert saved.sampling.eta == 0.0  # the algorithm's default: the deterministic sampler
    state = tmp_path / "run" / "checkpoints" / "step-000002" / "algorithm_state.safetensors"
    assert state.exists()


def test_zero_learning_rate_leaves_the_lora_exactly_unchanged(model, tmp_path):
    trainer = _trainer(tmp_path, model, learning_rate=0.0, train={"epochs": 2})
    before = _lora(trainer)
    trainer.train()
    after = _lora(trainer)
    assert before and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.state.optimizer_steps > 0


def test_engine_loss_equals_flow_nft_loss_by_hand(tmp_path):
    """v_θ, v_old, v_ref and x_t are recomputed here from the model and the schedule, not by the engine."""
    trainer = _trainer(tmp_path, "tiny-flow", nft={"group_size": 2, "kl_weight": 0.5, "strength": 0.7})
    trainer.train_epoch(0, trainer.collect(0)[0])  # θ moves away from the stored sampling policy
    batch, _ = trainer.collect(1)
    algo, s = trainer.algorithm, trainer.algorithm.settings
    idx = trainer.unit.items(trainer, batch, 1)[:4]
    loss, logs = trainer.unit.loss(trainer, batch, idx, 1)

    b, j = idx[:, 0], idx[:, 1]
    x0 = batch.traj.latents[b, -1]
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(k)))
                         for k in idx[:, 2].tolist()])
    sigma = trainer.rollout.schedule.sigmas[j]
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    raw, cond, family = trainer.raw_denoiser, batch.traj.cond[b], trainer.family

    def out(x):
        return family.denoiser_fn(raw, trainer.rollout.schedule, cond, 1.0)(x, j)[0]

    with torch.no_grad():
        with lora_swapped(raw, algo.old):
            v_old = out(x_t)
        with lora_disabled(raw):
            v_ref = out(x_t)
        v = out(x_t)
    r = batch.advantages[b]
    expected, _ = nft.flow_nft_loss(x0, noise, sigma, v, v_old, v_ref, r, s)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert logs["old_distance"] > 0  # the stored policy lags θ: the two branches differ


def test_r_is_the_group_normalised_reward_mapped_to_unit_interval(tmp_path):
    trainer = _trainer(tmp_path, "tiny-flow")
    batch, _ = trainer.collect(0)
    r = batch.advantages
    assert ((0 <= r) & (r <= 1)).all()
    for g in batch.groups.unique():
        members = batch.rewards[batch.groups == g].double()
        adv = (members - members.mean()) / (batch.rewards.double().std(unbiased=False) + 1e-4)
        torch.testing.assert_close(r[batch.groups == g].double(), (adv.clamp(-5, 5) / 10 + 0.5), rtol=0,
                                   atol=1e-6)


def test_the_sampling_policy_is_refreshed_after_each_epoch(tmp_path):
    """old ← d·old + (1 − d)·θ after each epoch, d = min(rate · optimiser steps, cap); the first old is the
    initial LoRA."""
    trainer = _trainer(tmp_path, "tiny-flow", nft={"group_size": 2, "old_decay_rate": 0.1})
    old = _lora(trainer)
    for epoch in (1, 2):
        trainer.train(until_epoch=epoch)
        d = old_policy_decay(trainer.state.optimizer_steps, 0, 0.1, 0.5)
        assert 0 < d <= 0.5
        theta = _lora(trainer)
        old = {k: d * old[k] + (1 - d) * theta[k] for k in old}
        assert trainer.algorithm.old.keys() == old.keys()
        for k, v in trainer.algorithm.old.items():
            torch.testing.assert_close(v, old[k], rtol=0, atol=1e-7)
        assert any(not torch.equal(old[k], theta[k]) for k in old)  # it lags θ


def test_the_defaults_line_credits_the_algorithm_with_the_sampler_settings_it_gives(tmp_path, capsys):
    """Without sampler settings nft samples with its own η 0 and guidance (`nft.guidance`), the model's for the rest;
    the line names each source with its own values."""
    code, _, err = run_cli(["train", "-m", "tiny-flow", "--algorithm", "nft", "--epochs", "1", "--batch-size", "2",
                            "--set", "nft.group_size=2", "--set", "sampling.batches_per_epoch=1",
                            "--train-batch-size", "10", "--device", "cpu", "-o", tmp_path / "run"], capsys)
    assert code == 0, err
    said = " ".join(err.split())  # however the terminal wraps it
    assert ("settings not given, from the defaults of model 'tiny-flow': prompts 'shapes', steps 10, resolution 32, "
            "reward 'compressibility', gradient_accumulation_steps 1; from the defaults of algorithm 'nft': "
            "guidance 1, eta 0") in said
    saved = load_config(tmp_path / "run" / "config.toml")
    assert (saved.sampling.eta, saved.sampling.guidance, saved.sampling.steps) == (0.0, 1.0, 10)


def test_a_run_that_sets_the_models_settings_hears_only_of_the_algorithms():
    from dagcli.config import fill_model_defaults

    given = ['model.name="tiny-flow"', 'train.algorithm="nft"', "nft.group_size=4", "nft.guidance=2.5",
             'sampling.prompts="shapes"', "sampling.steps=4", "sampling.resolution=32", 'reward.spec="compressibility"',
             "train.gradient_accumulation_steps=1"]
    cfg, said = fill_model_defaults(load_config(None, given))
    assert said == "settings not given, from the defaults of algorithm 'nft': guidance 2.5, eta 0"
    assert (cfg.sampling.guidance, cfg.sampling.eta) == (2.5, 0.0)
    assert fill_model_defaults(load_config(None, [*given, "sampling.guidance=3", "sampling.eta=0.7"]))[1] == ""


def test_eta_zero_is_refused_for_an_algorithm_that_needs_a_stochastic_sampler(tmp_path, capsys):
    cfg = _config(tmp_path, "tiny-flow")
    code, _, err = run_cli(["train", "--config", cfg, "--algorithm", "grpo", "--eta", "0", "-o", tmp_path / "r"],
                           capsys)
    assert code == 2 and "training needs a stochastic sampler, eta > 0" in err


def test_two_processes_train_nft_in_step(tmp_path, tiny_pipeline_dir):
    """torchrun, gloo: both processes sample with the same stored policy and end with the same LoRA."""
    from helpers.cli import train_two_processes

    cfg = _config(tmp_path, tiny_pipeline_dir, train={"epochs": 2})
    ranks = train_two_processes(cfg, tmp_path / "dumps")
    a, b = ranks[0]["lora"], ranks[1]["lora"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "algorithm_state.safetensors").exists()
