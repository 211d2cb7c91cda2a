"""What the benchmarks that measure a preset's own sampling chain share: the trainer a preset builds, the base
model's trajectories from seeds, and the base model's chain continued from any of their states to x_T (and scored).

Used by gradient_snr.py, reward_decided.py, reachable_target.py and log_ratio_steps.py (imported as a sibling
module: run them as `python benchmarks/<script>.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def preset_trainer(config: Path, scratch: str, overrides: Sequence[str] = ()):
    """(cfg, prompts, trainer) of a preset with `--set` overrides, the model's defaults filled in and its output in
    /tmp/<scratch> (nothing reported); the prompts in file order without repeats."""
    from dagcli import api
    from dagcli.config import load_config, replace
    from dagcli.prompts import load_prompts
    from dagcli.trainer import Trainer

    cfg = load_config(config, list(overrides))
    cfg = replace(cfg, "output", dir=str(Path("/tmp") / scratch), report_to="none")
    cfg = api.plan_config(cfg).config  # the model's defaults for what the preset leaves unset
    prompts = list(dict.fromkeys(p.prompt for p in load_prompts(cfg.sampling.prompts)))
    return cfg, prompts, Trainer(cfg, prompts)


def base_trajectories(trainer, cfg, prompt: str, seeds: Sequence[int]):
    """The preset's sampler on `prompt`, one trajectory per seed, latents only (call with the LoRA off for the
    base model's)."""
    from dagcli.sampling import generators_for, sample_batch

    s = cfg.sampling
    return sample_batch(trainer.model, [prompt] * len(seeds), generators_for(list(seeds)), steps=s.steps,
                        guidance=s.guidance, eta=s.eta, reduction=cfg.train.reduction, denoiser=trainer.raw_denoiser,
                        height=trainer.resolution, width=trainer.resolution, decode=False)


def continue_chain(trainer, cfg, x: torch.Tensor, cond, start: int, generator: torch.Generator) -> torch.Tensor:
    """x_T from the states `x` [K, ...] at step `start` of the preset's chain with conditioning `cond` [K], each step
    the network's as it is (call with the LoRA off for the base model's), the noise drawn from `generator`."""
    s, family, schedule = cfg.sampling, trainer.family, trainer.rollout.schedule
    denoise = family.denoiser_fn(trainer.raw_denoiser, schedule, cond, s.guidance)
    x = x.to(trainer.model.device)
    for i in range(start, s.steps):
        index = torch.full((x.shape[0],), i, dtype=torch.long)
        out, _ = denoise(x, index)
        x = family.step(schedule, index, x, out, s.eta, generator=generator).prev_sample
    return x


def continuation_rewards(trainer, cfg, states: torch.Tensor, cond, prompts: Sequence[str], start: int, k: int,
                         generator: torch.Generator) -> torch.Tensor:
    """[n, k] the rewards of k continuations (`continue_chain`) from each of the states [n, ...] at step `start`,
    state j with conditioning `cond[j]` and prompt `prompts[j]` (call with the LoRA off for the base model's)."""
    n = states.shape[0]
    x = states.repeat_interleave(k, 0)
    final = continue_chain(trainer, cfg, x, cond[torch.arange(n).repeat_interleave(k)], start, generator)
    scores, _ = trainer.rollout.score(trainer.family.decode(final), [p for p in prompts for _ in range(k)])
    return scores.reshape(n, k)
