"""DDPO's advantages: rewards normalised per prompt over a buffer of recent rewards (ddpo-pytorch's stat tracker)."""

from __future__ import annotations

from collections import deque

import torch


def per_prompt_advantages(
    prompts: list[str],
    rewards: torch.Tensor,
    buffers: dict[str, list[float]],
    buffer_size: int,
    min_count: int,
    clip: float,
) -> torch.Tensor:
    """(r − mean_prompt) / (std_prompt + 1e-6) over each prompt's buffer of recent rewards, clipped to ±clip.

    `buffers` (prompt -> recent rewards, at most `buffer_size`) is updated in place with this batch first.
    A prompt with fewer than min(min_count, buffer_size) buffered rewards is normalised with the batch's
    mean and (unbiased) std instead. `rewards` is [N]; returns [N].
    """
    for p, r in zip(prompts, rewards.tolist(), strict=True):
        buf = deque(buffers.get(p, []), maxlen=buffer_size)
        buf.append(r)
        buffers[p] = list(buf)
    g_mean, g_std = rewards.mean(), rewards.std() if rewards.numel() > 1 else torch.tensor(1.0)
    adv = torch.empty_like(rewards)
    for i, (p, r) in enumerate(zip(prompts, rewards, strict=True)):
        buf = torch.tensor(buffers[p])
        if len(buf) >= min(min_count, buffer_size):
            adv[i] = (r - buf.mean()) / (buf.std() + 1e-6)
        else:
            adv[i] = (r - g_mean) / (g_std + 1e-6)
    return adv.clamp(-clip, clip)
