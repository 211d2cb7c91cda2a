"""Run directories and checkpoints: where they live, how 'latest' is found, how a LoRA is attached.

Layout of a run directory (`--output runs/NAME`):
    config.toml                         the resolved configuration
    metrics.jsonl                       one line per epoch
    checkpoints/step-000010/            one folder per saved step (zero-padded), written atomically
        pytorch_lora_weights.safetensors  the LoRA in diffusers' format (`pipe.load_lora_weights(dir)`)
        flow.safetensors                the flow network (DAG)
        trainer_state.pt / .safetensors optimiser, scaler, RNG and counters
        meta.json                       base model, LoRA settings, config, file checksums
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dagcli.errors import DagError

LORA_FILE = "pytorch_lora_weights.safetensors"
META_FILE = "meta.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / META_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A LoRA folder, a checkpoint folder, or a run directory (its latest checkpoint, or `step`) -> folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DagError(f"checkpoint {str(path)!r} not found; expected a run directory or a folder with {LORA_FILE}")
    if path.is_file():
        if path.suffix == ".safetensors":
            return path.parent
        raise DagError(f"checkpoint {str(path)!r} is a file; expected a run directory or a folder with {LORA_FILE}")
    if (path / LORA_FILE).is_file() and step is None:
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise DagError(f"checkpoint {str(path)!r} has no {LORA_FILE} and no checkpoints/step-*/ folders")
    if step is None:
        return checkpoints[-1][1]
    for s, folder in checkpoints:
        if s == step:
            return folder
    raise DagError(f"run {str(path)!r} has no checkpoint at step {step}; valid options: {', '.join(str(s) for s, _ in checkpoints)}")


def read_meta(folder: Path) -> dict:
    """The checkpoint's metadata (empty for a bare LoRA folder)."""
    meta = Path(folder) / META_FILE
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise DagError(f"checkpoint metadata {str(meta)!r} is corrupt ({e.msg})") from e


def attach_lora(pipe, folder: Path) -> None:
    """Load a diffusers-format LoRA into the pipeline's UNet, as plain diffusers would."""
    file = Path(folder) / LORA_FILE
    if not file.is_file():
        raise DagError(f"checkpoint {str(folder)!r} has no {LORA_FILE}")
    try:
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE)
    except Exception as e:
        raise DagError(f"could not load LoRA {str(file)!r} into this model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
