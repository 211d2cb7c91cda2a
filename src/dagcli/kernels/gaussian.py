"""Gaussian log-densities reduced over latent dimensions, and per-row seeded noise: shared by every sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum")

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # [B,...] x_s, sampled or the one given
    log_prob: torch.Tensor  # [B] log P_F(x_s | x_t), reduced over latent dims (float32)
    mean: torch.Tensor  # [B,...] μ
    std: torch.Tensor  # [B] σ_t
    pred_x0: torch.Tensor  # [B,...] x̂0


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B,1,...,1] on `like`'s device and dtype."""
    return v.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def reduce_latent(x: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Reduce [B, ...] over everything but the batch: 'mean' (as the reference code) or 'sum' (the true density)."""
    if reduction == "mean":
        return x.flatten(1).mean(1)
    if reduction == "sum":
        return x.flatten(1).sum(1)
    raise ValueError(f"unknown reduction {reduction!r}; valid options: {', '.join(REDUCTIONS)}")


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction
) -> torch.Tensor:
    """log N(x; mean, std² I), reduced over latent dims. `std` is [B] and must be > 0."""
    std_b = bcast(std, x)
    elem = -((x - mean) ** 2) / (2 * std_b**2) - torch.log(std_b) - _LOG_SQRT_2PI
    return reduce_latent(elem, reduction)


def randn_like(x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like x; a list of generators draws each batch row from its own."""
    if isinstance(generator, list):
        rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
        return torch.stack(rows).to(x.device)
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


def initial_noise(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """x_T ~ N(0, I) float32, drawn the way diffusers' pipelines draw it (per-row for a list)."""
    return randn_like(torch.empty(shape, device=device), generator)


def step_log_prob(prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, stochastic: bool,
                  reduction: Reduction) -> torch.Tensor:
    """log P_F of a step N(mean, std² I) at `prev`; 0 for a deterministic step (std = 0)."""
    if stochastic:
        return gaussian_log_prob(prev, mean, std, reduction)
    return torch.zeros(prev.shape[0], device=prev.device)
