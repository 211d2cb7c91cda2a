"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): CLIP-L and CLIP-G (token and pooled embeddings) and an
optional T5 (a pipeline without one gets zeros in its place, as diffusers does), an MMDiT transformer predicting
the velocity, classifier-free guidance, sigmas shifted by the scheduler's `shift` (3.0 for SD3.5).

Without T5 the 256 identical zero tokens are carried as one (`repeated_tokens`): the same function, in float32
up to rounding, at a fraction of the cost; the DAG flow network still sees the pipeline's full sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dagcli.families import repeated_tokens
from dagcli.families.base import Cond, Denoise, FamilyDefaults
from dagcli.families.flow import FlowFamily, warn_long_prompts

T5_TOKENS = 256  # diffusers' default `max_sequence_length` for SD3


class SD3Family(FlowFamily):
    """SD3 / SD3.5; training defaults are Flow-GRPO's for SD3.5 Medium."""

    name = "sd3"
    reference = FamilyDefaults(
        steps=10, guidance=4.5, train_eta=0.7, sample_eta=0.0, prompts="simple_animals", sample_steps=40,
        max_eta=None,
        source="Flow-GRPO's SD3.5 Medium settings (config/base.py, config/grpo.py of yifan123/flow_grpo)",
    )

    def __init__(self, pipe, device: torch.device):
        super().__init__(pipe, device)
        self.short_t5 = pipe.text_encoder_3 is None  # T5's zeros carried as one token standing for t5_tokens
        if self.short_t5:
            repeated_tokens.install(pipe.transformer)

    # --- sizes -------------------------------------------------------------------------------------------
    @property
    def resolution_multiple(self) -> int:
        return int(self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size)

    @property
    def native_resolution(self) -> int:
        return int(self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def max_resolution(self) -> int | None:
        """The transformer's table of position embeddings covers `pos_embed_max_size` patches a side."""
        patches = self.pipe.transformer.config.pos_embed_max_size
        return None if patches is None else int(patches) * self.resolution_multiple

    @property
    def t5_tokens(self) -> int:
        """T5's window: diffusers' default, or the tokenizer's when shorter."""
        tokenizer = self.pipe.tokenizer_3
        return T5_TOKENS if tokenizer is None else min(T5_TOKENS, int(tokenizer.model_max_length))

    # --- prompts -----------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=1 if self.short_t5 else self.t5_tokens)
        return {"embeds": embeds, "pooled": pooled}

    def warn_truncated(self, prompts: Sequence[str], warn: Callable[[str], None]) -> int:
        if self.pipe.text_encoder_3 is not None:
            return warn_long_prompts(self.pipe.tokenizer_3, self.t5_tokens, "T5 text encoder", prompts, warn)
        tokenizer = self.pipe.tokenizer
        return warn_long_prompts(tokenizer, tokenizer.model_max_length, "CLIP text encoders", prompts, warn)

    # --- the chain ---------------------------------------------------------------------------------------
    def schedule_kwargs(self, steps: int, height: int, width: int) -> dict:
        """`mu` for a scheduler with resolution-dependent shifting, as `StableDiffusion3Pipeline` computes it."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = self.pipe.transformer.config.patch_size
        _, h, w = self.latent_shape(height, width)
        return {"mu": calculate_shift((h // patch) * (w // patch), config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", 1.16))}

    def denoiser_fn(self, model, schedule, cond: Cond, guidance: float, detach_uncond: bool = False) -> Denoise:
        """(x, j) -> (guided velocity, conditional velocity): ṽ = v(∅) + w (v(c) − v(∅)) in one call on [∅; c],
        only v(c) when w <= 1 (as diffusers does); `detach_uncond`: v(∅) a constant in ṽ (no gradient through it)."""
        embeds, pooled = cond.tensors["embeds"], cond.tensors["pooled"]
        dtype = embeds.dtype  # the transformer's input dtype, as diffusers: the text encoders'
        use_cfg = guidance > 1.0
        extra = {"joint_attention_kwargs": {repeated_tokens.KWARG: self.t5_tokens}} if self.short_t5 else {}
        if use_cfg:
            empty = self.encode([""]).tensors
            embeds = torch.cat([empty["embeds"].expand_as(embeds), embeds])
            pooled = torch.cat([empty["pooled"].expand_as(pooled), pooled])

        def denoise(x: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = schedule.time(j).to(x.device)
            x_in, t_in = (torch.cat([x, x]), torch.cat([t, t])) if use_cfg else (x, t)
            out = model(hidden_states=x_in.to(dtype), timestep=t_in, encoder_hidden_states=embeds,
                        pooled_projections=pooled, return_dict=False, **extra)[0].float()
            if not use_cfg:
                return out, out
            v_u, v_c = out.chunk(2)
            if detach_uncond:
                v_u = v_u.detach()
            return v_u + guidance * (v_c - v_u), v_c

        return denoise

    # --- the flow network ---------------------------------------------------------------------------------
    def flow_inputs(self, schedule, j, x, cond: Cond):
        """As every flow family, with the pipeline's own token sequence (T5's zeros repeated back when short)."""
        x, t, embeds = super().flow_inputs(schedule, j, x, cond)
        return x, t, repeated_tokens.expand(embeds, self.t5_tokens) if self.short_t5 else embeds
