"""A random-weight pipeline with Stable Diffusion 1.5's exact shapes, built with no download.

UNet, VAE, text encoder and scheduler configs live beside this file as JSON (SD 1.5's published values);
the tokenizer is dagcli's built-in CLIP tokenizer (77 tokens), so the text encoder's vocabulary is smaller than
the real one (49,408), which changes no measured cost beyond the embedding table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
NAME = "sd15-random"
WORDS = (
    "a an the of on in with and photo painting portrait landscape of cat dog horse bird fish tree house city "
    "mountain river car flower red green blue yellow white black small large"
).split()


def read_config(name: str) -> dict:
    """One of the JSON configs beside this file, without its '_' keys."""
    data = json.loads((HERE / f"sd15_{name}_config.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def build_sd15_random_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                               seed: int = 0):
    """A `StableDiffusionPipeline` with SD 1.5's architecture and random weights, in `dtype` on `device`.

    Weights are created directly on `device` (fast on a GPU); deterministic for a seed on a given device.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dagcli.builtin.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(WORDS, model_max_length=77)
    text_cfg = read_config("text")
    text_cfg.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        if torch.device(device).type == "cuda":
            torch.cuda.manual_seed(seed)
        unet = UNet2DConditionModel(**read_config("unet"))
        vae = AutoencoderKL(**read_config("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    scheduler = DDIMScheduler(**read_config("scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)


def load_sd15_random(device: str = "auto", dtype: str = "fp32"):
    """The SD 1.5-shaped random pipeline as a `dagcli.models.LoadedModel` (what `load_model` returns)."""
    from dagcli.families import family_for
    from dagcli.models import LoadedModel, resolve_device, resolve_dtype

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    pipe = build_sd15_random_pipeline(dt, dev)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return LoadedModel(pipe=pipe, family=family_for(pipe, dev), name=NAME, device=dev, dtype=dt)
