"""The DDIM step with its log-probability, the backward (noising) kernel, and x̂0: pure functions of tensors.

The same `ddim_step` samples a step during a rollout and scores a stored step during training, so the two agree
exactly on the same inputs (the on-policy ratio is exactly 1).

Notation (for one transition x_t -> x_s, s the next, smaller timestep):
    x̂0   = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)
    σ_t  = η sqrt((1 - ᾱ_s) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_s)
    μ    = sqrt(ᾱ_s) x̂0 + sqrt(1 - ᾱ_s - σ_t²) ε
    P_F(x_s | x_t) = N(μ, σ_t² I)                      (forward policy)
    P_B(x_t | x_s) = N(sqrt(ᾱ_t / ᾱ_s) x_s, (1 - ᾱ_t / ᾱ_s) I)   (backward policy: the noising kernel)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dagcli.kernels.gaussian import Reduction, StepOutput, bcast, gaussian_log_prob, randn_like, step_log_prob


@dataclass(frozen=True)
class Schedule:
    """The numbers of a DDIM scheduler that the step needs, in float64 on CPU (indexed by timestep)."""

    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float64
    final_alpha_cumprod: float  # ᾱ used after the last step (diffusers' `final_alpha_cumprod`)
    timesteps: torch.Tensor  # [T] long, descending: the sampler's timesteps
    step_ratio: int  # num_train_timesteps // T: s = t - step_ratio
    prediction_type: str = "epsilon"  # "epsilon" or "v_prediction"
    clip_sample: float | None = None  # clamp x̂0 to ±this (diffusers' clip_sample_range) when set

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> Schedule:
        """Read a diffusers `DDIMScheduler` (its config and `set_timesteps(num_steps)`).

        With `set_alpha_to_one` the last step would end at ᾱ = 1: zero variance, no density for P_F or P_B.
        The chain then ends at ᾱ_0 instead (as the original DAG code does), so every step is a Gaussian.
        """
        scheduler.set_timesteps(num_steps)
        cfg = scheduler.config
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}")
        alphas = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        final = float(scheduler.final_alpha_cumprod)
        return cls(
            alphas_cumprod=alphas,
            final_alpha_cumprod=float(alphas[0]) if final >= 1.0 else final,
            timesteps=scheduler.timesteps.detach().to("cpu", torch.long),
            step_ratio=cfg.num_train_timesteps // num_steps,
            prediction_type=cfg.prediction_type,
            clip_sample=float(cfg.clip_sample_range) if cfg.clip_sample else None,
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t for timesteps t (long, any shape); t < 0 gives `final_alpha_cumprod`. float64."""
        t = t.to("cpu", torch.long)
        out = self.alphas_cumprod[t.clamp(min=0)]
        return torch.where(t >= 0, out, torch.full_like(out, self.final_alpha_cumprod))

    def prev(self, t: torch.Tensor) -> torch.Tensor:
        """The next (smaller) timestep s of each t; -1 stands for 'after the last step'."""
        s = t.to(torch.long) - self.step_ratio
        return torch.where(s >= 0, s, torch.full_like(s, -1))


def pred_x0_from_eps(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x̂0 from the model output (ε, or v for v-prediction), without clipping. Same dtype as x_t."""
    a_t = bcast(schedule.alpha(t), x_t)
    if schedule.prediction_type == "epsilon":
        return (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_t**0.5 * x_t - (1 - a_t) ** 0.5 * eps  # v-prediction


def ddim_step(
    schedule: Schedule,
    model_output: torch.Tensor,
    t: torch.Tensor,
    x_t: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """One DDIM step x_t -> x_s with the log-probability of x_s under P_F.

    Samples x_s (noise from `generator`) when `prev_sample` is None, otherwise scores the given x_s.
    Computed in float32 whatever the inputs' dtype, so sampling and scoring agree bit for bit.
    With η = 0 the step is deterministic and the returned log-prob is 0.
    """
    x_t = x_t.float()
    model_output = model_output.float()
    t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0])
    s = schedule.prev(t)
    a_t = schedule.alpha(t)  # [B] float64
    a_s = schedule.alpha(s)
    variance = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
    std = (eta * variance.sqrt()).float()  # [B]

    a_t_b, a_s_b = bcast(a_t.float(), x_t), bcast(a_s.float(), x_t)
    if schedule.prediction_type == "epsilon":
        pred_x0 = (x_t - (1 - a_t_b) ** 0.5 * model_output) / a_t_b**0.5
        eps = model_output
    else:  # v-prediction
        pred_x0 = a_t_b**0.5 * x_t - (1 - a_t_b) ** 0.5 * model_output
        eps = a_t_b**0.5 * model_output + (1 - a_t_b) ** 0.5 * x_t
    if schedule.clip_sample is not None:
        pred_x0 = pred_x0.clamp(-schedule.clip_sample, schedule.clip_sample)
    std_b = bcast(std, x_t)
    mean = a_s_b**0.5 * pred_x0 + (1 - a_s_b - std_b**2) ** 0.5 * eps

    if prev_sample is None:
        if eta > 0:
            noise = randn_like(mean, generator)
            prev_sample = mean + std_b * noise
        else:
            prev_sample = mean
    prev_sample = prev_sample.float()
    log_prob = step_log_prob(prev_sample, mean, std, eta > 0, reduction)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, pred_x0=pred_x0)


def backward_log_prob(
    schedule: Schedule,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x_s: torch.Tensor,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """log P_B(x_t | x_s) of the fixed noising kernel N(sqrt(ᾱ_t/ᾱ_s) x_s, (1 - ᾱ_t/ᾱ_s) I). No parameters."""
    x_t, x_s = x_t.float(), x_s.float()
    t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0])
    ratio = schedule.alpha(t) / schedule.alpha(schedule.prev(t))  # [B] float64
    mean = bcast(ratio.sqrt().float(), x_s) * x_s
    std = (1 - ratio).sqrt().float()
    return gaussian_log_prob(x_t, mean, std, reduction)
