"""DDPO's advantages: rewards normalised per prompt over a buffer of recent rewards (ddpo-pytorch's stat tracker)."""

from __future__ import annotations

from collections import deque

import torch

from dagcli.algorithms import losses
from dagcli.algorithms.base import LoraOnly


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


class Ddpo(LoraOnly):
    """DDPO: the PPO clipped surrogate on per-prompt normalised rewards, settings from the `[ddpo]` section."""

    name = "ddpo"

    def __init__(self, settings, ctx):
        super().__init__(settings, ctx)
        self.buffers: dict[str, list[float]] = {}  # prompt -> recent rewards (over all processes)

    def prepare(self, batch, dist) -> None:
        """Advantages from every process's rewards (the buffers see the whole epoch), this process's share."""
        s = self.settings
        all_adv = per_prompt_advantages(dist.gather_strings(batch.traj.prompts), dist.gather_floats(batch.rewards),
                                        self.buffers, s.buffer_size, s.min_count, s.adv_clip)
        start = dist.rank_offset(batch.traj.batch_size)
        batch.advantages = all_adv[start : start + batch.traj.batch_size]

    def loss(self, mb, policy, batch, epoch: int):
        adv = batch.advantages[mb.traj_index].to(mb.x.device)
        loss = losses.clipped_surrogate(adv, policy.step.log_prob, mb.log_pf_old, self.settings.clip_range)
        return loss, {"policy_loss": loss.detach().mean()}

    def state_dict(self) -> dict:
        return {"buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: list(v) for p, v in state.get("buffers", {}).items()}
