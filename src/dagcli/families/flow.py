"""What rectified-flow pipelines (SD3 / SD3.5, FLUX.1) share: the schedule of noise levels, the SDE step with its
exact log-probability (`kernels.flow_sde`), the backward kernel, x̂0, decoding, the flow network's inputs and the
LoRA files. A subclass says how prompts are encoded, how the transformer is called and how sigmas are shifted.

States are latents in image layout [B, C, h, w] (FLUX packs them into 2×2 tokens only at the transformer's input),
so the step, the flow network and the decoder see the same tensors for every flow family.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch

from dagcli.families.base import Cond, decode_latents
from dagcli.kernels import flow_ddim, flow_sde
from dagcli.kernels.gaussian import Reduction, StepOutput, initial_noise

# Flow-GRPO's LoRA targets (scripts/train_sd3.py): every projection of the joint attention, image and text streams
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# sampling.sampler -> (the step with log P_F, log P_B): Flow-GRPO's SDE, or DDIM for rectified flow (P_F matched to P_B)
FLOW_SAMPLERS: dict[str, tuple[Callable, Callable]] = {
    "sde": (flow_sde.sde_step, flow_sde.backward_log_prob),
    "ddim": (flow_ddim.ddim_flow_step, flow_ddim.matched_backward_log_prob),
}
PROMPT_CACHE = 64  # encoded prompts kept (T5 embeddings are large: 4096 wide, 256-512 tokens)


class PromptCache:
    """The pipeline's text encodings per prompt (name -> tensor without the batch dim), least recently used out."""

    def __init__(self, encode: Callable[[list[str]], dict[str, torch.Tensor]], capacity: int = PROMPT_CACHE):
        self.encode, self.capacity = encode, capacity
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Cond:
        for p in sorted({p for p in prompts if p not in self._cache}):  # one at a time: see `PromptEncoder.encode` (sd.py)
            self._cache[p] = {k: v[0].clone() for k, v in self.encode([p]).items()}
        rows = [self._cache[p] for p in prompts]
        for p in prompts:
            self._cache.move_to_end(p)
        while len(self._cache) > max(self.capacity, len(set(prompts))):
            self._cache.popitem(last=False)
        return Cond({k: torch.stack([r[k] for r in rows]) for k in rows[0]})


def truncated_prompts(tokenizer, limit: int, prompts: Sequence[str]) -> list[str]:
    """The prompts longer than `limit` tokens of `tokenizer` (their tail is cut), sorted."""
    return sorted({p for p in prompts if len(tokenizer(p).input_ids) > limit})


def warn_long_prompts(tokenizer, limit: int, what: str, prompts: Sequence[str], warn: Callable[[str], None]) -> int:
    """Warn once about the prompts the longest text window (`what`, `limit` tokens) cuts; returns how many."""
    long = truncated_prompts(tokenizer, limit, prompts)
    if long:
        example = long[0] if len(long[0]) <= 60 else long[0][:57] + "..."
        warn(f"{len(long)} prompt(s) exceed the {what}'s {limit} tokens and are truncated, e.g. {example!r}")
    return len(long)


class FlowFamily:
    """The shared part of a rectified-flow family; subclasses set `name`, `reference` and the model specifics."""

    lora_prefix = "transformer"
    default_lora_targets = ATTENTION_TARGETS
    load_kwargs: dict = {}
    max_resolution: int | None = None  # rotary position embeddings (FLUX): any size; SD3 has a bound
    samplers = tuple(FLOW_SAMPLERS)  # the values `sampling.sampler` takes for this family

    def __init__(self, pipe, device: torch.device):
        self.pipe, self.device = pipe, device
        self.denoiser = pipe.transformer
        self.prompts = PromptCache(self._encode)
        self.sampler = "sde"  # sampling.sampler: the step every schedule of this family uses (`set_sampler`)

    # --- the model specifics (subclasses) ----------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Batched text encodings of `prompts`: name -> [n, ...]."""
        raise NotImplementedError

    def schedule_kwargs(self, steps: int, height: int, width: int) -> dict:
        """Extra `set_timesteps` arguments (custom sigmas, the resolution-dependent shift `mu`)."""
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of `height` x `width` pixels."""
        f = self.pipe.vae_scale_factor
        return self.latent_channels, height // f, width // f

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels)

    def initial_latents(self, batch: int, height: int, width: int, generator) -> torch.Tensor:
        return initial_noise((batch, *self.latent_shape(height, width)), generator, device=self.device)

    # --- prompts -----------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> Cond:
        return self.prompts(list(prompts))

    # --- the chain ---------------------------------------------------------------------------------------
    def schedule(self, steps: int, height: int, width: int) -> flow_sde.Schedule:
        levels = flow_sde.Schedule.from_scheduler(self.pipe.scheduler, steps,
                                                  **self.schedule_kwargs(steps, height, width))
        return dataclasses.replace(levels, sampler=self.sampler)

    def num_steps(self, schedule: flow_sde.Schedule) -> int:
        return schedule.num_steps

    def step(self, schedule, i, x, out, eta, prev=None, generator=None, reduction: Reduction = "mean") -> StepOutput:
        step = FLOW_SAMPLERS[schedule.sampler][0]
        return step(schedule, i, x, out, eta, prev_sample=prev, generator=generator, reduction=reduction)

    def backward_log_prob(self, schedule, i, x, prev, reduction: Reduction = "mean") -> torch.Tensor:
        return FLOW_SAMPLERS[schedule.sampler][1](schedule, i, x, prev, reduction=reduction)

    def predict_x0(self, schedule, j, x, out) -> torch.Tensor:
        return flow_sde.pred_x0(schedule, j, x, out)

    def noised(self, schedule, j, x0, noise) -> torch.Tensor:
        """x0 carried forward to state j with `noise`: (1 − σ_j)·x0 + σ_j·ε."""
        from dagcli.kernels.forward import flow_noised

        return flow_noised(x0, noise, schedule.sigma(j).to(x0.device, x0.dtype))

    def x0_coefficients(self, schedule, j) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) [n] of x̂0 = a·x + b·v at states j: (1, −σ_j)."""
        from dagcli.kernels.forward import x0_coefficients

        return x0_coefficients("flow", schedule.sigma(j))

    def decode(self, latents: torch.Tensor, vae=None) -> torch.Tensor:
        return decode_latents(vae if vae is not None else self.pipe.vae, latents)

    # --- the flow network and LoRA files -----------------------------------------------------------------
    def flow_inputs(self, schedule, j, x, cond: Cond):
        """The latent in image layout, σ·1000 as time, the prompt's token embeddings."""
        return x, schedule.time(j).to(x.device), cond.tensors["embeds"]

    def flow_config(self, height: int, width: int):
        """Sized as for a UNet whose first block is as wide as the transformer (reference sizes for real models)."""
        from dagcli.algorithms.flow import flow_config_for

        config = self.pipe.transformer.config
        inner = int(config.num_attention_heads * config.attention_head_dim)
        like_unet = SimpleNamespace(block_out_channels=(inner, 2 * inner), in_channels=self.latent_channels)
        _, h, w = self.latent_shape(height, width)
        return flow_config_for(like_unet, int(config.joint_attention_dim), min(h, w))

    def save_lora(self, folder, weights: dict, metadata: dict) -> None:
        type(self.pipe).save_lora_weights(str(folder), transformer_lora_layers=weights, safe_serialization=True,
                                          transformer_lora_adapter_metadata=metadata)

    @staticmethod
    def kohya_weights(weights: dict, alpha: float) -> dict:
        """diffusers-format LoRA (`transformer.` keys) -> `lora_transformer_<module with _>.lora_down/lora_up/alpha`,
        the single-file keys ComfyUI reads for SD3 and FLUX (and diffusers reads back for FLUX)."""
        return transformer_kohya_weights(weights, alpha)


SUFFIXES = {".lora.down.weight": "lora_down.weight", ".lora_A.weight": "lora_down.weight",
            ".lora.up.weight": "lora_up.weight", ".lora_B.weight": "lora_up.weight"}


def transformer_kohya_weights(weights: dict, alpha: float) -> dict:
    """`transformer.<module>.lora.down.weight` -> `lora_transformer_<module, dots as _>.lora_down.weight` (and up),
    with the LoRA's real alpha in every `.alpha`."""
    from dagcli.errors import DagError

    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if not key.startswith("transformer.") or suffix is None:
            raise DagError(f"only transformer LoRAs can be exported to kohya format; found {key!r}")
        module = "lora_transformer_" + key[len("transformer."):-len(suffix)].replace(".", "_")
        out[f"{module}.{SUFFIXES[suffix]}"] = value.detach().float().contiguous()
        out[f"{module}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out
