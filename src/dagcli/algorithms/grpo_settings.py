"""The `[grpo]` section. Defaults from Flow-GRPO (yifan123/flow_grpo); the file that sets each is named."""

from __future__ import annotations

from dataclasses import dataclass

from dagcli.algorithms.settings import Section

GRPO_STD = ("global", "group")
GRPO_GROUPS = ("call", "prompt")


@dataclass(frozen=True)
class GrpoConfig:
    """Read by grpo."""

    group_size: int = 8  # trajectories per prompt group (config/grpo.py, 1-GPU SD3 preset: num_image_per_prompt)
    clip_range: float = 1e-4  # PPO ratio clip (config/base.py: train.clip_range)
    kl_weight: float = 0.04  # β_KL of the KL to the base model (config/grpo.py, SD3 GenEval / OCR: train.beta)
    adv_clip: float = 5.0  # advantages clipped to ±this (config/base.py: train.adv_clip_max)
    std_eps: float = 1e-4  # added to the std that divides the advantages (flow_grpo/stat_tracking.py)
    std: str = "global"  # "global": std of every reward of the epoch | "group": each group's own (config/base.py:
    # sample.global_std = True)
    # "call": a group is one sampler call's copies of a prompt | "prompt": every sample of a prompt in the epoch on
    # this process, however many calls drew it (Flow-GRPO's per-prompt stat tracker, flow_grpo/stat_tracking.py)
    groups: str = "call"
    # the unconditional branch of guidance a constant in the policy's output, the gradient through the conditional
    # one only (Flow-GRPO's train_sd3.py detaches the unconditional prediction)
    detach_uncond: bool = False


def check_groups(c, setting) -> list[str]:
    """Each sampler call must hold whole prompt groups of at least two members."""
    size = c.grpo.group_size
    if size < 2:
        return [f"{setting('grpo.group_size', size)}: must be at least 2 (advantages compare a group's members)"]
    if c.sampling.batch_size % size:
        return [f"{setting('sampling.batch_size', c.sampling.batch_size)} does not divide into groups of "
                f"{setting('grpo.group_size', size)}; use a multiple of {size} "
                f"(e.g. {size * max(1, round(c.sampling.batch_size / size))}) or another group size"]
    return []


SECTION = Section("grpo", GrpoConfig, "GRPO: prompt group size, PPO ratio clip, KL weight, advantage normalisation",
                  positive=("clip_range", "adv_clip", "std_eps"), non_negative=("kl_weight",),
                  choices={"std": GRPO_STD, "groups": GRPO_GROUPS}, validate=check_groups)
