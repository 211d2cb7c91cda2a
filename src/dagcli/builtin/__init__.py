"""The built-in tiny models shipped with the package (diffusers / transformers folders of safetensors)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
TINY_SD_DIR = WEIGHTS_DIR / "tiny-sd"  # StableDiffusionPipeline folder (save_pretrained format)
TINY_CLIP_DIR = WEIGHTS_DIR / "tiny-clip"  # CLIPModel + CLIPProcessor folder
TINY_FLOW_DIR = WEIGHTS_DIR / "tiny-flow"  # StableDiffusion3Pipeline folder (rectified flow, no T5)
TINY_DECODER_DIR = WEIGHTS_DIR / "tiny-sd-taesd"  # AutoencoderTiny folder distilled from tiny-sd's VAE

# Names accepted by `--model`.
TINY_NAME = "tiny"  # the pretrained tiny text-to-image model (shapes and colours)
TINY_FLOW_NAME = "tiny-flow"  # the pretrained tiny rectified-flow (SD3-style) model, same data and parts
TINY_RANDOM_NAME = "tiny-random"  # random weights, built in code; for tests and plumbing checks
TINY_DECODER_NAME = "tiny-taesd"  # `dag.x0_decoder` name of TINY_DECODER_DIR (`tools/tiny_decoder.py`)
# the random-weight built-in names, one per family (their builders: `random_models.RANDOM_MODELS`)
RANDOM_NAMES = (TINY_RANDOM_NAME, "tiny-random-sd3", "tiny-random-flux", "tiny-random-sdxl")


# pretrained built-in `--model` name -> its pipeline folder (both judged by the tiny CLIP in TINY_CLIP_DIR)
PRETRAINED_DIRS = {TINY_NAME: TINY_SD_DIR, TINY_FLOW_NAME: TINY_FLOW_DIR}
# every built-in `--model` name (readable without importing torch, e.g. by `--help`)
BUILTIN_NAMES = (*PRETRAINED_DIRS, *RANDOM_NAMES)


# Training defaults of every built-in model (pretrained and random) that their dagcli.json may override: a reward
# that needs no download, and an optimiser step per micro-batch (the reference's accumulation of 200 fits Stable
# Diffusion's 50-step epochs; a small run of a tiny model has a few micro-batches per epoch)
BUILTIN_TRAIN_DEFAULTS = {"default_reward": "compressibility", "default_gradient_accumulation_steps": 1}


def tiny_available(name: str = TINY_NAME) -> bool:
    """True when the pretrained built-in pipeline `name` ships with this install."""
    return (PRETRAINED_DIRS[name] / "model_index.json").is_file()


def is_pretrained_dir(path: str | Path) -> bool:
    """True when `path` is the folder of a pretrained built-in pipeline (however it is spelt)."""
    return Path(path).expanduser().resolve() in {d.resolve() for d in PRETRAINED_DIRS.values()}
