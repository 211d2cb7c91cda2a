"""Tiny random-weight CLIP folders and aesthetic MLP files for the reward tests (built from config, no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from dagcli.builtin.tokenizer import build_clip_tokenizer

WORDS = ["a", "red", "blue", "green", "circle", "square", "photo", "of", "on", "white"]
IMAGE_SIZE = 32
PROJECTION_DIM = 16


def make_tiny_clip(folder: Path, seed: int = 0, logit_scale: float | None = None) -> Path:
    """Save a random CLIPModel with its tokenizer and image processor in `folder`; return the folder."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=16)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION_DIM)
    model = CLIPModel(config).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    CLIPImageProcessor(size=size, crop_size=crop).save_pretrained(folder)
    return folder


def random_mlp_state(embed_dim: int = PROJECTION_DIM, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the published predictor's keys and layer sizes (for `embed_dim` inputs)."""
    g = torch.Generator().manual_seed(seed)
    sizes = {0: (1024, embed_dim), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for index, (out_dim, in_dim) in sizes.items():
        state[f"layers.{index}.weight"] = torch.randn(out_dim, in_dim, generator=g) / in_dim**0.5
        state[f"layers.{index}.bias"] = torch.randn(out_dim, generator=g) * 0.1
    return state


def mlp_by_hand(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """[B, D] -> [B]: the five linear layers applied in turn (no activations; dropout off)."""
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return x.squeeze(-1)


def uint8_by_numpy(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] in [0, 1] -> uint8 HWC arrays, computed with numpy."""
    x = images.detach().cpu().float().numpy()  # float32, as the rewards compute it
    return list(np.clip(np.round(x * np.float32(255)), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))
