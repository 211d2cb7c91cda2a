"""Load a text-to-image pipeline of a supported family by hub id, local folder or built-in name; devices and dtypes.

Every command loads its model through `load_model`, so offline behaviour and errors are the same everywhere.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dagcli.errors import DagError
from dagcli.extensions import NamedModel, decoders, named_model, named_models
from dagcli.families import family_for
from dagcli.faults import fault_point

REAL_USE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def builtin_names() -> list[str]:
    """The `--model` names the extensions register (`dagcli.extensions.named_models`)."""
    return list(named_models())


def default_model() -> str:
    """The available named model of lowest `default_rank` (a shipped pretrained one before a random one), else
    the reference Stable Diffusion."""
    ranked = sorted((m for m in named_models().values() if m.default_rank is not None and m.available()),
                    key=lambda m: m.default_rank)
    return ranked[0].name if ranked else REAL_USE_MODEL


def _builder(model: str):
    """The random-weight builder of a named model built in code, else None."""
    named = named_models().get(model)
    return named.build if named is not None else None


def _folder(model: str) -> Path | str:
    """The pipeline folder of a named model with shipped weights, else `model` itself."""
    named = named_models().get(model)
    return named.folder if named is not None and named.folder is not None else model


def _built_in_code_fallback() -> str:
    return next((m.name for m in named_models().values() if m.build is not None), REAL_USE_MODEL)


@dataclass
class LoadedModel:
    """A pipeline plus what the commands need to know about it."""

    pipe: object  # a diffusers pipeline of a supported family
    family: object  # its `dagcli.families.Family`
    name: str  # what the user asked for (hub id, folder, or built-in name)
    device: torch.device
    dtype: torch.dtype  # of the frozen weights
    shipped: bool = False  # a named model's shipped pipeline folder (by name or path), not one built in code
    defaults: dict = field(default_factory=dict)  # recommended sampling settings (guidance, steps, resolution)

    @property
    def resolution(self) -> int:
        """The model's native image size in pixels."""
        return self.family.native_resolution


def same_model(a: str | None, b: str | None) -> bool:
    """The same name, or two paths to the same folder (None: unknown, taken as the same)."""
    if a is None or b is None or a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. 'cuda' without a GPU is an error."""
    if device not in DEVICES:
        raise DagError(f"unknown device {device!r}; valid options: {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DagError("device 'cuda' requested but no CUDA GPU is available; valid options here: auto, cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise DagError(f"unknown dtype {dtype!r}; valid options: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_model_name(model: str) -> None:
    """Fail fast (before any loading) on a name that is neither built-in, a folder, nor a hub id."""
    named = named_models().get(model)
    if named is not None:
        if not named.available():
            raise DagError(f"built-in model {model!r} is not installed with this package; "
                           f"use {_built_in_code_fallback()!r}")
        return
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise DagError(f"model folder {str(path)!r} has no model_index.json; expected a diffusers pipeline folder")
        return
    if not _HUB_ID.match(model):
        raise DagError(
            f"unknown model {model!r}; valid options: {', '.join(builtin_names())}, "
            f"a local diffusers folder, or a hub id such as {REAL_USE_MODEL}"
        )


def load_model(model: str | None = None, device: str = "auto", dtype: str = "fp32") -> LoadedModel:
    """Load a pipeline of a supported family with frozen weights in `dtype` on `device`.

    `model` is a built-in name ('tiny', 'tiny-random', ...), a local diffusers folder, or a hub id. Hub ids are
    read from the local Hugging Face cache first and only then downloaded; offline, a one-line `DagError`
    says how to provide the weights.
    """
    model = model or default_model()
    check_model_name(model)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    _quiet_loading()
    fault_point("model-load")
    build = _builder(model)
    if build is not None:
        pipe, shipped = build(0).to(dtype=dt), False
    else:
        folder = _folder(model)
        pipe = _from_pretrained(str(folder), dt)
        shipped = _is_shipped_folder(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(dev)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    return LoadedModel(pipe=pipe, family=family_for(pipe, dev), name=model, device=dev, dtype=dt,
                       shipped=shipped, defaults=_read_defaults(model))


def _is_shipped_folder(folder: Path | str) -> bool:
    named = named_model(folder)
    return named is not None and named.folder is not None


@dataclass(frozen=True)
class ModelDefaults:
    """Sampling settings that suit a model, used where the user gives none."""

    steps: int
    guidance: float
    eta: float  # the sampler's noise level while training
    sample_eta: float  # ... and for `dag sample` / `dag eval`
    prompts: str  # training prompt set or file
    eval_prompts: str
    resolution: int | None  # pixels; None = the model's native size
    source: str  # where they come from, for the run's messages
    sample_steps: int = 0  # steps of `dag sample` / `dag eval` (0: as `steps`)
    max_eta: float | None = 1.0  # the largest noise level the family's sampler is defined for (None: no bound)
    lora_targets: tuple[str, ...] = ()  # the family's default LoRA targets
    reward: str = "aesthetic"  # training reward
    gradient_accumulation_steps: int = 200  # micro-batches per optimiser step


def model_defaults(model: str | None) -> ModelDefaults:
    """The `dagcli.json` beside a pipeline (the built-in models carry one), over a named model's training
    defaults (`NamedModel.train_defaults`), over its family's reference settings (Stable Diffusion's when
    the family cannot be told without loading); reads no weights."""
    from dagcli.families.sd import SDFamily

    model = model or default_model()
    family = known_family(model) or SDFamily
    ref, saved = family.reference, _read_defaults(model)
    train = {**_named_train_defaults(model), **saved}
    return ModelDefaults(
        steps=int(saved.get("default_steps", ref.steps)),
        guidance=float(saved.get("default_guidance", ref.guidance)),
        eta=float(saved.get("default_eta", ref.train_eta)),
        sample_eta=float(saved.get("default_sample_eta", ref.sample_eta)),
        prompts=saved.get("train_prompt_set", saved.get("prompt_set", ref.prompts)),
        eval_prompts=saved.get("prompt_set", ref.prompts),
        resolution=saved.get("resolution"),
        source=f"model {model!r}" if saved else ref.source,
        sample_steps=int(saved.get("default_sample_steps", saved.get("default_steps", ref.sample_steps or ref.steps))),
        max_eta=ref.max_eta,
        lora_targets=tuple(family.default_lora_targets),
        reward=train.get("default_reward", ref.reward),
        gradient_accumulation_steps=int(train.get("default_gradient_accumulation_steps",
                                                  ref.gradient_accumulation_steps)),
    )


def _named_train_defaults(model: str) -> dict:
    """The training defaults of a named model, by name or by the path of its shipped pipeline ({}: none)."""
    named: NamedModel | None = named_model(model)
    return dict(named.train_defaults) if named is not None else {}


def known_family(model: str | None) -> type | None:
    """The family class of `model` when its pipeline class can be read without loading weights, else None."""
    from dagcli.families import pipeline_family

    return pipeline_family(pipeline_class_name(model or default_model()) or "")


def empty_denoiser(model: str) -> torch.nn.Module | None:
    """The network `model`'s LoRA goes into, with its layers' shapes but no weights (on the meta device), built
    from its configuration; None when that cannot be read without a download."""
    family = known_family(model)
    if family is None:
        return None
    build = _builder(model)
    if build is not None:  # built in code, small: the real thing
        return getattr(build(0), family.lora_prefix)
    import diffusers
    from accelerate import init_empty_weights

    from dagcli.quiet import quiet_libraries

    _, class_name = (model_index(model).get(family.lora_prefix) or [None, None])[:2]
    cls = getattr(diffusers, class_name or "", None)
    if cls is None:
        return None
    local = Path(_folder(model)).expanduser()
    source = str(local if local.exists() else model)
    try:
        config = cls.load_config(source, subfolder=family.lora_prefix, local_files_only=True)
        with init_empty_weights(), quiet_libraries():
            return cls.from_config(config)
    except Exception:  # not cached yet, or a configuration this diffusers cannot build: checked once loaded
        return None


def _read_defaults(model: str) -> dict:
    """Recommended settings stored beside a pipeline in `dagcli.json` (the built-in model has one)."""
    folder = Path(_folder(model))
    meta = folder / "dagcli.json"
    if _builder(model) is None and meta.is_file():
        return json.loads(meta.read_text())
    return {}


def _quiet_loading() -> None:
    """No per-component loading bars, retry warnings or dtype notes from the libraries."""
    from dagcli.hub import quiet_loading

    quiet_loading()


def _from_pretrained(name: str, dtype: torch.dtype):
    """A pipeline from a local folder, else from the Hugging Face cache, else downloaded (when possible); its
    class is the one its model_index.json names, and must be a supported family's."""
    from diffusers import DiffusionPipeline

    from dagcli.hub import cached_or_download

    def load(local: bool):
        family = _supported_family(name, local)
        # components the folder records as absent ([null, null], e.g. SD3 without T5) are passed as None
        absent = {k: None for k, v in model_index(name, local).items() if v == [None, None]}
        kwargs = {"use_safetensors": True, "dtype": dtype, **absent, **(family.load_kwargs if family else {})}
        return DiffusionPipeline.from_pretrained(name, local_files_only=local, **kwargs)

    if Path(name).exists():
        return _load_or_explain(lambda: load(True), name)
    return cached_or_download(load, "model", name, "--model PATH")


def _supported_family(name: str, local: bool):
    """The family of the pipeline `name` per its model_index.json (None when that file cannot be read yet); an
    unsupported pipeline class is a one-line error before any weights load."""
    from dagcli.families import FAMILIES, pipeline_family

    class_name = pipeline_class_name(name, local_only=local)
    if class_name is None:
        return None
    family = pipeline_family(class_name)
    if family is None:
        raise DagError(f"model {name!r} is a {class_name}, which dagcli does not train; supported pipelines: "
                       + ", ".join(sorted(FAMILIES)))
    return family


def pipeline_class_name(name: str, local_only: bool = True) -> str | None:
    """The `_class_name` in a pipeline's model_index.json (built-in, folder, or hub cache), without loading
    weights; None when it cannot be read."""
    build = _builder(name)
    if build is not None:
        return type(build(0)).__name__
    return model_index(name, local_only).get("_class_name")


def model_index(name: str, local_only: bool = True) -> dict:
    """A pipeline's model_index.json (built-in, folder, or hub cache) without loading weights; {} when it cannot
    be read."""
    folder = Path(_folder(name)).expanduser()
    index = folder / "model_index.json"
    if not index.is_file():
        try:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(name, "model_index.json", local_files_only=local_only))
        except Exception:
            return {}
    try:
        return json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _load_or_explain(load, name: str):
    """`load()` of a local pipeline folder; any failure becomes one line naming the folder."""
    from dagcli.hub import first_line

    try:
        return load()
    except DagError:
        raise
    except Exception as e:  # missing files, wrong format: the folder is not a usable pipeline
        raise DagError(f"cannot load model folder {name!r}: {first_line(e)}") from e


def _decoder_path(name: str) -> Path:
    """The folder of a registered x̂0 decoder name (`dagcli.extensions.register_decoder`), else `name` as a path."""
    return decoders().get(name) or Path(name).expanduser()


def check_decoder_name(name: str) -> None:
    """Fail fast on an x̂0 decoder that is neither an AutoencoderTiny folder nor a hub id."""
    path = _decoder_path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise DagError(f"dag.x0_decoder {name!r} has no config.json; expected an AutoencoderTiny folder")
        return
    if not _HUB_ID.match(name):
        names = " or ".join(repr(n) for n in decoders())
        raise DagError(f"dag.x0_decoder {name!r} is neither {names} (the built-in model's), a folder, "
                       "nor a hub id such as madebyollin/taesd")


def load_tiny_decoder(name: str, device: torch.device, dtype: torch.dtype):
    """An `AutoencoderTiny` (local folder or hub id, cache first) to decode forward-looking x̂0 images cheaply."""
    from diffusers import AutoencoderTiny

    from dagcli.hub import cached_or_download

    source = str(_decoder_path(name)) if _decoder_path(name).exists() else name

    def load(local: bool):
        return AutoencoderTiny.from_pretrained(source, local_files_only=local, use_safetensors=True, dtype=dtype)

    if source != name or Path(source).exists():
        decoder = _load_or_explain(lambda: load(True), source)
    else:
        decoder = cached_or_download(load, "x̂0 decoder", name, "--set dag.x0_decoder=PATH")
    decoder.requires_grad_(False)
    return decoder.to(device).eval()


def add_lora(denoiser: torch.nn.Module, lora, seed: int) -> torch.nn.Module:
    """Attach a peft LoRA (the `[lora]` section) to the denoiser; its random init depends on the run seed only.
    The trainable weights are float32 whatever the frozen weights' dtype."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        denoiser.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                        init_lora_weights=lora.init == "true" or lora.init,
                                        target_modules=list(lora.target_modules)))
    for p in denoiser.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return denoiser


@contextlib.contextmanager
def lora_disabled(denoiser: torch.nn.Module):
    """The denoiser without its LoRA inside the block (peft's adapter switch: no copy of the weights)."""
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


def lora_tensors(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the denoiser's LoRA weights by parameter name: a frozen policy costs only these."""
    return {n: p.detach().clone() for n, p in denoiser.named_parameters() if "lora_" in n}


def _lora_parameters(denoiser: torch.nn.Module, names) -> dict[str, torch.nn.Parameter]:
    params = {n: p for n, p in denoiser.named_parameters() if "lora_" in n}
    if set(names) != set(params):
        raise ValueError(f"stored LoRA weights do not match the denoiser's: {len(set(names) ^ set(params))} "
                         "names differ; take them with lora_tensors from the same denoiser")
    return params


@contextlib.contextmanager
def lora_swapped(denoiser: torch.nn.Module, tensors: dict[str, torch.Tensor]):
    """The denoiser with `tensors` (from `lora_tensors`) as its LoRA weights inside the block; its own are put
    back bit for bit after. The weights are copied in place: run the block before a forward whose graph is still
    to be differentiated (autograd refuses a backward through weights changed since)."""
    params = _lora_parameters(denoiser, tensors)
    own = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    try:
        yield denoiser
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(own[n])


@torch.no_grad()
def blend_lora(stored: dict[str, torch.Tensor], denoiser: torch.nn.Module, decay: float) -> None:
    """stored ← decay·stored + (1 − decay)·current LoRA weights, in place (decay 0: a copy of the current)."""
    params = _lora_parameters(denoiser, stored)
    for n, p in params.items():
        stored[n].mul_(decay).add_(p.detach(), alpha=1.0 - decay)
