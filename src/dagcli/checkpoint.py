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
from dagcli.faults import fault_point

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
    digest = read_meta(folder).get("sha256", {}).get(LORA_FILE)
    if digest is not None and sha256(file) != digest:
        raise DagError(f"checkpoint file {str(file)!r} does not match its checksum (corrupt or modified)")
    try:
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE)
    except Exception as e:
        raise DagError(f"could not load LoRA {str(file)!r} into this model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


# --- saving and loading training checkpoints -------------------------------------------------------------

FLOW_FILE = "flow.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


def sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lora_state_dict(unet) -> dict:
    """The UNet's LoRA weights in diffusers' format (what `pipe.load_lora_weights` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def write_lora(folder: Path, unet, rank: int, alpha: float, target_modules: list[str]) -> Path:
    """Write `pytorch_lora_weights.safetensors` the way diffusers' own trainers do (alpha kept as metadata)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(unet).items()},
        safe_serialization=True,
        unet_lora_adapter_metadata={"r": rank, "lora_alpha": alpha, "target_modules": target_modules},
    )
    return Path(folder) / LORA_FILE


def _fsync_dir(folder: Path) -> None:
    import os

    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    unet,
    flow,
    flow_config: dict | None,
    optimizer,
    state: dict,
    config: dict,
    base_model: str,
    lora: dict,
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically: everything goes to a temporary folder that is renamed when complete.

    A process killed at any moment leaves either the previous checkpoints only, or them plus the new one.
    """
    import os
    import shutil

    import torch
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    for stale in root.glob(".tmp-*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    write_lora(tmp, unet, lora["rank"], lora["alpha"], lora["target_modules"])
    fault_point("checkpoint-write")
    if flow is not None:
        weights = {k: v.detach().float().cpu().contiguous() for k, v in flow.state_dict().items()}
        save_file(weights, str(tmp / FLOW_FILE), metadata={"config": json.dumps(flow_config)})
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    torch.save({"torch": torch.get_rng_state()}, tmp / RNG_FILE)
    files = sorted(p.name for p in tmp.iterdir())
    meta = {
        "format": 1,
        "step": step,
        "base_model": base_model,
        "lora": lora,
        "state": state,
        "config": config,
        "algorithm": config.get("train", {}).get("algorithm"),
        "sha256": {name: sha256(tmp / name) for name in files},
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    fault_point("checkpoint-rename")
    if final.exists():  # re-saving the same step (e.g. a stop right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checksums(folder: Path, meta: dict) -> None:
    for name, digest in meta.get("sha256", {}).items():
        path = Path(folder) / name
        if not path.is_file():
            raise DagError(f"checkpoint {str(folder)!r} is missing {name}")
        if sha256(path) != digest:
            raise DagError(f"checkpoint file {str(path)!r} does not match its checksum (corrupt or modified)")


def load_checkpoint_into(
    folder: Path, *, unet, flow, optimizer, base_model: str, lora_rank: int, algorithm: str
) -> dict:
    """Restore LoRA, flow network and optimiser from a checkpoint; returns the saved trainer state."""
    import torch
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_meta(folder)
    if not meta:
        raise DagError(f"{str(folder)!r} is not a training checkpoint (no {META_FILE})")
    problems = []
    if meta.get("base_model") != base_model:
        problems.append(f"base model {meta.get('base_model')!r} (this run: {base_model!r})")
    if meta.get("lora", {}).get("rank") != lora_rank:
        problems.append(f"LoRA rank {meta.get('lora', {}).get('rank')} (this run: {lora_rank})")
    if meta.get("algorithm") != algorithm:
        problems.append(f"algorithm {meta.get('algorithm')!r} (this run: {algorithm!r})")
    if problems:
        raise DagError(f"checkpoint {str(folder)!r} does not match this run: " + "; ".join(problems))
    verify_checksums(folder, meta)
    try:
        lora = load_file(str(folder / LORA_FILE))
        peft_sd = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in lora.items()})
        result = set_peft_model_state_dict(unet, peft_sd)
        if getattr(result, "unexpected_keys", None):
            raise DagError(f"checkpoint LoRA has keys this model lacks, e.g. {result.unexpected_keys[0]!r}")
        if flow is not None:
            flow.load_state_dict(load_file(str(folder / FLOW_FILE)))
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True, map_location="cpu"))
        torch.set_rng_state(torch.load(folder / RNG_FILE, weights_only=True)["torch"])
    except DagError:
        raise
    except Exception as e:
        raise DagError(f"could not restore checkpoint {str(folder)!r} ({type(e).__name__}: {str(e)[:200]})") from e
    return meta["state"]
