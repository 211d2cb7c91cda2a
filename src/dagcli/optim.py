"""The optimiser of a run, built from the `[train]` section."""

from __future__ import annotations

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
