"""From prompts to trajectories and images with a loaded model: the sampler behind `dag sample`, `dag eval` and
training.

`rollout` runs any family's chain from its initial noise, recording every state, log-probability and model
output; `sample_batch` adds prompt encoding and decoding. A `Trajectory` holds one batch of rollouts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dagcli.families.base import Cond, Denoise, Family
from dagcli.faults import fault_point
from dagcli.kernels.gaussian import Reduction
from dagcli.stopping import check_interrupt


@dataclass
class Trajectory:
    """One batch of rollouts with T sampler steps: states 0 (pure noise) ... T (the final latent)."""

    latents: torch.Tensor  # [B, T+1, ...] float32: x at every state, the noise first
    log_probs: torch.Tensor  # [B, T] float32: log P_F(x_{i+1} | x_i) recorded while sampling
    out_guided: torch.Tensor  # [B, T, ...]: the guided model output that drove each step
    out_cond: torch.Tensor  # [B, T, ...]: the conditional (unguided) model output at each step
    cond: Cond  # [B]: the prompts' conditioning (text embeddings, pooled embeddings, ...)
    prompts: list[str]  # [B]
    images: torch.Tensor | None = None  # [B, 3, H, W] in [0, 1], the decoded final latents
    eta: float = 1.0
    reduction: str = "mean"

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]

    def select(self, idx: torch.Tensor) -> Trajectory:
        """The rollouts at positions `idx` [K] long."""
        return Trajectory(
            latents=self.latents[idx], log_probs=self.log_probs[idx], out_guided=self.out_guided[idx],
            out_cond=self.out_cond[idx], cond=self.cond[idx], prompts=[self.prompts[i] for i in idx.tolist()],
            images=self.images[idx] if self.images is not None else None, eta=self.eta, reduction=self.reduction,
        )

    @staticmethod
    def concat(parts: Sequence[Trajectory]) -> Trajectory:
        first = parts[0]
        return Trajectory(
            latents=torch.cat([p.latents for p in parts]), log_probs=torch.cat([p.log_probs for p in parts]),
            out_guided=torch.cat([p.out_guided for p in parts]), out_cond=torch.cat([p.out_cond for p in parts]),
            cond=Cond.cat([p.cond for p in parts]), prompts=[q for p in parts for q in p.prompts],
            images=torch.cat([p.images for p in parts]) if first.images is not None else None,
            eta=first.eta, reduction=first.reduction,
        )


def rollout(
    family: Family,
    schedule,
    denoise: Denoise,
    x_init: torch.Tensor,
    eta: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    reduction: Reduction = "mean",
    callback: Callable[[int, int], None] | None = None,
    tail: tuple[int, Denoise] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the sampler from the initial noise, recording every state, log-prob and model output.

    Returns (latents [B,T+1,...], log_probs [B,T], guided outputs [B,T,...], conditional outputs [B,T,...]).
    `callback(step, total)` is called after each step (for progress bars). `tail` = (k, denoise_tail): steps k and
    later take their model output from `denoise_tail` (the base model, for a LoRA trained on the first k steps).
    """
    x = x_init.float()
    states, log_probs, guided, cond = [x], [], [], []
    batch, total = x.shape[0], family.num_steps(schedule)
    for i in range(total):
        check_interrupt()
        fault_point("sampler-step")
        index = torch.full((batch,), i, dtype=torch.long)
        out_g, out_c = (tail[1] if tail is not None and i >= tail[0] else denoise)(x, index)
        out = family.step(schedule, index, x, out_g, eta, generator=generator, reduction=reduction)
        x = out.prev_sample
        states.append(x)
        log_probs.append(out.log_prob)
        guided.append(out_g.float())
        cond.append(out_c.float())
        if callback is not None:
            callback(i + 1, total)
    return torch.stack(states, 1), torch.stack(log_probs, 1), torch.stack(guided, 1), torch.stack(cond, 1)


def sample_batch(
    model,
    prompts: Sequence[str],
    generator: torch.Generator | list[torch.Generator],
    *,
    steps: int,
    guidance: float,
    eta: float,
    reduction: Reduction = "mean",
    denoiser: torch.nn.Module | None = None,
    decode: bool = True,
    height: int | None = None,
    width: int | None = None,
    callback: Callable[[int, int], None] | None = None,
    lora_steps: int | None = None,
) -> Trajectory:
    """Roll out one batch of prompts with a `LoadedModel` and return the full `Trajectory`.

    `denoiser` overrides the family's network (e.g. the LoRA-wrapped one during training). `lora_steps` = k: its
    LoRA acts on the first k steps only and the base model (the LoRA switched off) takes the rest (None: all).
    """
    family = model.family
    height, width = height or model.resolution, width or model.resolution
    schedule = family.schedule(steps, height, width)
    cond = family.encode(prompts)
    x_init = family.initial_latents(len(prompts), height, width, generator)
    net = denoiser if denoiser is not None else family.denoiser
    denoise = family.denoiser_fn(net, schedule, cond, guidance)
    tail = None
    if lora_steps is not None and lora_steps < steps:
        tail = (lora_steps, base_denoise(net, denoise))
    latents, log_probs, out_g, out_c = rollout(family, schedule, denoise, x_init, eta, generator=generator,
                                               reduction=reduction, callback=callback, tail=tail)
    return Trajectory(
        latents=latents, log_probs=log_probs, out_guided=out_g, out_cond=out_c, cond=cond, prompts=list(prompts),
        images=family.decode(latents[:, -1]) if decode else None, eta=eta, reduction=reduction,
    )


def base_denoise(net: torch.nn.Module, denoise: Denoise) -> Denoise:
    """`denoise` with the LoRA of `net` (the network it calls) switched off for the call."""
    from dagcli.models import lora_disabled

    def call(x, index):
        with lora_disabled(net):
            return denoise(x, index)

    return call


def lora_steps_at(steps: int, trained_steps: int, trained_total: int) -> int:
    """The leading steps of a `steps`-step chain a LoRA trained on the first `trained_steps` of `trained_total`
    acts on: the same fraction of the chain, rounded to the nearest step (the same steps at the training count)."""
    return int(round(steps * trained_steps / trained_total))


def to_pil(images: torch.Tensor) -> list:
    """[B,3,H,W] in [0,1] -> PIL images, rounded to uint8 exactly as diffusers' `numpy_to_pil`."""
    from PIL import Image

    arr = (images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


def generators_for(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image so that an image depends on its seed only, not on the batch it falls in."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
