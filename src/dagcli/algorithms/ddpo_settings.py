"""The `[ddpo]` section. Defaults from ddpo-pytorch (kvablack/ddpo-pytorch, config/base.py: train.clip_range,
train.adv_clip_max, per_prompt_stat_tracking.buffer_size / min_count)."""

from __future__ import annotations

from dataclasses import dataclass

from dagcli.algorithms.settings import Section


@dataclass(frozen=True)
class DdpoConfig:
    """Read by ddpo."""

    clip_range: float = 1e-4  # PPO ratio clip (train.clip_range)
    adv_clip: float = 5.0  # advantages clipped to ±this (train.adv_clip_max)
    buffer_size: int = 16  # rewards kept per prompt for per-prompt normalisation (per_prompt_stat_tracking)
    min_count: int = 16  # fewer rewards than this for a prompt: normalise with the global batch statistics


SECTION = Section("ddpo", DdpoConfig, "DDPO: PPO ratio clip, advantage clip, per-prompt reward buffers",
                  positive=("clip_range", "adv_clip", "buffer_size"))
