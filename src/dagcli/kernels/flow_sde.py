"""The rectified-flow sampler as pure functions of tensors: a schedule of noise levels, the SDE step that samples or
scores (log P_F), the noising kernel that matches the interpolant (log P_B), and x̂0.

Notation: σ ∈ [0, 1] is the noise level of a state (σ = 1 pure noise, σ = 0 the image); the interpolant is
x_σ = (1 − σ) x0 + σ ε and the network predicts the velocity v ≈ ε − x0. One transition goes from σ to σ' < σ,
dt = σ' − σ < 0, with a noise level a ≥ 0 (`eta`):

    s     = a · sqrt(σ / (1 − σ))                  (at σ = 1 the next level σ' stands in the denominator)
    mean  = x · (1 + s² dt / (2σ)) + v · (1 + s² (1 − σ) / (2σ)) · dt
    P_F(x' | x) = N(mean, s² (−dt) I)            (a = 0: the Euler step of the ODE, deterministic)
    P_B(x | x') = N(c x', (σ² − c² σ'²) I),  c = (1 − σ) / (1 − σ')
    x̂0    = x − σ v

Every per-row coefficient is computed in float64 from the schedule's float32 levels and rounded once; the tensor
arithmetic is float32 whatever the model's dtype. The same `sde_step` samples during a rollout and scores a stored
step during training, so both agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dagcli.kernels.gaussian import Reduction, StepOutput, bcast, gaussian_log_prob, randn_like, step_log_prob


@dataclass(frozen=True)
class Schedule:
    """The noise levels of a sampler with T steps, as diffusers' `FlowMatchEulerDiscreteScheduler` sets them."""

    sigmas: torch.Tensor  # [T+1] float32, descending, the last one 0: σ of states 0 ... T
    timesteps: torch.Tensor  # [T] float32: σ·1000 of states 0 ... T-1 as the scheduler computes them
    sampler: str = "sde"  # the step on these levels: "sde" (`sde_step`) or "ddim" (`flow_ddim.ddim_flow_step`)

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, **set_timesteps_kwargs) -> Schedule:
        """Read a flow-matching scheduler after `set_timesteps(num_steps, **kwargs)` on a copy of it (the
        pipeline's own scheduler is left as it was)."""
        copy = type(scheduler).from_config(scheduler.config)
        copy.set_timesteps(num_steps, device="cpu", **set_timesteps_kwargs)
        return cls(sigmas=copy.sigmas.detach().to("cpu", torch.float32),
                   timesteps=copy.timesteps.detach().to("cpu", torch.float32))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def sigma(self, j: torch.Tensor) -> torch.Tensor:
        """σ of states j (long, [B]); float32."""
        return self.sigmas[torch.as_tensor(j).reshape(-1).to("cpu", torch.long)]

    def time(self, j: torch.Tensor) -> torch.Tensor:
        """The transformer's time input σ·1000 of states j (the final state, σ = 0, at time 0); float32 [B]."""
        return torch.cat([self.timesteps, torch.zeros(1)])[torch.as_tensor(j).reshape(-1).to("cpu", torch.long)]

    def pair(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, σ') of transitions i (state i to state i + 1) in float64, [B] each."""
        i = torch.as_tensor(i).reshape(-1).to("cpu", torch.long)
        return self.sigmas[i].double(), self.sigmas[i + 1].double()


def sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> torch.Tensor:
    """s = a·sqrt(σ / (1 − σ)), with σ' in the denominator where σ = 1 (float64 in, float64 out)."""
    denominator = 1 - torch.where(sigma == 1, sigma_next, sigma)
    return eta * (sigma / denominator).sqrt()


def sde_step(
    schedule: Schedule,
    i: torch.Tensor,
    x: torch.Tensor,
    velocity: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """Transition i: x at σ_i -> x' at σ_{i+1}, with log P_F(x' | x).

    Samples x' (noise from `generator`) when `prev_sample` is None, otherwise scores the given x'. With η = 0 the
    step is diffusers' Euler step x + dt·v exactly and the returned log-prob is 0. `std` is the step's standard
    deviation s·sqrt(−dt).
    """
    x, velocity = x.float(), velocity.float()
    sigma, sigma_next = schedule.pair(torch.as_tensor(i).reshape(-1).expand(x.shape[0]))
    dt = sigma_next - sigma  # exact in float64; rounded to float32 it is diffusers' float32 difference
    s2 = sde_std(sigma, sigma_next, eta) ** 2
    x_coef = bcast((1 + s2 * dt / (2 * sigma)).float(), x)
    v_coef = bcast(((1 + s2 * (1 - sigma) / (2 * sigma)) * dt).float(), x)
    mean = x * x_coef + velocity * v_coef
    std = (s2 * -dt).sqrt().float()  # [B]
    if prev_sample is None:
        prev_sample = mean + bcast(std, x) * randn_like(mean, generator) if eta > 0 else mean
    prev_sample = prev_sample.float()
    log_prob = step_log_prob(prev_sample, mean, std, eta > 0, reduction)
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std,
                      pred_x0=x - bcast(sigma.float(), x) * velocity)


def backward_kernel(schedule: Schedule, i: torch.Tensor, x_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P_B of transition i as (mean c·x' [B,...], std [B]): N(c x', (σ² − c²σ'²) I), c = (1 − σ)/(1 − σ').

    If x' = (1 − σ')x0 + σ'ε then c·x' plus this noise has mean (1 − σ)x0 and variance σ²: the interpolant's
    marginal at σ, whatever x0. At σ = 1 it is N(0, I); from σ' = 0 it is N((1 − σ)x0, σ² I). No parameters.
    """
    x_next = x_next.float()
    sigma, sigma_next = schedule.pair(torch.as_tensor(i).reshape(-1).expand(x_next.shape[0]))
    c = (1 - sigma) / (1 - sigma_next)
    return bcast(c.float(), x_next) * x_next, (sigma**2 - c**2 * sigma_next**2).sqrt().float()


def backward_log_prob(schedule: Schedule, i: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                      reduction: Reduction = "mean") -> torch.Tensor:
    """log P_B(x | x') of transition i under `backward_kernel`."""
    mean, std = backward_kernel(schedule, i, x_next)
    return gaussian_log_prob(x.float(), mean, std, reduction)


def pred_x0(schedule: Schedule, j: torch.Tensor, x: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """x̂0 = x − σ_j v of states j (the one-step prediction of the image latent)."""
    return x - bcast(schedule.sigma(j), x) * velocity.to(x.dtype)
