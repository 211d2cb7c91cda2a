"""Run directories and checkpoints: where they live, how 'latest' is found, how a LoRA is attached.

Layout of a run directory (`--output runs/NAME`):
    config.toml                         the resolved configuration
    metrics.jsonl                       one line per epoch
    checkpoints/step-000010/            one folder per saved step (zero-padded), written atomically
        pytorch_lora_weights.safetensors  the LoRA in diffusers' format (`pipe.load_lora_weights(dir)`)
        flow.safetensors                an algorithm's own network (DAG's flow network), its config as metadata
        algorithm_state.safetensors     an algorithm's own tensors, if it keeps any (DiffusionNFT's sampling LoRA)
        optimizer.pt, rng.pt            optimiser and RNG state (read with weights_only=True)
        meta.json                       base model, LoRA settings, config, counters, file checksums
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dagcli.errors import DagError
from dagcli.faults import fault_point
from dagcli.quiet import quiet_libraries

LORA_FILE = "pytorch_lora_weights.safetensors"
META_FILE = "meta.json"
TENSORS_FILE = "algorithm_state.safetensors"  # an algorithm's own tensors (DiffusionNFT's sampling LoRA)
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Counters and buffers that a checkpoint must carry besides weights."""

    epoch: int = 0  # epochs completed
    optimizer_steps: int = 0
    trajectories_seen: int = 0  # over all processes
    nonfinite_rewards: int = 0
    algorithm: dict = field(default_factory=dict)  # the algorithm's own state (DDPO's reward buffers)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        d = dict(d)
        if "ddpo_buffers" in d:  # checkpoints written before algorithms kept their own state
            d["algorithm"] = {"buffers": d.pop("ddpo_buffers")}
        return cls(**d)


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


def trained_resolution(folder: Path) -> int | None:
    """The image size a training checkpoint was trained at (its recorded `sampling.resolution`), else None."""
    value = read_meta(folder).get("config", {}).get("sampling", {}).get("resolution")
    return int(value) if isinstance(value, int) and value > 0 else None


def trained_lora_steps(folder: Path) -> tuple[int, int] | None:
    """(k, T) when the checkpoint's LoRA was trained to sample only the first k of T steps, the base model the rest
    (`rtb.tail_steps`, `dag.tail_steps`); None when it samples every step."""
    value = read_meta(folder).get("lora", {}).get("steps")
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return value[0], value[1]
    return None


def lora_steps_for(folder: Path | None, steps: int) -> int | None:
    """The leading steps of a `steps`-step chain the checkpoint's LoRA samples (`sampling.lora_steps_at`), None for
    all of them (no checkpoint, or one without a base-model tail)."""
    from dagcli.sampling import lora_steps_at

    trained = trained_lora_steps(folder) if folder is not None else None
    return lora_steps_at(steps, *trained) if trained else None


def attach_lora(pipe, folder: Path, model: str | None = None) -> None:
    """Load a diffusers-format LoRA into the pipeline's denoiser, as plain diffusers would, once it is checked to
    fit (`check_lora_fits`); `model` names the pipeline in messages. A failure is one line: the libraries' own
    per-key messages are silenced."""
    from dagcli.families import pipeline_family

    file = verify_file(folder, LORA_FILE)
    family = pipeline_family(type(pipe).__name__)
    if family is not None:
        check_lora_fits(folder, model or "this model", family, getattr(pipe, family.lora_prefix))
    try:
        with quiet_libraries():
            pipe.load_lora_weights(str(folder), weight_name=LORA_FILE)
    except Exception as e:
        raise DagError(f"could not load LoRA {str(file)!r} into {model or 'this model'!r} "
                       f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from e


# --- does a LoRA belong to a model ---------------------------------------------------------------------------

LORA_SUFFIXES = (".lora.down.weight", ".lora.up.weight", ".lora_A.weight", ".lora_B.weight")


def lora_shapes(folder: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """module path (with its `unet.` / `transformer.` prefix) -> {"down": shape, "up": shape}, read from the
    LoRA file's header (no tensors); keys of another form are kept under their own name with no shapes."""
    from safetensors import safe_open

    file = Path(folder) / LORA_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise DagError(f"could not read {str(file)!r} ({type(e).__name__}: {str(e)[:200]})") from e
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            modules.setdefault(key, {})
            continue
        side = "down" if suffix in (".lora.down.weight", ".lora_A.weight") else "up"
        modules.setdefault(key.removesuffix(suffix), {})[side] = shape
    return modules


def check_lora_fits(folder: Path, model: str, family=None, denoiser=None) -> None:
    """The checkpoint's LoRA belongs to `model`: the same family as the one it was trained on, and a down/up
    pair of the right shapes for a layer of the model's denoiser for every LoRA module; else one DagError line
    naming both models. `family` (a family class or instance) and `denoiser` are the loaded model's; without
    them both are read from the model's configuration, no weights loaded (the shape check is skipped when
    that configuration is not on this machine yet)."""
    from dagcli.models import empty_denoiser, known_family

    meta, modules = read_meta(folder), lora_shapes(folder)
    family = family or known_family(model)
    if family is None:
        return
    problem = _lora_problem(modules, meta.get("family"), family, None)  # family and prefix: no model built
    if problem is None:
        problem = _lora_problem(modules, meta.get("family"), family, denoiser or empty_denoiser(model))
    if problem is None:
        return
    trained_on = meta.get("base_model")
    if trained_on == model:
        raise DagError(f"checkpoint {str(folder)!r} no longer fits {model!r}, the model it was trained on (changed "
                       f"since): {problem}; use the model as it was when trained")
    if trained_on:
        raise DagError(f"checkpoint {str(folder)!r} was trained on {trained_on!r}, not on {model!r}: {problem}; "
                       f"use --model {trained_on} with it, or a checkpoint trained on {model}")
    raise DagError(f"LoRA {str(folder)!r} does not belong to {model!r}: {problem}; use it with the model it "
                   "was trained on")


def _lora_problem(modules: dict, trained_family: str | None, family, denoiser) -> str | None:
    """Why a LoRA (`lora_shapes`) cannot load into a model of `family` with `denoiser` (None: it can)."""
    if trained_family and trained_family != family.name:
        return f"its LoRA is for the {trained_family} family, the model is of the {family.name} family"
    prefixes = sorted({name.split(".", 1)[0] for name in modules})
    others = [p for p in prefixes if p != family.lora_prefix and not p.startswith("text_encoder")]
    if family.lora_prefix not in prefixes or others:
        return (f"its weights are for {' and '.join(repr(p) for p in prefixes)}, the model's LoRA goes into its "
                f"{family.lora_prefix!r}")
    if denoiser is None:
        return None
    layers = dict(denoiser.named_modules())
    missing = []
    ours = {name: pair for name, pair in modules.items() if name.split(".", 1)[0] == family.lora_prefix}
    for name, pair in ours.items():  # text-encoder LoRAs (from other trainers) are diffusers' to check
        layer = layers.get(name.partition(".")[2])
        layer = getattr(layer, "base_layer", layer)  # a peft-wrapped layer: the original beneath
        weight = getattr(layer, "weight", None)
        if weight is None or set(pair) != {"down", "up"}:
            missing.append(name)
            continue
        down, up = pair["down"], pair["up"]
        if down[1] != weight.shape[1] or up[0] != weight.shape[0] or tuple(down[2:]) != tuple(weight.shape[2:]):
            return (f"its LoRA for {name} maps {down[1]} -> {up[0]} features, the model's layer "
                    f"{weight.shape[1]} -> {weight.shape[0]}")
    if missing:
        return f"{len(missing)} of its {len(ours)} LoRA modules have no layer in the model, e.g. {missing[0]}"
    return None


# --- saving and loading training checkpoints -------------------------------------------------------------

OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


def sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lora_state_dict(denoiser) -> dict:
    """The denoiser's LoRA weights in diffusers' format (what `pipe.load_lora_weights` reads), float32 on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    # diffusers renames only the attention projections (to_q.lora_A -> to_q.lora.down) and its loader converts a
    # file only when its first key is not in peft form: every other target (conv1, proj_in, ...) gets the same form
    weights = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in weights.items()}
    return {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}


def write_lora(folder: Path, family, denoiser, rank: int, alpha: float, target_modules: list[str]) -> Path:
    """Write `pytorch_lora_weights.safetensors` the way diffusers' own trainers do (alpha kept as metadata)."""
    family.save_lora(folder, lora_state_dict(denoiser), {"r": rank, "lora_alpha": alpha,
                                                         "target_modules": target_modules})
    return Path(folder) / LORA_FILE


def usual_modes(path: Path) -> None:
    """Give the `.safetensors` files at `path` (a file, or a folder and its subfolders) the mode every other
    file gets, 0666 less the umask: safetensors writes its files 0600."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    for file in [path] if path.is_file() else path.rglob("*.safetensors"):
        os.chmod(file, 0o666 & ~mask)


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


def save_checkpoint(run_dir: Path, *, step: int, family, denoiser, modules: dict, module_metadata: dict[str, dict],
                    optimizer, state: dict, config: dict, base_model: str, lora: dict, keep_last: int,
                    tensors: dict | None = None) -> Path:
    """Write a checkpoint atomically: everything goes to a temporary folder that is renamed when complete.

    A process killed at any moment leaves either the previous checkpoints only, or them plus the new one; an
    interrupted write (Ctrl-C) removes its temporary folder, and the rename and pruning finish before a signal
    is handled. `modules` (name -> network, e.g. the flow network) are written as `NAME.safetensors` with their
    metadata; `tensors` (an algorithm's own state, e.g. a stored policy) as `TENSORS_FILE` when there are any.
    """
    import os
    import shutil

    from dagcli.stopping import signals_deferred

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    for stale in root.glob(".tmp-*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    try:
        meta = {"format": 1, "step": step, "base_model": base_model, "family": family.name, "lora": lora,
                "state": state, "config": config, "algorithm": config.get("train", {}).get("algorithm")}
        _write_files(tmp, meta, family, denoiser, modules, module_metadata, optimizer, tensors or {})
    except BaseException:  # KeyboardInterrupt too: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with signals_deferred():  # the previous checkpoints are never half deleted, "latest" never half renamed
        fault_point("checkpoint-rename")
        if final.exists():  # re-saving the same step (e.g. a stop right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, meta: dict, family, denoiser, modules: dict, module_metadata: dict[str, dict],
                 optimizer, tensors: dict) -> None:
    """A checkpoint's files in `tmp`, `meta.json` (with every file's checksum) last, all synced to disk."""
    import torch
    from safetensors.torch import save_file

    lora = meta["lora"]
    write_lora(tmp, family, denoiser, lora["rank"], lora["alpha"], lora["target_modules"])
    fault_point("checkpoint-write")
    for name, module in modules.items():
        weights = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
        metadata = {k: json.dumps(v) for k, v in module_metadata.get(name, {}).items()}
        save_file(weights, str(tmp / f"{name}.safetensors"), metadata=metadata)
    if tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    torch.save({"torch": torch.get_rng_state()}, tmp / RNG_FILE)
    usual_modes(tmp)
    files = sorted(p.name for p in tmp.iterdir())
    meta["sha256"] = {name: sha256(tmp / name) for name in files}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    _fsync_dir(tmp)


def verify_file(folder: Path, name: str, meta: dict | None = None) -> Path:
    """The checkpoint file `name`, checked against the checksum its meta.json records (when it records one)."""
    path = Path(folder) / name
    if not path.is_file():
        raise DagError(f"checkpoint {str(folder)!r} has no {name}")
    digest = (read_meta(folder) if meta is None else meta).get("sha256", {}).get(name)
    if digest is not None and sha256(path) != digest:
        raise DagError(f"checkpoint file {str(path)!r} does not match its checksum (corrupt or modified)")
    return path


def verify_checkpoint(folder: Path) -> dict:
    """Every file of a checkpoint checked against the checksum its meta.json records; returns the metadata."""
    meta = read_meta(folder)
    for name in meta.get("sha256", {}):
        verify_file(folder, name, meta)
    return meta


def check_compatible(folder: Path, meta: dict, *, base_model: str, lora_rank: int, lora_targets: list[str],
                     algorithm: str) -> None:
    """A checkpoint can continue this run: same base model, LoRA shape and algorithm (else one line naming each
    difference), and its LoRA fits the model (`check_lora_fits`: a model folder may have changed since)."""
    if not meta:
        raise DagError(f"{str(folder)!r} is not a training checkpoint (no {META_FILE}); --resume-from needs a "
                       "checkpoints/step-* folder or a run directory")
    lora = meta.get("lora", {})
    problems = []
    if meta.get("base_model") != base_model:
        problems.append(f"base model {meta.get('base_model')!r} (this run: {base_model!r})")
    if lora.get("rank") != lora_rank:
        problems.append(f"LoRA rank {lora.get('rank')} (this run: {lora_rank})")
    if list(lora.get("target_modules", [])) != list(lora_targets):
        problems.append(f"LoRA targets {lora.get('target_modules')} (this run: {list(lora_targets)})")
    if meta.get("algorithm") != algorithm:
        problems.append(f"algorithm {meta.get('algorithm')!r} (this run: {algorithm!r})")
    if problems:
        raise DagError(f"checkpoint {str(folder)!r} does not match this run: " + "; ".join(problems))
    check_lora_fits(folder, base_model)


def load_checkpoint_into(folder: Path, *, lora_prefix: str, denoiser, modules: dict, optimizer) -> dict:
    """Restore the LoRA, the algorithm's modules and the optimiser from a checkpoint whose compatibility was
    checked (`check_compatible`); every file is checked against its checksum. Returns the saved trainer state."""
    import torch
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = verify_checkpoint(folder)
    try:
        lora = load_file(str(folder / LORA_FILE))
        peft_sd = convert_unet_state_dict_to_peft({k.removeprefix(f"{lora_prefix}."): v for k, v in lora.items()})
        result = set_peft_model_state_dict(denoiser, peft_sd)
        if getattr(result, "unexpected_keys", None):
            raise DagError(f"checkpoint LoRA has keys this model lacks, e.g. {result.unexpected_keys[0]!r}")
        for name, module in modules.items():
            module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True, map_location="cpu"))
        torch.set_rng_state(torch.load(folder / RNG_FILE, weights_only=True)["torch"])
    except DagError:
        raise
    except Exception as e:
        raise DagError(f"could not restore checkpoint {str(folder)!r} ({type(e).__name__}: {str(e)[:200]})") from e
    return meta["state"]


def load_tensors(folder: Path) -> dict:
    """The algorithm's own tensors of a checkpoint (`TENSORS_FILE`, checked by `load_checkpoint_into`), {} if none."""
    from safetensors.torch import load_file

    path = Path(folder) / TENSORS_FILE
    return load_file(str(path)) if path.exists() else {}
