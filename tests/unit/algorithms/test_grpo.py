"""GRPO: group advantages, the surrogate and KL terms against hand-computed values, the reference step with the LoRA
disabled, prompt groups, exact resume and config errors."""

from __future__ import annotations

import dataclasses
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from dagcli.algorithms.base import MicroBatch, PolicyOutput
from dagcli.algorithms.grpo import Grpo, group_advantages, kl_to_reference, zero_std_fraction
from dagcli.algorithms.grpo_settings import GrpoConfig
from dagcli.config import load_config, replace
from dagcli.kernels.gaussian import StepOutput
from dagcli.rollout import draw_prompts
from helpers.cli import run_cli, write_tiny_config


# --- advantages ----------------------------------------------------------------------------------------------
def test_group_advantages_per_group_std_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    adv = group_advantages(rewards, groups, "group", eps=1e-4, clip=5.0)
    std = math.sqrt(2 / 3)  # population std of 1, 2, 3
    expected = [-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0, 0.0, 0.0, 0.0]  # equal rewards, a lone member: 0
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)


def test_group_advantages_global_std_uses_every_reward():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    std = statistics.pstdev([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 4.0])
    adv = group_advantages(rewards, groups, "global", eps=1e-4, clip=5.0)
    expected = [-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0, 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)
    # with another process's rewards in the pool, only the divisor changes
    pool = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 4.0, 10.0, -10.0])
    std_all = statistics.pstdev(pool.tolist())
    adv = group_advantages(rewards, groups, "global", eps=1e-4, clip=5.0, all_rewards=pool)
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 0.0, 1.0]) / (std_all + 1e-4), rtol=0, atol=1e-6)


def test_group_advantages_eps_and_clip():
    # a group spread by 2e-4: mean 1e-4, std 1e-4, so ±1e-4 / (1e-4 + eps) = ±0.5 with eps = 1e-4
    adv = group_advantages(torch.tensor([0.0, 2e-4]), torch.tensor([3, 3]), "group", eps=1e-4, clip=5.0)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]), rtol=0, atol=1e-6)
    adv = group_advantages(torch.tensor([0.0, 2e-4]), torch.tensor([3, 3]), "group", eps=1e-4, clip=0.25)
    torch.testing.assert_close(adv, torch.tensor([-0.25, 0.25]))


def test_zero_std_fraction_counts_flat_groups():
    assert zero_std_fraction(torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0]), torch.tensor([0, 0, 1, 1, 2])) == pytest.approx(
        2 / 3)


# --- the loss of a micro-batch ---------------------------------------------------------------------------------
def test_kl_term_hand_computed():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    std = torch.tensor([2.0, 1.0])
    # row 0: 1/(2·4), 4/(2·4) -> 0.125, 0.5 ; row 1: 0, 9/2
    torch.testing.assert_close(kl_to_reference(mean, ref, std, "mean"), torch.tensor([0.3125, 2.25]))
    torch.testing.assert_close(kl_to_reference(mean, ref, std, "sum"), torch.tensor([0.625, 4.5]))


def test_kl_term_is_zero_without_gradient_on_a_deterministic_step():
    """σ = 0 (the flow DDIM sampler's last step, whose log-probs are 0): the row's KL is 0 and its gradient 0, not
    inf or NaN; the stochastic row keeps the value above."""
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    kl = kl_to_reference(mean, ref, torch.tensor([2.0, 0.0]), "mean")
    torch.testing.assert_close(kl.detach(), torch.tensor([0.3125, 0.0]))
    kl.sum().backward()  # row 0: (μ − μ_ref)/(σ²·D) = [1, 2]/8
    torch.testing.assert_close(mean.grad, torch.tensor([[0.125, 0.25], [0.0, 0.0]]))


def _micro_batch(log_pf_old):
    n = len(log_pf_old)
    return MicroBatch(traj_index=torch.arange(n), step_index=torch.zeros(n, dtype=torch.long),
                      x=torch.zeros(n, 2), x_next=torch.zeros(n, 2), cond=None, prompts=[""] * n,
                      log_pf_old=log_pf_old, out_old=torch.zeros(n, 2), terminal=torch.zeros(n, dtype=torch.bool))


def test_loss_is_surrogate_plus_weighted_kl_hand_computed():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    ref = StepOutput(prev_sample=None, log_prob=None, mean=torch.tensor([[0.0, 0.0], [0.0, 3.0]]),
                     std=torch.tensor([2.0, 1.0]), pred_x0=None)
    ctx = SimpleNamespace(reduction="mean", reference_step=lambda mb: ref)
    algo = Grpo(GrpoConfig(clip_range=0.05, kl_weight=0.1), ctx)
    batch = SimpleNamespace(advantages=torch.tensor([1.0, -1.0]))
    log_prob = torch.tensor([0.1, 0.1], requires_grad=True)
    step = StepOutput(prev_sample=None, log_prob=log_prob, mean=mean, std=torch.tensor([2.0, 1.0]), pred_x0=None)
    loss, logs = algo.loss(_micro_batch(torch.zeros(2)), PolicyOutput(out=None, step=step), batch, epoch=0)
    # ρ = e^0.1 = 1.10517 > 1.05: A = 1 -> max(-1.10517, -1.05) = -1.05 ; A = -1 -> max(1.10517, 1.05) = 1.10517
    surrogate = torch.tensor([-1.05, math.exp(0.1)])
    torch.testing.assert_close(loss, surrogate + 0.1 * torch.tensor([0.3125, 2.25]))
    assert logs["clipfrac"] == 1.0 and logs["kl_loss"] == pytest.approx((0.3125 + 2.25) / 2)
    loss.sum().backward()
    assert log_prob.grad[0] == 0  # clipped side: no policy gradient
    assert log_prob.grad[1] == pytest.approx(math.exp(0.1))  # d(−A·ρ)/d log π = −A·ρ


def test_no_reference_step_without_kl():
    def fail(mb):
        raise AssertionError("the reference was computed")

    algo = Grpo(GrpoConfig(kl_weight=0.0), SimpleNamespace(reduction="mean", reference_step=fail))
    step = StepOutput(prev_sample=None, log_prob=torch.zeros(1), mean=torch.zeros(1, 2), std=torch.ones(1),
                      pred_x0=None)
    loss, logs = algo.loss(_micro_batch(torch.zeros(1)), PolicyOutput(out=None, step=step),
                           SimpleNamespace(advantages=torch.tensor([2.0])), epoch=0)
    assert loss.item() == -2.0 and "kl_loss" not in logs


class TwoRanks:
    """A stand-in for `Dist` on rank 0 of two processes: rank 1 holds `other` rewards."""

    def __init__(self, other):
        self.other = other

    def gather_floats(self, values):
        return torch.cat([values.float(), self.other])


def test_prepare_normalises_by_the_std_over_every_process():
    algo = Grpo(GrpoConfig(std="global"), SimpleNamespace())
    batch = SimpleNamespace(rewards=torch.tensor([0.0, 2.0, 1.0, 1.0]), groups=torch.tensor([0, 0, 1, 1]),
                            advantages=None, traj=None)
    algo.prepare(batch, TwoRanks(torch.tensor([4.0, 8.0])))
    std = statistics.pstdev([0.0, 2.0, 1.0, 1.0, 4.0, 8.0])
    torch.testing.assert_close(batch.advantages, torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (std + 1e-4))
    assert algo.epoch_logs(0)["zero_std_groups"] == 0.5


@pytest.mark.parametrize("groups, expected_means", [
    ("call", [1.0, 1.0, 3.0, 3.0, 5.0, 5.0]),  # each sampler call's pair on its own
    ("prompt", [2.0, 2.0, 2.0, 2.0, 5.0, 5.0]),  # prompt "a" drawn by two calls: its four samples pooled
])
def test_prompt_pooling_groups_every_sample_of_a_prompt(groups, expected_means):
    """A prompt drawn by two sampler calls: with grpo.groups = "prompt" its samples form one group, as
    Flow-GRPO's per-prompt stat tracker pools them; the std is each group's own here, by hand."""
    rewards = [0.0, 2.0, 2.0, 4.0, 5.0, 5.0]
    algo = Grpo(GrpoConfig(std="group", groups=groups), SimpleNamespace())
    batch = SimpleNamespace(rewards=torch.tensor(rewards), groups=torch.tensor([0, 0, 1, 1, 2, 2]),
                            advantages=None, traj=SimpleNamespace(prompts=["a", "a", "a", "a", "b", "b"]))
    algo.prepare(batch, TwoRanks(torch.tensor([])))
    members = {"call": [[0, 1], [2, 3], [4, 5]], "prompt": [[0, 1, 2, 3], [4, 5]]}[groups]
    std = {i: statistics.pstdev([rewards[j] for j in g]) for g in members for i in g}
    expected = [(r - m) / (std[i] + 1e-4) for i, (r, m) in enumerate(zip(rewards, expected_means, strict=True))]
    torch.testing.assert_close(batch.advantages, torch.tensor(expected, dtype=torch.float32))


# --- prompt groups ---------------------------------------------------------------------------------------------
def test_draw_prompts_repeats_one_draw_per_group():
    g = torch.Generator().manual_seed(3)
    idx = draw_prompts(10, 8, 4, g)
    assert idx[:4].unique().numel() == 1 and idx[4:].unique().numel() == 1
    expected = torch.randint(10, (2,), generator=torch.Generator().manual_seed(3)).repeat_interleave(4)
    assert torch.equal(idx, expected)
    # group size 1 draws exactly as the sampler always has (the other algorithms' runs do not move)
    assert torch.equal(draw_prompts(10, 8, 1, torch.Generator().manual_seed(3)),
                       torch.randint(10, (8,), generator=torch.Generator().manual_seed(3)))


@pytest.fixture
def grpo_config(tmp_path, tiny_pipeline_dir):
    return write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle", "a blue square", "a green triangle"],
                             sampling={"batch_size": 4, "batches_per_epoch": 2},
                             train={"algorithm": "grpo"}, grpo={"group_size": 2},
                             lora={"init": "true"}, output={"checkpoint_every": 1, "keep_last": 2})


def test_collect_samples_whole_groups_and_keeps_them_after_a_drop(grpo_config, tmp_path):
    from dagcli.trainer import Trainer

    trainer = Trainer(replace(load_config(grpo_config), "output", dir=str(tmp_path / "g")), ["a", "b", "c"])
    score = trainer.rollout.score

    def one_nan(images, prompts):
        scores, components = score(images, prompts)
        scores[1::4] = float("nan")  # the second member of the first group of each sampler call
        return scores, components

    trainer.rollout.score = one_nan
    batch, _ = trainer.collect(0)
    assert batch.groups.tolist() == [0, 1, 1, 2, 3, 3]  # 2 calls x 2 groups of 2, one member dropped per call
    p = batch.traj.prompts
    assert p[1] == p[2] and p[4] == p[5]
    assert not torch.equal(batch.traj.latents[1, 0], batch.traj.latents[2, 0])  # own noise per member
    assert batch.advantages[0] == 0 and batch.advantages[3] == 0  # a group left with one member


def test_reference_step_is_the_base_model_and_leaves_training_untouched(grpo_config, tmp_path):
    from dagcli.trainer import Trainer

    cfg = replace(load_config(grpo_config), "output", dir=str(tmp_path / "r"))
    trainer = Trainer(cfg, ["a red circle", "a blue square"])
    batch, _ = trainer.collect(0)
    pairs = torch.tensor([[0, 0], [1, 2], [2, 3], [3, 1]])
    # zero-initialised LoRA: the policy is the base model, bit for bit
    loss, logs = trainer.micro_batch_loss(batch, pairs, epoch=0)
    assert logs["kl_loss"] == 0.0
    trainer.train_epoch(0, batch)  # the LoRA moves away from the base model
    lora = {n: p for n, p in trainer.raw_denoiser.named_parameters() if p.requires_grad}
    assert any(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)
    assert trainer.micro_batch_loss(batch, pairs, epoch=1)[1]["kl_loss"] > 0

    # the adapter switch between a forward and its backward leaves the LoRA's gradients as they were
    trainer.algorithm.settings = dataclasses.replace(trainer.algorithm.settings, kl_weight=0.0)

    def lora_grads(reference_in_between: bool):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer.micro_batch_loss(batch, pairs, epoch=1)
        if reference_in_between:
            assert not trainer.reference_step(_stored_micro_batch(batch, pairs)).mean.requires_grad
        loss.mean().backward()
        return {n: p.grad.clone() for n, p in lora.items()}

    plain, around = lora_grads(False), lora_grads(True)
    assert all(torch.equal(plain[n], around[n]) for n in plain)
    assert all(p.requires_grad for p in lora.values())  # the adapter switch gave the LoRA its gradients back
    with torch.no_grad():  # and the reference is the LoRA-free network: zeroing B gives the same step
        ref = trainer.reference_step(_stored_micro_batch(batch, pairs))
        for n, p in lora.items():
            if "lora_B" in n:
                p.zero_()
        out, _ = trainer.family.denoiser_fn(trainer.raw_denoiser, trainer.rollout.schedule, batch.traj.cond[pairs[:, 0]],
                                            trainer.config.sampling.guidance)(batch.traj.latents[pairs[:, 0], pairs[:, 1]],
                                                                   pairs[:, 1])
        step = trainer.family.step(trainer.rollout.schedule, pairs[:, 1], batch.traj.latents[pairs[:, 0], pairs[:, 1]],
                                   out, trainer.config.sampling.eta, prev=batch.traj.latents[pairs[:, 0], pairs[:, 1] + 1])
    assert torch.equal(ref.mean, step.mean) and torch.equal(ref.log_prob, step.log_prob)


def _stored_micro_batch(batch, pairs) -> MicroBatch:
    b, i = pairs[:, 0], pairs[:, 1]
    traj = batch.traj
    return MicroBatch(traj_index=b, step_index=i, x=traj.latents[b, i], x_next=traj.latents[b, i + 1],
                      cond=traj.cond[b], prompts=[traj.prompts[j] for j in b.tolist()], log_pf_old=traj.log_probs[b, i],
                      out_old=traj.out_guided[b, i], terminal=i == traj.num_steps - 1)


# --- runs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sets, needle", [
    (["--set", "grpo.group_size=3"], "sampling.batch_size = 4 does not divide into groups of grpo.group_size = 3"),
    (["--set", "grpo.group_size=1"], "grpo.group_size = 1: must be at least 2"),
    (["--set", "grpo.std=\"batch\""], "grpo.std = 'batch': valid options: global, group"),
    (["--set", "grpo.kl_weight=-1"], "grpo.kl_weight = -1.0: must not be negative"),
])
def test_bad_grpo_settings_are_one_line(grpo_config, tmp_path, capsys, sets, needle):
    code, _, err = run_cli(["train", "--config", grpo_config, "-o", tmp_path / "bad", *sets], capsys)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


# --- every family ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, sampler", [("tiny-random-sdxl", None), ("tiny-random-sd3", None),
                                            ("tiny-random-flux", None), ("tiny-random-sd3", "ddim")])
def test_grpo_trains_every_family_with_the_base_model_as_reference(model, sampler, tmp_path):
    """SDXL (DDIM) and the flow families (SDE step): the reference step is the family's own step with the LoRA off,
    KL exactly 0 at a zero-initialised LoRA, then positive once the LoRA has moved."""
    from dagcli.trainer import Trainer

    sampling = {"batch_size": 4} if sampler is None else {"batch_size": 4, "sampler": sampler}  # ddim: the last
    # step is deterministic, and every micro-batch holds one of it: the KL there must not be NaN
    cfg = write_tiny_config(tmp_path, model, ["a red circle", "a blue square"], sampling=sampling,
                            train={"algorithm": "grpo", "learning_rate": 5e-2}, grpo={"group_size": 2},
                            lora={"init": "true"}, output={"dir": str(tmp_path / "run")})
    trainer = Trainer(load_config(cfg), ["a red circle", "a blue square"])
    batch, _ = trainer.collect(0)
    pairs = torch.tensor([[0, 0], [1, 1], [2, 2], [3, trainer.config.sampling.steps - 1]])  # (trajectory, step)
    loss, logs = trainer.micro_batch_loss(batch, pairs, epoch=0)
    assert logs["kl_loss"] == 0.0 and torch.isfinite(loss).all()
    out = trainer.train_epoch(0, batch)
    assert math.isfinite(out["policy_loss"]) and out["grad_norm_lora"] > 0
    assert trainer.micro_batch_loss(batch, pairs, epoch=1)[1]["kl_loss"] > 0


@pytest.mark.parametrize("detach", [False, True])
def test_detach_uncond_reaches_the_policy_forward_only(detach, tmp_path, tiny_pipeline_dir, monkeypatch):
    """grpo.detach_uncond is what the trainer's policy forward asks the family for; sampling never detaches."""
    from dagcli.config import load_config
    from dagcli.trainer import Trainer

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle"], sampling={"batch_size": 2},
                            train={"algorithm": "grpo", "epochs": 1}, grpo={"group_size": 2, "detach_uncond": detach},
                            output={"dir": str(tmp_path / "run")})
    trainer = Trainer(load_config(cfg), ["a red circle"])
    family, seen = trainer.family, []
    original = type(family).denoiser_fn

    def recording(self, model, schedule, cond, guidance, detach_uncond=False):
        seen.append(detach_uncond)
        return original(self, model, schedule, cond, guidance, detach_uncond)

    monkeypatch.setattr(type(family), "denoiser_fn", recording)
    batch, _ = trainer.collect(0)
    assert seen and not any(seen)  # the rollout
    seen.clear()
    trainer.train_epoch(0, batch)
    assert seen and (True in seen) == detach  # the policy's forward; the base model's KL step never detaches
