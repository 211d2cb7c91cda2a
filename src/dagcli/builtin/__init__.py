"""The built-in tiny models shipped with the package (diffusers / transformers folders of safetensors)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
TINY_SD_DIR = WEIGHTS_DIR / "tiny-sd"  # StableDiffusionPipeline folder (save_pretrained format)
TINY_CLIP_DIR = WEIGHTS_DIR / "tiny-clip"  # CLIPModel + CLIPProcessor folder

# Names accepted by `--model`.
TINY_NAME = "tiny"  # the pretrained tiny text-to-image model (shapes and colours)
TINY_RANDOM_NAME = "tiny-random"  # random weights, built in code; for tests and plumbing checks


def tiny_available() -> bool:
    """True when the pretrained tiny pipeline ships with this install."""
    return (TINY_SD_DIR / "model_index.json").is_file()
