"""DiffusionNFT's loss (Zheng et al., arXiv 2509.16117; NVlabs/DiffusionNFT) as small functions of tensors.

No log-probabilities: the clean final latents x0 of the sampling ("old") policy are re-noised at fresh times,
    x_t = (1 − t)·x0 + t·ε                                                    (flow matching, SD3 / Flux)
and the current prediction v_θ is mixed with the frozen sampling one v_old into two implicit policies
    v⁺ = (1 − λ)·v_old + λ·v_θ        v⁻ = (1 + λ)·v_old − λ·v_θ
whose clean-image predictions x̂0(v) = x_t − t·v are pulled to x0 in proportion to the optimality probability r
of the sample (v⁺) and to 1 − r (v⁻). Per sample, with D latent dimensions and the adaptive weights
w± = max(mean_D |x̂0(v±) − x0|, floor) held constant,
    loss = adv_clip · [r·mean_D (x̂0(v⁺) − x0)² / w⁺ + (1 − r)·mean_D (x̂0(v⁻) − x0)² / w⁻] / λ
         + kl_weight · mean_D (v_θ − v_ref)²
v_ref is the base model (the LoRA disabled). Everything is written for any x̂0 = a·x_t + b·out affine in the
model's output: flow velocity (a = 1, b = −t), ε- or v-prediction on a VP schedule (see docs/algorithms.md, DiffusionNFT).
"""

from __future__ import annotations

import torch

from dagcli.algorithms.base import LoraOnly
from dagcli.algorithms.grpo import group_advantages
from dagcli.kernels.forward import flow_noised, x0_coefficients
from dagcli.kernels.gaussian import bcast


# --- rewards -> r -------------------------------------------------------------------------------------
def to_probability(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """[n] r = A / (2·adv_clip) + ½ clamped to [0, 1] (scripts/train_nft_sd3.py: normalised advantages)."""
    return (advantages.clamp(-adv_clip, adv_clip) / (2.0 * adv_clip) + 0.5).clamp(0.0, 1.0)


def optimality_probability(rewards: torch.Tensor, groups: torch.Tensor, std_mode: str, eps: float,
                           adv_clip: float, all_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """[n] r ∈ [0, 1] of each sample: its group-normalised reward (as GRPO's, clipped to ±adv_clip) mapped
    linearly, so the group mean goes to ½ and ±adv_clip standard deviations to 1 and 0."""
    return to_probability(group_advantages(rewards, groups, std_mode, eps, adv_clip, all_rewards), adv_clip)


# --- forward process and x̂0: `dagcli.kernels.forward` (flow_noised, vp_noised, x0_coefficients) ------------
def predict_x0(x_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x̂0 = a·x_t + b·out in float32."""
    return bcast(a, x_t).float() * x_t.float() + bcast(b, x_t).float() * out.float()


# --- the loss ------------------------------------------------------------------------------------------
def implicit_policies(out: torch.Tensor, out_old: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v⁺, v⁻) = ((1 − λ)·v_old + λ·v_θ, (1 + λ)·v_old − λ·v_θ); v_old is data (never differentiated)."""
    old = out_old.detach().float()
    return (1 - strength) * old + strength * out.float(), (1 + strength) * old - strength * out.float()


def adaptive_weight(x0_hat: torch.Tensor, x0: torch.Tensor, floor: float) -> torch.Tensor:
    """[n] max(mean over latent dims of |x̂0 − x0|, floor), in float64 and held constant."""
    return (x0_hat.detach().double() - x0.double()).abs().flatten(1).mean(1).clamp(min=floor)


def weighted_error(x0_hat: torch.Tensor, x0: torch.Tensor, floor: float) -> torch.Tensor:
    """[n] mean over latent dims of (x̂0 − x0)², divided by the adaptive weight."""
    w = adaptive_weight(x0_hat, x0, floor).float()
    return ((x0_hat - x0.float()) ** 2).flatten(1).mean(1) / w


def reference_distance(out: torch.Tensor, out_ref: torch.Tensor) -> torch.Tensor:
    """[n] mean over latent dims of (v_θ − v_ref)², the base model's output held constant."""
    return ((out.float() - out_ref.detach().float()) ** 2).flatten(1).mean(1)


def nft_loss(x0: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
             out_old: torch.Tensor, out_ref: torch.Tensor | None, r: torch.Tensor, strength: float,
             kl_weight: float, adv_clip: float, floor: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """([n] loss, logs) of DiffusionNFT for model outputs at x_t whose x̂0 = a·x_t + b·out (see the module
    docstring). `out_ref` may be None when kl_weight is 0."""
    pos, neg = implicit_policies(out, out_old, strength)
    r = r.detach().float().to(out.device)
    err_pos = weighted_error(predict_x0(x_t, a, b, pos), x0, floor)
    err_neg = weighted_error(predict_x0(x_t, a, b, neg), x0, floor)
    policy = adv_clip * (r * err_pos + (1 - r) * err_neg) / strength
    logs = {"policy_loss": policy.detach().mean(), "positive_error": err_pos.detach().mean(),
            "negative_error": err_neg.detach().mean(),
            "old_distance": reference_distance(out, out_old).detach().mean()}
    if kl_weight == 0:
        return policy, logs
    kl = reference_distance(out, out_ref)
    logs["kl_loss"] = kl.detach().mean()
    return policy + kl_weight * kl, logs


def flow_nft_loss(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, v: torch.Tensor, v_old: torch.Tensor,
                  v_ref: torch.Tensor | None, r: torch.Tensor, settings) -> tuple[torch.Tensor, dict]:
    """`nft_loss` for a flow-matching model: x_t = (1 − t)·x0 + t·ε, x̂0 = x_t − t·v; `settings` an NftConfig."""
    a, b = x0_coefficients("flow", t)
    s = settings
    return nft_loss(x0, flow_noised(x0, noise, t), a, b, v, v_old, v_ref, r, s.strength, s.kl_weight,
                    s.adv_clip, s.weight_floor)


# --- the algorithm on the samples unit ------------------------------------------------------------------
class Nft(LoraOnly):
    """DiffusionNFT with settings from the `[nft]` section, trained on the `samples` unit: each epoch's final
    latents (sampled with the stored "old" LoRA swapped in) re-noised at fresh states with fresh noise. The old
    LoRA is refreshed after each epoch and saved in checkpoints (`state_tensors`), so a resumed run samples with
    the same policy."""

    name = "nft"

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.old: dict[str, torch.Tensor] | None = None  # the sampling policy's LoRA tensors (None: the initial LoRA)
        self._logs: dict[str, float] = {}

    def sampling_policy(self, denoiser):
        """The denoiser with the old LoRA in it (a copy of the current one before the first refresh)."""
        from dagcli.models import lora_swapped, lora_tensors

        if self.old is None:
            self.old = lora_tensors(denoiser)
        return lora_swapped(denoiser, self.old)

    def end_epoch(self, denoiser, optimizer_steps: int) -> None:
        """old ← d·old + (1 − d)·θ, d from `nft_settings.old_policy_decay` at this many optimiser steps."""
        from dagcli.algorithms.nft_settings import old_policy_decay
        from dagcli.models import blend_lora, lora_tensors

        s = self.settings
        if self.old is None:
            self.old = lora_tensors(denoiser)
        blend_lora(self.old, denoiser, old_policy_decay(optimizer_steps, s.old_decay_start, s.old_decay_rate,
                                                        s.old_decay_max))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.old is None else {f"old.{n}": t for n, t in self.old.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        old = {n.removeprefix("old."): t for n, t in tensors.items() if n.startswith("old.")}
        self.old = old or None

    def prepare(self, batch, dist) -> None:
        """r ∈ [0, 1] per sample (set as the batch's advantages) from its group-normalised reward; the global std
        over every process's rewards."""
        from dagcli.algorithms.grpo import groups_of, zero_std_fraction

        s = self.settings
        groups = groups_of(batch)
        pool = dist.gather_floats(batch.rewards) if s.std == "global" else None
        batch.advantages = optimality_probability(batch.rewards, groups, s.std, s.std_eps, s.adv_clip, pool)
        self._logs = {"zero_std_groups": zero_std_fraction(batch.rewards, groups),
                      "optimality_abs": float((batch.advantages - 0.5).abs().mean()) if batch.advantages.numel()
                      else 0.0}

    def epoch_logs(self, epoch: int) -> dict:
        return dict(self._logs)

    def loss(self, sb, policy, batch, epoch: int):
        """Per-sample loss of final latents re-noised to their states: v_old and v_ref first (no gradients; the
        swap changes the LoRA in place), then v_θ."""
        s, family, schedule = self.settings, self.ctx.family, self.ctx.schedule
        j = sb.step_index
        x_t = family.noised(schedule, j, sb.x0, sb.noise)
        a, b = family.x0_coefficients(schedule, j)
        out_old = self.ctx.frozen_output(x_t, j, sb.cond, self.old)
        out_ref = self.ctx.frozen_output(x_t, j, sb.cond, None) if s.kl_weight > 0 else None
        out = policy(x_t, j)
        r = batch.advantages[sb.traj_index]
        return nft_loss(sb.x0, x_t, a.to(x_t.device), b.to(x_t.device), out, out_old, out_ref, r, s.strength,
                        s.kl_weight, s.adv_clip, s.weight_floor)
