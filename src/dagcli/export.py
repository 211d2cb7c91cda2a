"""Export a trained LoRA for other tools: diffusers folder, kohya single file, or a merged full pipeline.

    diffusers  a folder with `pytorch_lora_weights.safetensors`; `pipe.load_lora_weights(folder)` reads it
    kohya      one `.safetensors` file with `<name>.lora_down.weight` / `.lora_up.weight` / `.alpha` keys, named
               by the family's convention: `lora_unet_*` for UNets (kohya-ss, AUTOMATIC1111, ComfyUI; diffusers'
               module names for SD 1.x/2.x, the original UNet's for SDXL), `lora_transformer_*` with diffusers
               module names for SD3 and FLUX (what ComfyUI reads)
    merged     the base pipeline with the LoRA fused into its weights (its class's `from_pretrained` loads it)

Every function takes a checkpoint folder (see `dagcli.checkpoint.resolve_checkpoint`) and returns what it wrote.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dagcli.checkpoint import LORA_FILE, read_meta, usual_modes, verify_file
from dagcli.errors import DagError

FORMATS = ("diffusers", "kohya", "merged")
KOHYA_SUFFIX = ".safetensors"


@dataclass
class LoraInfo:
    """A checkpoint's LoRA weights (diffusers key names, `unet.` or `transformer.` prefix) and their scale."""

    weights: dict  # name -> tensor
    rank: int
    alpha: float
    base_model: str | None
    family: str | None = None  # "sd", ... as recorded by training (None for a bare LoRA folder)


# --- reading a checkpoint -----------------------------------------------------------------------------------


def read_lora(folder: Path) -> LoraInfo:
    """Load and check a checkpoint's LoRA file; rank and alpha come from the file, else meta.json."""
    from safetensors import safe_open

    folder = Path(folder)
    meta = read_meta(folder)
    file = verify_file(folder, LORA_FILE, meta)
    try:
        with safe_open(str(file), framework="pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
            file_meta = f.metadata() or {}
    except Exception as e:
        raise DagError(f"could not read {str(file)!r} ({type(e).__name__}: {str(e)[:200]})") from e
    if not weights:
        raise DagError(f"{str(file)!r} holds no LoRA weights")
    rank, alpha = _rank_alpha(weights, file_meta, meta.get("lora", {}))
    return LoraInfo(weights=weights, rank=rank, alpha=alpha, base_model=meta.get("base_model"),
                    family=meta.get("family"))


def _rank_alpha(weights: dict, file_meta: dict, meta_lora: dict) -> tuple[int, float]:
    """(rank, alpha): diffusers' adapter metadata in the file, else meta.json, else alpha = rank (scale 1)."""
    adapter = {}
    if "lora_adapter_metadata" in file_meta:
        try:
            adapter = json.loads(file_meta["lora_adapter_metadata"])
        except json.JSONDecodeError:
            adapter = {}
    down = next((v for k, v in weights.items() if k.endswith(".lora.down.weight") or ".lora_A." in k), None)
    prefix = next((k.removesuffix(".r") for k in adapter if k.endswith(".r")), "unet")  # "unet", "transformer"
    rank = adapter.get(f"{prefix}.r", meta_lora.get("rank", down.shape[0] if down is not None else None))
    if rank is None:
        raise DagError("cannot tell the LoRA rank: no lora.down weights and no rank in the checkpoint metadata")
    alpha = adapter.get(f"{prefix}.lora_alpha", meta_lora.get("alpha", rank))
    return int(rank), float(alpha)


def base_model_for(info: LoraInfo, model: str | None, folder: Path) -> str:
    """`--model` when given (the LoRA must fit it), else the checkpoint's base model; checked before anything is
    loaded."""
    from dagcli.checkpoint import check_lora_fits
    from dagcli.models import check_model_name

    name = model or info.base_model
    if not name:
        raise DagError(f"checkpoint {str(folder)!r} does not record its base model; pass --model")
    check_model_name(name)
    check_lora_fits(Path(folder), name)
    return name


def family_of(info: LoraInfo, base: str) -> str:
    """The LoRA's model family: recorded by training, else read from the base model's pipeline class (no weights
    loaded); checkpoints from before families were recorded are Stable Diffusion ones."""
    from dagcli.models import pipeline_class_name

    if info.family:
        return info.family
    from dagcli.families import pipeline_family

    cls = pipeline_family(pipeline_class_name(base) or "")
    return cls.name if cls is not None else "sd"


# --- output paths -------------------------------------------------------------------------------------------


def check_output_dir(path: Path) -> Path:
    """A folder that exists or can be created, and can be written."""
    from dagcli.checks import check_writable_dir

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DagError(f"--output {str(path)!r} is a file; this format writes a folder")
    check_writable_dir(path)
    return path


def check_output_file(path: Path) -> Path:
    """A `.safetensors` file path whose folder can be written."""
    from dagcli.checks import check_writable_dir

    path = Path(path).expanduser()
    if path.suffix != KOHYA_SUFFIX:
        raise DagError(f"--output {str(path)!r} must end in {KOHYA_SUFFIX} for --format kohya (a single file)")
    if path.is_dir():
        raise DagError(f"--output {str(path)!r} is a folder; --format kohya writes a single {KOHYA_SUFFIX} file")
    check_writable_dir(path.parent, flag=f"--output {str(path)!r}: its folder")
    return path


# --- the three formats --------------------------------------------------------------------------------------


def export_diffusers(folder: Path, output: Path, model: str | None = None) -> Path:
    """Copy the checkpoint's LoRA file (diffusers format, alpha in its metadata) into the folder `output`; a
    `model` given must be one the LoRA fits."""
    info = read_lora(folder)  # readable and intact before anything is written
    if model is not None:
        base_model_for(info, model, Path(folder))
    output = check_output_dir(output)
    target = output / LORA_FILE
    output.mkdir(parents=True, exist_ok=True)  # check_output_dir creates nothing
    shutil.copyfile(Path(folder) / LORA_FILE, target)
    return target


def to_kohya(info: LoraInfo, family: str) -> dict:
    """diffusers-format LoRA -> kohya keys of the model family `family`, with the LoRA's real alpha."""
    from dagcli.families import family_class

    return family_class(family).kohya_weights(info.weights, info.alpha)


def export_kohya(folder: Path, output: Path, model: str | None = None) -> Path:
    """Write the LoRA as one kohya-style `.safetensors` file; the base model is recorded in its metadata."""
    from safetensors.torch import save_file

    info = read_lora(folder)
    base = base_model_for(info, model, Path(folder))
    output = check_output_file(output)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(info.rank),
        "ss_network_alpha": f"{info.alpha:g}",
        "ss_sd_model_name": base,
        "ss_training_comment": f"exported by dagcli from {Path(folder).name}",
    }
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        save_file(to_kohya(info, family_of(info, base)), str(output), metadata=metadata)
        usual_modes(output)
    except OSError as e:
        raise DagError(f"--output {str(output)!r} cannot be written ({e.strerror or e})") from e
    return output


def export_merged(folder: Path, output: Path, model: str | None = None) -> Path:
    """Fuse the LoRA into the base pipeline (fp32, CPU) and save the full pipeline folder (safetensors)."""
    from dagcli.checkpoint import attach_lora
    from dagcli.models import load_model

    info = read_lora(folder)
    base = base_model_for(info, model, Path(folder))
    output = check_output_dir(output)
    loaded = load_model(base, device="cpu", dtype="fp32")
    pipe = loaded.pipe
    attach_lora(pipe, Path(folder), loaded.name)
    pipe.fuse_lora(components=[loaded.family.lora_prefix], lora_scale=1.0)
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(output), safe_serialization=True)
    usual_modes(output)
    if loaded.defaults:  # recommended sampling settings travel with the weights
        (output / "dagcli.json").write_text(json.dumps(loaded.defaults, indent=1))
    return output


EXPORTERS = {"diffusers": export_diffusers, "kohya": export_kohya, "merged": export_merged}


def export(folder: Path, fmt: str, output: Path, model: str | None = None) -> Path:
    """Dispatch on the format name."""
    from dagcli.errors import unknown_choice

    if fmt not in EXPORTERS:
        raise unknown_choice("export format", fmt, FORMATS)
    return EXPORTERS[fmt](folder, output, model=model)


__all__ = ["FORMATS", "export", "export_diffusers", "export_kohya", "export_merged", "read_lora", "to_kohya"]
