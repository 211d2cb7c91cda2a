"""GRPO as Flow-GRPO trains it: groups of trajectories per prompt, group-normalised advantages, the PPO clipped
surrogate on every trained step, and a KL penalty to the base model on the step means.

For trajectory i of a group g with terminal reward r_i:
    A_i = clip((r_i − mean_g r) / (std + ε), ±adv_clip)     std: the group's own, or of every reward of the epoch
and for each trained transition of it, with ρ = exp(log π_θ − log π_old) and the base model's step mean μ_ref
(the same network with its LoRA disabled):
    loss = max(−A_i·ρ, −A_i·clip(ρ, 1 ± clip_range)) + β_KL · reduce_dims((μ_θ − μ_ref)² / (2σ²))
The second term is the KL between the two Gaussian steps N(μ_θ, σ²) and N(μ_ref, σ²), which share σ.
"""

from __future__ import annotations

import torch

from dagcli.algorithms import losses
from dagcli.algorithms.base import Context, LoraOnly, MicroBatch, PolicyOutput
from dagcli.kernels.gaussian import bcast, reduce_latent


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, std_mode: str, eps: float, clip: float,
                     all_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """[N] (r − mean of its group) / (std + eps), clipped to ±clip, computed in float64 and returned as float32.

    std (population, as numpy's): of each group's rewards (`std_mode` = "group"), or of `all_rewards` ("global":
    every process's rewards of the epoch; this process's `rewards` when None). A group whose rewards are all equal
    gets zero advantages; a group left with one member (the others dropped for a NaN reward) too.
    """
    r = rewards.detach().double().cpu()
    _, inverse = torch.unique(groups.cpu(), return_inverse=True)
    n_groups = int(inverse.max()) + 1 if len(inverse) else 0
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, r) / count
    deviation = r - mean[inverse]
    if std_mode == "group":
        var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, deviation**2) / count
        std = var.sqrt()[inverse]
    else:
        pool = (r if all_rewards is None else all_rewards.detach().double().cpu())
        std = pool.std(unbiased=False) if pool.numel() else torch.tensor(0.0, dtype=torch.float64)
    return (deviation / (std + eps)).clamp(-clip, clip).float()


def zero_std_fraction(rewards: torch.Tensor, groups: torch.Tensor) -> float:
    """The fraction of groups whose rewards are all equal (they teach nothing but the KL term)."""
    ids = torch.unique(groups)
    if not len(ids):
        return 0.0
    flat = sum(int(rewards[groups == g].unique().numel() == 1) for g in ids.tolist())
    return flat / len(ids)


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, reduction: str) -> torch.Tensor:
    """[n] KL(N(μ_θ, σ²I) ‖ N(μ_ref, σ²I)) reduced over latent dims ("mean": Flow-GRPO's; "sum": the true KL); 0, with
    no gradient, on a deterministic step (σ = 0: the flow DDIM sampler's last one, a pair of point masses whose
    log-probs are 0 by its convention, `dagcli.kernels.flow_ddim`), where the formula would divide by 0."""
    mean = mean.float()
    std = bcast(std.float(), mean)
    stochastic = std > 0
    elem = (mean - mean_ref.float().detach()) ** 2 / (2 * torch.where(stochastic, std, torch.ones_like(std)) ** 2)
    return reduce_latent(torch.where(stochastic, elem, torch.zeros_like(elem)), reduction)


def prompt_groups(prompts: list[str]) -> torch.Tensor:
    """[N] one group per distinct prompt, in order of first appearance."""
    order: dict[str, int] = {}
    return torch.tensor([order.setdefault(p, len(order)) for p in prompts], dtype=torch.long)


def groups_of(batch) -> torch.Tensor:
    """The batch's prompt groups; a batch built without them is grouped by prompt."""
    if batch.groups is not None:
        return batch.groups
    return prompt_groups(batch.traj.prompts)


class Grpo(LoraOnly):
    """GRPO with settings from the `[grpo]` section; the LoRA only, no extra networks."""

    name = "grpo"

    def __init__(self, settings, ctx: Context):
        super().__init__(settings, ctx)
        self.detach_uncond = settings.detach_uncond  # read by the trainer's policy forward
        self._logs: dict[str, float] = {}

    def prepare(self, batch, dist) -> None:
        """Advantages within this process's groups (groups never span processes); the global std over every
        process's rewards."""
        s = self.settings
        groups = groups_of(batch) if s.groups == "call" else prompt_groups(batch.traj.prompts)
        pool = dist.gather_floats(batch.rewards) if s.std == "global" else None
        batch.advantages = group_advantages(batch.rewards, groups, s.std, s.std_eps, s.adv_clip, pool)
        self._logs = {"zero_std_groups": zero_std_fraction(batch.rewards, groups),
                      "advantage_abs": float(batch.advantages.abs().mean()) if batch.advantages.numel() else 0.0}

    def epoch_logs(self, epoch: int) -> dict:
        return dict(self._logs)

    def loss(self, mb: MicroBatch, policy: PolicyOutput, batch, epoch: int):
        s = self.settings
        adv = batch.advantages[mb.traj_index].to(mb.x.device)
        log_prob = policy.step.log_prob
        loss = losses.clipped_surrogate(adv, log_prob, mb.log_pf_old, s.clip_range)
        ratio = torch.exp(log_prob.detach() - mb.log_pf_old)
        logs = {"policy_loss": loss.detach().mean(), "clipfrac": ((ratio - 1).abs() > s.clip_range).float().mean()}
        if s.kl_weight > 0:
            ref = self.ctx.reference_step(mb)
            kl = kl_to_reference(policy.step.mean, ref.mean, policy.step.std, self.ctx.reduction)
            loss = loss + s.kl_weight * kl
            logs["kl_loss"] = kl.detach().mean()
        return loss, logs
