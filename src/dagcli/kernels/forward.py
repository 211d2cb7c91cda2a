"""The forward process that carries a clean latent x0 to a state of the chain, and the coefficients of x̂0 as an
affine function of the model's output there (flow velocity, ε or v): what re-noising a final sample needs."""

from __future__ import annotations

import torch

from dagcli.kernels.gaussian import bcast

PREDICTION_TYPES = ("flow", "epsilon", "v_prediction")


def flow_noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε, t [n] in [0, 1] (rectified flow: t = σ, 1 = pure noise)."""
    tb = bcast(t, x0)
    return (1 - tb) * x0 + tb * noise


def vp_noised(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ·x0 + √(1 − ᾱ)·ε, ᾱ [n] the scheduler's alphas_cumprod at each sample's timestep."""
    ab = bcast(alpha_bar, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def x0_coefficients(prediction_type: str, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each [n], with x̂0 = a·x_t + b·out. `level`: t for "flow" (out = v = ε − x0), ᾱ for "epsilon"
    (out = ε) and "v_prediction" (out = √ᾱ·ε − √(1 − ᾱ)·x0)."""
    level = level.double()
    if prediction_type == "flow":
        return torch.ones_like(level), -level
    if prediction_type == "epsilon":
        return 1 / level.sqrt(), -(1 - level).sqrt() / level.sqrt()
    if prediction_type == "v_prediction":
        return level.sqrt(), -(1 - level).sqrt()
    raise ValueError(f"unknown prediction type {prediction_type!r}; valid options: {', '.join(PREDICTION_TYPES)}")
