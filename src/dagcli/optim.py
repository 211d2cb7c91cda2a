"""The optimiser of a run, built from the `[train]` section."""

from __future__ import annotations

import math

import torch

from dagcli.errors import DagError


def make_optimizer(groups: list[dict], train) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over parameter groups, settings from the `[train]` section."""
    kwargs = dict(betas=(train.adam_beta1, train.adam_beta2), weight_decay=train.weight_decay, eps=train.adam_epsilon)
    if train.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise DagError("train.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(schedule: str, progress: float, warmup: float) -> float:
    """The multiple of each group's learning rate at `progress` epochs of `train.epochs`, both given as fractions of
    the run (`warmup`: lr_warmup_epochs / epochs): a linear rise from 0 over the warm-up, then 1 (constant), a
    half cosine to 0 or a straight line to 0 at the run's end. A function of the position alone, so a resumed run
    steps exactly as an unbroken one."""
    if warmup > 0 and progress < warmup:
        return progress / warmup
    if schedule == "constant":
        return 1.0
    rest = min(max((progress - warmup) / (1.0 - warmup), 0.0), 1.0) if warmup < 1 else 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * rest))
    if schedule == "linear":
        return 1.0 - rest
    raise DagError(f"train.lr_schedule = {schedule!r}: valid options: constant, cosine, linear")
