"""DiffusionNFT's settings (the `[nft]` section) and the schedule of its sampling policy, torch-free.

Defaults from DiffusionNFT (Zheng et al., arXiv 2509.16117; code NVlabs/DiffusionNFT): each comment names the
file that sets the value (`config/nft.py` overrides `config/base.py`; `scripts/train_nft_sd3.py` holds the loss).
The times each sample is trained at are the samples unit's: `train.timestep_fraction` · steps draws of a state
per sample (the reference's int(0.99 · steps) without repetition is `train.timestep_fraction = 0.99`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dagcli.algorithms.settings import Section

NFT_STD = ("global", "group")


@dataclass(frozen=True)
class NftConfig:
    """Read by nft. The SD3.5 GenEval / PickScore / HPS preset of DiffusionNFT unless a comment says otherwise."""

    group_size: int = 24  # samples per prompt group (config/nft.py: sample.num_image_per_prompt)
    strength: float = 1.0  # λ of the implicit policies v± = v_old ± λ (v_θ − v_old); the policy loss is divided
    # by it (config/nft.py: beta; 0.1 in its OCR and multi-reward presets)
    kl_weight: float = 1e-4  # weight of mean (v_θ − v_ref)² to the base model (config/nft.py: train.beta)
    adv_clip: float = 5.0  # advantages clipped to ±this and mapped to r = A / (2·adv_clip) + ½; the policy loss
    # is multiplied by it (config/base.py: train.adv_clip_max; scripts/train_nft_sd3.py)
    std_eps: float = 1e-4  # added to the std that divides the advantages (flow_grpo/stat_tracking.py)
    std: str = "global"  # "global": std of every reward of the epoch | "group": each group's own (config/base.py:
    # sample.global_std = True)
    weight_floor: float = 1e-5  # lower bound of the adaptive weight mean |x̂0 − x0| (scripts/train_nft_sd3.py)
    old_decay_start: int = 0  # optimiser steps before the sampling policy starts to lag (config/nft.py:
    # decay_type = 1; scripts/train_nft_sd3.py: return_decay; 75 in the OCR preset, decay_type = 2)
    old_decay_rate: float = 0.001  # its decay grows by this per optimiser step after the start (idem; 0.0075)
    old_decay_max: float = 0.5  # and is capped here (idem; 0.999)
    guidance: float = 1.0  # sampling and training without classifier-free guidance (config/nft.py:
    # sample.guidance_scale = 1.0)


def old_policy_decay(step: int, start: int, rate: float, cap: float) -> float:
    """The weight the sampling ("old") policy keeps of itself when refreshed after an epoch, `step` optimiser
    steps into training: 0 before `start`, then rate·(step − start), at most `cap`. 0 = a plain copy of θ."""
    if step < start:
        return 0.0
    return min((step - start) * rate, cap)


def check_nft(c: NftConfig) -> list[str]:
    """Every problem with the settings, one line each naming the key, the value and what is valid."""
    e = []
    if c.group_size < 2:
        e.append(f"nft.group_size = {c.group_size}: must be at least 2 (rewards are normalised within a group)")
    if not 0.0 < c.strength <= 1.0:
        e.append(f"nft.strength = {c.strength}: must be in (0, 1]")
    if c.kl_weight < 0:
        e.append(f"nft.kl_weight = {c.kl_weight}: must be ≥ 0")
    if c.adv_clip <= 0:
        e.append(f"nft.adv_clip = {c.adv_clip}: must be > 0")
    if c.std not in NFT_STD:
        e.append(f"nft.std = {c.std!r}: valid options: {', '.join(NFT_STD)}")
    if not 0.0 <= c.old_decay_max < 1.0:
        e.append(f"nft.old_decay_max = {c.old_decay_max}: must be in [0, 1)")
    return e


def check_section(c, setting) -> list[str]:
    """The section's own problems, then its groups against the sampler's batch."""
    problems = check_nft(c.nft)
    size = c.nft.group_size
    if not problems and c.sampling.batch_size % size:
        problems.append(f"{setting('sampling.batch_size', c.sampling.batch_size)} does not divide into groups of "
                        f"{setting('nft.group_size', size)}; use a multiple of {size} or another group size")
    return problems


def sampling_defaults(config) -> dict:
    """What nft samples with unless set: the deterministic ODE (η = 0) and its own guidance."""
    return {"sampling.eta": 0.0, "sampling.guidance": config.nft.guidance}


SECTION = Section("nft", NftConfig, "DiffusionNFT: prompt group size, implicit-policy strength, KL weight, "
                  "advantage normalisation, the sampling policy's lag", positive=("std_eps", "weight_floor"),
                  non_negative=("old_decay_start", "old_decay_rate", "guidance"), validate=check_section)
