"""Random-weight pipelines built in code, offline, for plumbing checks and tests: `--model tiny-random` and
friends. Each builder is deterministic for a seed; its images are noise-like."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dagcli.builtin import RANDOM_NAMES
from dagcli.builtin.random_flow import build_tiny_random_flux, build_tiny_random_sd3
from dagcli.builtin.random_parts import TINY_RANDOM_WORDS, tiny_text_config, tiny_unet, tiny_vae


def build_tiny_random_pipeline(seed: int = 0):
    """A tiny Stable Diffusion pipeline with random weights: 32 px images, 8x8x4 latents, ~0.5 M parameters.

    Deterministic for a seed. For plumbing checks and tests; its images are noise-like.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    from dagcli.builtin.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(TINY_RANDOM_WORDS, model_max_length=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = tiny_unet(layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_tiny_random_sdxl(seed: int = 0):
    """A tiny SDXL pipeline with random weights: 32 px images, 8x8x4 latents, SDXL's block layout (2 layers per
    block, no attention in the first down block), two text encoders, shipped with SDXL's Euler scheduler config.

    Deterministic for a seed. For plumbing checks and tests; its images are noise-like.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dagcli.builtin.tokenizer import build_clip_tokenizer
    from dagcli.families.sdxl import SDXL_SCHEDULER

    tokenizer = build_clip_tokenizer(TINY_RANDOM_WORDS, model_max_length=16)
    tokenizer_2 = build_clip_tokenizer(TINY_RANDOM_WORDS, model_max_length=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = tiny_unet(  # SDXL's layout: no attention in the first down block, 2 layers per block
            layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        )
        vae = tiny_vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer, num_hidden_layers=3))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, num_hidden_layers=3,
                                                                      projection_dim=32))
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)


# `--model` name -> builder(seed) of a pipeline with random weights
RANDOM_MODELS: dict[str, Callable[[int], object]] = dict(zip(
    RANDOM_NAMES,
    (build_tiny_random_pipeline, build_tiny_random_sd3, build_tiny_random_flux, build_tiny_random_sdxl),
    strict=True,
))
