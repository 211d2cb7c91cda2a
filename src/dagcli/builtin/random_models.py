"""Random-weight pipelines built in code, offline, for plumbing checks and tests: `--model tiny-random` and
friends. Each builder is deterministic for a seed; its images are noise-like."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dagcli.builtin import RANDOM_NAMES
from dagcli.builtin.random_flow import build_tiny_random_flux, build_tiny_random_sd3
from dagcli.families.sdxl import build_tiny_random_sdxl

TINY_RANDOM_WORDS = (
    "a an the of on in with and small large big red green blue yellow purple orange white black pink "
    "circle square triangle background photo painting cat dog horse bird fish"
).split()


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


def tiny_unet(**config):
    """A random UNet on 8x8x4 latents, two blocks 32 and 64 wide; `config` gives its blocks and conditioning."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{"sample_size": 8, "in_channels": 4, "out_channels": 4,
                                   "block_out_channels": (32, 64), "norm_num_groups": 8, **config})


def tiny_vae(**overrides):
    """A random 4-channel VAE that maps 32 px images to 8x8 latents (random init: seed the caller's RNG)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{
        "in_channels": 3, "out_channels": 3, "block_out_channels": (16, 32, 32), "latent_channels": 4,
        "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
        "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32, **overrides,
    })


def tiny_text_config(tokenizer, **overrides):
    """A 32-wide CLIP text encoder config for `tokenizer` (its vocabulary, window and special tokens)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **overrides,
    })


# `--model` name -> builder(seed) of a pipeline with random weights
RANDOM_MODELS: dict[str, Callable[[int], object]] = dict(zip(
    RANDOM_NAMES,
    (build_tiny_random_pipeline, build_tiny_random_sd3, build_tiny_random_flux, build_tiny_random_sdxl),
    strict=True,
))
