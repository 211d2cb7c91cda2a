"""The model-family seam: what one kind of pipeline does between noise and image.

A family wraps a loaded diffusers pipeline and wires its modules to the pure sampler math in `dagcli.kernels`.
Everything the engine does with a model goes through this interface, so sampling, training, evaluation and
export work the same way for every family. States of a trajectory are indexed j = 0 (pure noise) ... T (the
final latent); transition i goes from state i to state i + 1. Index tensors are [B] long on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dagcli.kernels.gaussian import Reduction, StepOutput


@dataclass
class Cond:
    """Everything the denoiser needs about a batch of prompts: name -> tensor [B, ...], all with the same B."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, idx) -> Cond:
        return Cond({k: v[idx] for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> Cond:
        return Cond({k: v.to(device) for k, v in self.tensors.items()})

    @staticmethod
    def cat(parts: Sequence[Cond]) -> Cond:
        return Cond({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})


@dataclass(frozen=True)
class FamilyDefaults:
    """Sampler settings that suit a family when neither the user nor the model's dagcli.json gives them."""

    steps: int
    guidance: float
    train_eta: float  # noise level of the sampler while training (must be > 0: a stochastic policy)
    sample_eta: float  # noise level of `dag sample` / `dag eval`
    prompts: str  # training prompt set
    source: str  # where the numbers come from (said in messages and docs)
    sample_steps: int | None = None  # steps of `dag sample` / `dag eval` when they differ from training's
    max_eta: float | None = 1.0  # the largest noise level the sampler is defined for (DDIM: 1); None: no bound
    reward: str = "aesthetic"  # training reward
    gradient_accumulation_steps: int = 200  # micro-batches per optimiser step (reference: 4 x 50 timesteps)


# (x [B,...], state index j [B]) -> (guided model output, conditional model output), both float32
Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Family(Protocol):
    """One kind of text-to-image pipeline (SD 1.x/2.x, SDXL, SD3, FLUX)."""

    name: str  # "sd", "sdxl", "sd3", "flux"
    pipe: Any  # the diffusers pipeline
    denoiser: torch.nn.Module  # the network the LoRA trains (a UNet or a transformer)
    lora_prefix: str  # "unet" or "transformer": the key prefix of its LoRA in diffusers files
    load_kwargs: dict  # extra `from_pretrained` arguments for its pipeline class
    reference: FamilyDefaults  # sampler settings when none are given
    default_lora_targets: tuple[str, ...]
    native_resolution: int  # pixels
    resolution_multiple: int  # image sizes must be multiples of this
    max_resolution: int | None  # the largest image side the denoiser takes (None: no bound)

    def encode(self, prompts: Sequence[str]) -> Cond: ...  # cached per prompt; the empty prompt is ∅
    def warn_truncated(self, prompts: Sequence[str], warn: Callable[[str], None]) -> int: ...
    def schedule(self, steps: int, height: int, width: int) -> Any: ...  # the sampler's numbers for `steps` steps
    def num_steps(self, schedule) -> int: ...
    def initial_latents(self, batch: int, height: int, width: int, generator) -> torch.Tensor: ...  # state 0
    # detach_uncond: the unconditional branch of guidance enters as a constant (gradients through the conditional one)
    def denoiser_fn(self, model, schedule, cond: Cond, guidance: float, detach_uncond: bool = False) -> Denoise: ...
    def step(self, schedule, i: torch.Tensor, x: torch.Tensor, out: torch.Tensor, eta: float,
             prev: torch.Tensor | None = None, generator=None, reduction: Reduction = "mean") -> StepOutput: ...
    def backward_log_prob(self, schedule, i: torch.Tensor, x: torch.Tensor, prev: torch.Tensor,
                          reduction: Reduction = "mean") -> torch.Tensor: ...  # log P_B(x_i | x_{i+1})
    def predict_x0(self, schedule, j: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor: ...
    # a clean latent carried forward to states j [n] with `noise` (the forward process), and the (a, b) [n] of
    # x̂0 = a·x + b·out there (x̂0 is affine in the model's output)
    def noised(self, schedule, j: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...
    def x0_coefficients(self, schedule, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    # [B,3,H,W] float32 in [0, 1], with the pipeline's VAE or another decoder of its latents (`AutoencoderTiny`)
    def decode(self, latents: torch.Tensor, vae=None) -> torch.Tensor: ...
    def flow_inputs(self, schedule, j: torch.Tensor, x: torch.Tensor, cond: Cond
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...  # image-layout x, time, text
    def flow_config(self, height: int, width: int): ...  # a FlowConfig sized for this model
    def save_lora(self, folder, weights: dict, metadata: dict) -> None: ...  # diffusers' LoRA file
    # kohya single-file keys of a diffusers-format LoRA (static: export needs no loaded model); a family without a
    # kohya convention raises DagError
    kohya_weights: Callable[[dict, float], dict]


def check_image_size(family, sizes: dict[str, int | None]) -> None:
    """Every given size (its flag or config key -> pixels) is one the family's denoiser takes: a multiple of its
    `resolution_multiple`, at most its `max_resolution`; else one DagError line naming the size and the valid
    ones."""
    from dagcli.errors import DagError

    multiple, largest = family.resolution_multiple, family.max_resolution
    valid = f"a multiple of {multiple}" + (f" up to {largest}" if largest is not None else "")
    for name, value in sizes.items():
        given = f"{name} = {value}" if not name.startswith("-") else f"{name} {value}"
        if value is not None and largest is not None and value > largest:
            raise DagError(f"{given} is larger than this model takes: its largest image side is {largest} px "
                           f"(valid: {valid})")
        if value is not None and value % multiple:
            raise DagError(f"{given}: must be {valid} for this model")


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """x_0 latents [B,C,h,w] -> images [B,3,H,W] float32 in [0, 1] (as diffusers' image processor does)."""
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        scaled = scaled + vae.config.shift_factor
    images = vae.decode(scaled, return_dict=False)[0].float()
    return (images / 2 + 0.5).clamp(0, 1)
