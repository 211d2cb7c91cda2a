"""DDIM for rectified flow: the stochastic flow step whose η = 1 is the posterior of the noising chain that
`flow_sde.backward_kernel` defines, so P_F matches P_B as DDIM's η = 1 does for Stable Diffusion.

From a state x at σ with velocity v, the one-step predictions are x̂0 = x − σ v and ε̂ = (x − (1 − σ) x̂0)/σ
(= x + (1 − σ) v). With the backward kernel P_B(x | x') = N(c x', τ² I), c = (1 − σ)/(1 − σ'), τ² = σ² − c² σ'²,
the posterior q(x' | x, x0) of the noising chain has variance v_post = σ'² τ² / σ². The step σ → σ' is

    s    = η · sqrt(v_post),                η ∈ [0, 1]
    x'   = (1 − σ') x̂0 + sqrt(σ'² − s²) ε̂ + s z,    z ~ N(0, I)
    P_F(x' | x) = N(mean, s² I)

η = 0 is the ODE's Euler step x + (σ' − σ) v exactly. Written in x and v, with d = sqrt(σ'² − s²) − σ' ≤ 0,

    mean = x · (1 + d) + v · ((σ' − σ) + d (1 − σ)),

so at η = 0 (d = 0) the coefficients are 1 and dt exactly and the step is diffusers' `FlowMatchEulerDiscreteScheduler`
step bit for bit. Coefficients are computed per row in float64 from the float32 levels and rounded once; the tensor
arithmetic is float32.

The last step, into σ' = 0, has v_post = 0: it is the deterministic map x ↦ x̂0 whatever η. Convention: that
transition is a pair of point masses, log P_F = log P_B = 0 (`matched_backward_log_prob`), so detailed balance on
it reads log F(x_{T−1}) = β r(x_T): the last stochastic state is terminal and its image is its x̂0. No policy
gradient flows through it (its log P_F is a constant).
"""

from __future__ import annotations

import torch

from dagcli.kernels.flow_sde import Schedule, backward_log_prob
from dagcli.kernels.gaussian import Reduction, StepOutput, bcast, gaussian_log_prob, randn_like


def posterior_variance(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """v_post = σ'² τ² / σ² of the noising chain's posterior q(x' | x, x0), τ² = σ² − c² σ'² (float64)."""
    c = (1 - sigma) / (1 - sigma_next)
    tau2 = sigma**2 - c**2 * sigma_next**2
    return sigma_next**2 * tau2 / sigma**2


def ddim_flow_step(
    schedule: Schedule,
    i: torch.Tensor,
    x: torch.Tensor,
    velocity: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """Transition i: x at σ_i -> x' at σ_{i+1}, with log P_F(x' | x) (0 on rows whose step is deterministic).

    Samples x' (noise from `generator`) when `prev_sample` is None, otherwise scores the given x'. `std` is s.
    """
    x, velocity = x.float(), velocity.float()
    sigma, sigma_next = schedule.pair(torch.as_tensor(i).reshape(-1).expand(x.shape[0]))
    s = eta * posterior_variance(sigma, sigma_next).clamp(min=0).sqrt()  # [B] float64
    d = (sigma_next**2 - s**2).sqrt() - sigma_next
    mean = x * bcast((1 + d).float(), x) + velocity * bcast(((sigma_next - sigma) + d * (1 - sigma)).float(), x)
    std = s.float()
    stochastic = std > 0  # [B]
    if prev_sample is None:
        noise = randn_like(mean, generator) if bool(stochastic.any()) else torch.zeros_like(mean)
        prev_sample = mean + bcast(std, x) * noise
    prev_sample = prev_sample.float()
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    density = gaussian_log_prob(prev_sample, mean, safe_std, reduction)
    log_prob = torch.where(stochastic.to(density.device), density, torch.zeros_like(density))
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std,
                      pred_x0=x - bcast(sigma.float(), x) * velocity)


def matched_backward_log_prob(schedule: Schedule, i: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                              reduction: Reduction = "mean") -> torch.Tensor:
    """log P_B(x | x') for the DDIM sampler: the noising kernel, and 0 on the deterministic step into σ' = 0."""
    _, sigma_next = schedule.pair(torch.as_tensor(i).reshape(-1).expand(x.shape[0]))
    log_prob = backward_log_prob(schedule, i, x, x_next, reduction)
    return torch.where((sigma_next > 0).to(log_prob.device), log_prob, torch.zeros_like(log_prob))
