"""FLUX.1 (`FluxPipeline`): CLIP's pooled embedding and T5's token embeddings, a transformer over 2×2 patches of
the latent packed into tokens (with their positions as image ids), the guidance embedding of FLUX.1-dev (none for
-schnell), sigmas shifted by the image's token count. No classifier-free guidance: FLUX.1-dev is guidance-distilled,
so `guidance` is the value given to its guidance embedding, and the guided and conditional outputs are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dagcli.families.base import Cond, Denoise, FamilyDefaults
from dagcli.families.flow import FlowFamily, warn_long_prompts

T5_TOKENS = 512  # diffusers' default `max_sequence_length` for FLUX.1


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2×2 patches as tokens, row by row (FLUX's layout)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for a latent of h x w."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """[(h/2)(w/2), 3] positions of the packed tokens: (0, row, column)."""
    rows = torch.arange(h // 2).repeat_interleave(w // 2)
    cols = torch.arange(w // 2).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], 1).to(device=device, dtype=dtype)


class FluxFamily(FlowFamily):
    """FLUX.1-dev / -schnell; training defaults are Flow-GRPO's for FLUX.1-dev."""

    name = "flux"
    reference = FamilyDefaults(
        steps=6, guidance=3.5, train_eta=0.9, sample_eta=0.0, prompts="simple_animals", sample_steps=28,
        max_eta=None,
        source="Flow-GRPO's FLUX.1-dev settings (config/grpo.py of yifan123/flow_grpo)",
    )

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def resolution_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor * 2)

    @property
    def native_resolution(self) -> int:
        return int(self.pipe.vae.config.sample_size)

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.transformer.config.in_channels) // 4

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.resolution_multiple
        return self.latent_channels, 2 * (height // f), 2 * (width // f)

    @property
    def t5_tokens(self) -> int:
        return min(T5_TOKENS, int(self.pipe.tokenizer_2.model_max_length))

    # --- prompts -----------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompts, None, device=self.device,
                                                           max_sequence_length=self.t5_tokens)
        return {"embeds": embeds, "pooled": pooled, "text_ids": text_ids.expand(len(prompts), -1, -1)}

    def warn_truncated(self, prompts: Sequence[str], warn: Callable[[str], None]) -> int:
        return warn_long_prompts(self.pipe.tokenizer_2, self.t5_tokens, "T5 text encoder", prompts, warn)

    # --- the chain ---------------------------------------------------------------------------------------
    def schedule_kwargs(self, steps: int, height: int, width: int) -> dict:
        """FluxPipeline's sigmas (1 ... 1/T, shifted by the scheduler) and `mu` from the image's token count."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipe.scheduler.config
        _, h, w = self.latent_shape(height, width)
        mu = calculate_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        return {"sigmas": sigmas, "mu": mu}

    def denoiser_fn(self, model, schedule, cond: Cond, guidance: float, detach_uncond: bool = False) -> Denoise:
        """(x, j) -> (velocity, velocity): x packed into tokens, the transformer's output unpacked. FLUX has no
        unconditional branch (guidance is an input of the distilled model), so `detach_uncond` changes nothing."""
        embeds, pooled, text_ids = cond.tensors["embeds"], cond.tensors["pooled"], cond.tensors["text_ids"][0]
        dtype = embeds.dtype  # the transformer's input dtype, as diffusers: the text encoders'
        distilled = bool(self.pipe.transformer.config.guidance_embeds)

        def denoise(x: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            b, _, h, w = x.shape
            t = schedule.time(j).to(x.device, dtype) / 1000
            g = torch.full((b,), guidance, device=x.device, dtype=torch.float32) if distilled else None
            out = model(hidden_states=pack(x).to(dtype), timestep=t, guidance=g, pooled_projections=pooled,
                        encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids(h, w, x.device, dtype),
                        return_dict=False)[0]
            v = unpack(out.float(), h, w)
            return v, v

        return denoise
