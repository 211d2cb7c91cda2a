"""One typed configuration for `dag train`: frozen dataclasses, TOML presets, `--set section.key=value`.

Defaults are the reference values for Stable Diffusion 1.5 unless a comment says otherwise. Unknown keys and
wrong types are rejected, and every problem is reported at once.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from dagcli.errors import DagError

FLOW_SAMPLERS = ("sde", "ddim")  # sampling.sampler (`families.flow.FLOW_SAMPLERS` holds their steps)
MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "linear")  # `dagcli.optim.lr_factor`


@dataclass(frozen=True)
class ModelConfig:
    name: str = ""  # built-in name, local folder or hub id; "" = the built-in default
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # frozen weights: fp32 | bf16 | fp16 (reference: bf16 on GPU)


@dataclass(frozen=True)
class SamplingConfig:
    # steps, guidance, eta, prompts and resolution left unset take the model's defaults (`models.model_defaults`:
    # the built-in models carry their own; Stable Diffusion: 50 steps, guidance 5, η 1, simple_animals, native
    # size; each family has its reference)
    steps: int | None = None  # sampler steps per trajectory
    eta: float | None = None  # the sampler's noise level (DDIM η <= 1, the flow SDE's a); training needs > 0
    sampler: str = "sde"  # flow families: "sde" (Flow-GRPO's SDE) | "ddim" (DDIM for rectified flow, matched to P_B)
    guidance: float | None = None  # classifier-free guidance weight
    batch_size: int = 16  # trajectories per sampler call (per process)
    batches_per_epoch: int = 4  # sampler calls per epoch (per process)
    prompts: str | None = None  # prompt file or built-in set
    resolution: int | None = None  # image height and width in pixels
    overlap_rewards: bool = False  # score each sampler call's images in a worker thread while the next one samples


@dataclass(frozen=True)
class RewardConfig:
    # e.g. "aesthetic", "aesthetic:1.0,clip:0.5", "my_module:make_reward"; unset: the model's (`models.model_defaults`:
    # the built-in models' compressibility needs no download; other models: aesthetic)
    spec: str | None = None
    options: dict = field(default_factory=dict)  # per-component factory options, e.g. {clip = {scale = 1.0}}
    max_nonfinite: int = 16  # NaN/inf rewards tolerated (dropped, counted) before the run stops with a checkpoint


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 4
    alpha: float = 4.0
    init: str = "gaussian"  # peft init_lora_weights: gaussian | true (kaiming A, zero B)
    # the modules the LoRA adapts; unset: the model family's (SD / SDXL: the attention projections to_q, to_k,
    # to_v, to_out.0; SD3 / FLUX: those and the text stream's add_q/k/v_proj, to_add_out, as Flow-GRPO)
    target_modules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TrainConfig:
    algorithm: str = "dag-db"  # one of `dagcli.algorithms.ALGORITHMS`: dag-db | dag-kl | dag-rdb | ddpo | grpo | rtb
    epochs: int = 100
    batch_size: int = 8  # transitions per micro-batch (per process)
    # micro-batches per optimiser step when every transition is trained (reference: 4 x 50 timesteps); with
    # timestep_fraction < 1 it shrinks in proportion, so an epoch takes the same number of optimiser steps;
    # unset: the model's (the built-in models: 1; other models: the reference's 200)
    gradient_accumulation_steps: int | None = None
    learning_rate: float = 3e-4  # LoRA
    # how every parameter group's learning rate changes over the run's epochs: constant | cosine | linear (both
    # to 0 at train.epochs), after a linear warm-up from 0 over the first lr_warmup_epochs (fractions count)
    lr_schedule: str = "constant"
    lr_warmup_epochs: float = 0.0
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # clipped separately for the LoRA and the flow network
    reduction: str = "mean"  # how log-probs reduce over latent dims: mean (reference) | sum (true density)
    timestep_fraction: float = 1.0  # fraction of each trajectory's transitions trained on
    always_last_step: bool = False  # with timestep_fraction < 1, always include the final transition
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast of the trainable forward passes)
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False  # needs bitsandbytes
    allow_tf32: bool = True
    seed: int = 0


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/dag"  # the run directory
    checkpoint_every: int = 10  # epochs between checkpoints (the last epoch is always saved)
    checkpoint_minutes: float = 30.0  # also save when this many minutes passed since the last save (0 = off)
    keep_last: int = 5  # checkpoints kept
    sample_every: int = 0  # epochs between sample grids (0 = never)
    report_to: str = "none"  # none | tensorboard | wandb


def _build_config_class() -> type:
    """`Config`: the run's sections, each algorithm's own (`dagcli.algorithms.sections`) between train and output."""
    from dagcli.algorithms import sections

    own = [(name, section.settings, section.settings()) for name, section in sections().items()]
    fields = [("model", ModelConfig, ModelConfig()), ("sampling", SamplingConfig, SamplingConfig()),
              ("reward", RewardConfig, RewardConfig()), ("lora", LoraConfig, LoraConfig()),
              ("train", TrainConfig, TrainConfig()), *own, ("output", OutputConfig, OutputConfig())]
    cls = dataclasses.make_dataclass("Config", fields, frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = "The whole configuration of a run: one frozen section per TOML table."
    return cls


Config = _build_config_class()
_CLASSES = {tuple(f.name for f in dataclasses.fields(Config)): Config}  # one class per set of sections


def config_class() -> type:
    """`Config` for the algorithms registered now: rebuilt once `algorithms.register_algorithm` (or a test's
    registry change) adds or removes a section after this module was imported; the same class again whenever the
    sections are the same, so configs built before and after compare equal."""
    global Config
    from dagcli.algorithms import sections

    names = ("model", "sampling", "reward", "lora", "train", *sections(), "output")
    if names not in _CLASSES:
        _CLASSES[names] = _build_config_class()
    Config = _CLASSES[names]
    return Config


# --- how messages name a setting ----------------------------------------------------------------------

# `section.key` -> the command-line flag that gave it in this invocation (`dag train` sets it)
_FLAGS: ContextVar[dict[str, str] | None] = ContextVar("dagcli_flags", default=None)


@contextmanager
def named_by_flags(flags: dict[str, str]) -> Iterator[None]:
    """Within the block, messages about the keys of `flags` (`section.key` -> flag) name the flag instead."""
    token = _FLAGS.set(dict(flags))
    try:
        yield
    finally:
        _FLAGS.reset(token)


def setting(key: str, value) -> str:
    """A setting as messages name it: the flag the user typed (`--batch-size 0`), else its key
    (`sampling.batch_size = 0`, given in a preset, with `--set`, or the default)."""
    flag = (_FLAGS.get() or {}).get(key)
    if flag is None:
        return f"{key} = {value!r}"
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def invalid(problems: list[str]) -> DagError:
    """One error listing every problem once; one that starts with a flag the user typed needs no preamble."""
    text = "; ".join(dict.fromkeys(problems))
    return DagError(text if text.startswith("--") else f"invalid configuration: {text}")


# --- loading -------------------------------------------------------------------------------------------

def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _check_type(value, hint) -> object:
    """Coerce/validate one TOML value against a field type. Raises TypeError with a short reason."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError("expected a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError("expected a string")
    if origin is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise TypeError("expected a list of strings")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise TypeError("expected a table")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or len(inner) != 1:
            return value
        return _check_type(value, inner[0])
    return value


# Keys that moved to another section: the error says where they live now.
MOVED_KEYS = {"train.flow_learning_rate": "dag.flow_learning_rate", "dag.reduction": "train.reduction"}


def config_from_dict(data: dict, errors: list[str] | None = None) -> Config:
    """Build a `Config` from nested dicts, collecting every problem; raises one DagError listing them all."""
    own_errors = errors if errors is not None else []
    sections = {}
    top = _hints(config_class())
    for name, value in data.items():
        if name not in top:
            own_errors.append(f"unknown section [{name}] (valid: {', '.join(top)})")
            continue
        if not isinstance(value, dict):
            own_errors.append(f"[{name}] must be a table")
            continue
        cls = top[name]
        fields = _hints(cls)
        kwargs = {}
        for key, v in value.items():
            if f"{name}.{key}" in MOVED_KEYS:
                own_errors.append(f"{name}.{key} is now {MOVED_KEYS[name + '.' + key]}")
                continue
            if key not in fields:
                own_errors.append(f"unknown key {name}.{key} (valid: {', '.join(fields)})")
                continue
            try:
                kwargs[key] = _check_type(v, fields[key])
            except TypeError as e:
                own_errors.append(f"{setting(f'{name}.{key}', v)}: {e}")
        try:
            sections[name] = cls(**kwargs)
        except TypeError as e:
            own_errors.append(f"[{name}]: {e}")
    config = config_class()(**sections)
    own_errors.extend(validate(config))
    if errors is None and own_errors:
        raise invalid(own_errors)
    return config


def parse_override(text: str) -> tuple[str, str, object]:
    """'section.key=value' -> (section, key, TOML-parsed value, or the raw string when it isn't TOML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise DagError(f"--set {text!r}: expected section.key=value, e.g. train.epochs=10")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def read_settings(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """What the user gave: a TOML preset (optional) plus `section.key=value` overrides, as nested dicts
    (not yet validated; keys the user did not give are absent)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise DagError(f"--config {str(path)!r} is a directory; expected a TOML file (see examples/)")
        if not path.is_file():
            raise DagError(f"--config {str(path)!r} not found; expected a TOML file (see examples/)")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise DagError(f"config file {str(path)!r} is not valid TOML ({str(e).splitlines()[0]})") from e
    for text in overrides or []:
        section, key, value = parse_override(text)
        table = data.setdefault(section, {})
        *inner, last = key.split(".")  # reward.options.clip.scale=2: a key inside a table-valued setting
        for name in inner:
            table = table.setdefault(name, {}) if isinstance(table, dict) else table
        if isinstance(table, dict):
            table[last] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A TOML preset (optional) plus `section.key=value` overrides -> a validated `Config`."""
    return config_from_dict(read_settings(path, overrides))


# Keys a resumed run may change: they extend the run or change how it is watched, not what is trained.
RESUMABLE_KEYS = frozenset({
    "train.epochs", "output.dir", "output.checkpoint_every", "output.checkpoint_minutes", "output.keep_last",
    "output.sample_every", "output.report_to", "model.device", "sampling.overlap_rewards", "reward.max_nonfinite",
    "train.gradient_checkpointing",
})


def differences(a: Config, b: Config) -> list[tuple[str, object, object]]:
    """(section.key, value in a, value in b) for every key whose value differs."""
    da, db = to_dict(a), to_dict(b)
    return [(f"{section}.{key}", da[section].get(key), db[section].get(key))
            for section in da for key in sorted(set(da[section]) | set(db[section]))
            if da[section].get(key) != db[section].get(key)]


def resume_config(saved: dict, given: dict) -> tuple[Config, list[tuple[str, object, object]]]:
    """A resumed run's config: its saved settings, with the given keys that only extend or watch it.

    Returns the config and the accepted changes; a given key that changes what is trained is refused with a
    `DagError` naming the key, the saved value and the new one.
    """
    saved_config = config_from_dict(saved)
    merged = {name: dict(section) for name, section in saved.items()}
    for name, section in given.items():
        if isinstance(section, dict) and isinstance(merged.get(name, {}), dict):
            merged.setdefault(name, {}).update(section)
        else:
            merged[name] = section
    config = config_from_dict(merged)
    changes = differences(saved_config, config)
    refused = [(k, old, new) for k, old, new in changes if k not in RESUMABLE_KEYS]
    if refused:
        raise DagError(
            "a resumed run keeps its own settings: "
            + "; ".join(f"{setting(k, new)} differs from the run's {old!r}" for k, old, new in refused)
            + " (drop the flag, or start a new run with another --output)"
        )
    return config, [c for c in changes if c[0] != "output.dir"]


def replace(config: Config, section: str, **changes) -> Config:
    """A copy of the config with some keys of one section changed."""
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


# the algorithms' own keys are checked by their sections (`dagcli.algorithms.settings.Section`), when they run
POSITIVE_KEYS = (
    "sampling.steps", "sampling.resolution", "sampling.batch_size", "sampling.batches_per_epoch", "train.epochs",
    "train.batch_size", "train.gradient_accumulation_steps", "train.learning_rate", "train.max_grad_norm",
    "lora.rank", "lora.alpha", "output.checkpoint_every", "output.keep_last",
)  # unset (None: the model's default, filled in later) passes
NON_NEGATIVE_KEYS = (
    "output.sample_every", "reward.max_nonfinite", "sampling.guidance", "output.checkpoint_minutes",
    "train.lr_warmup_epochs",
)


def _value(c: Config, key: str):
    """The value of a dotted `section.key`."""
    section, name = key.split(".")
    return getattr(getattr(c, section), name)


def validate(c: Config) -> list[str]:
    """Every value-level problem of a config (types are already checked)."""
    e: list[str] = []

    def one_of(name, value, options):
        if value not in options:
            e.append(f"{setting(name, value)}: valid options: {', '.join(options)}")

    from dagcli.algorithms import ALGORITHMS

    one_of("train.algorithm", c.train.algorithm, tuple(ALGORITHMS))
    one_of("train.reduction", c.train.reduction, ("mean", "sum"))
    one_of("train.lr_schedule", c.train.lr_schedule, LR_SCHEDULES)
    one_of("train.mixed_precision", c.train.mixed_precision, MIXED_PRECISION)
    one_of("model.device", c.model.device, ("auto", "cpu", "cuda"))
    one_of("model.dtype", c.model.dtype, ("fp32", "bf16", "fp16"))
    one_of("output.report_to", c.output.report_to, ("none", "tensorboard", "wandb"))
    one_of("lora.init", c.lora.init, ("gaussian", "true"))
    one_of("sampling.sampler", c.sampling.sampler, FLOW_SAMPLERS)
    for name in POSITIVE_KEYS:
        if _unset_ok(_value(c, name)) <= 0:
            e.append(f"{setting(name, _value(c, name))}: must be positive")
    info = ALGORITHMS.get(c.train.algorithm)
    deterministic = info is not None and info.deterministic_sampling
    if c.sampling.eta is not None and (c.sampling.eta < 0.0 if deterministic else c.sampling.eta <= 0.0):
        # the family's upper bound: `fill_model_defaults`
        need = f"{c.train.algorithm} needs eta >= 0" if deterministic else "training needs a stochastic sampler, eta > 0"
        e.append(f"{setting('sampling.eta', c.sampling.eta)}: {need}")
    if not 0.0 < c.train.timestep_fraction <= 1.0:
        e.append(f"{setting('train.timestep_fraction', c.train.timestep_fraction)}: must be in (0, 1]")
    for name in NON_NEGATIVE_KEYS:
        if _unset_ok(_value(c, name)) < 0:
            e.append(f"{setting(name, _value(c, name))}: must not be negative")
    if c.sampling.steps is not None:  # else checked once the model's default is known
        e.extend(_check_micro_batches(c))
    need = ALGORITHMS[c.train.algorithm].min_micro_batch if c.train.algorithm in ALGORITHMS else 1
    if 0 < c.train.batch_size < need:  # a batch size <= 0 is already said above
        e.append(f"{setting('train.batch_size', c.train.batch_size)}: {c.train.algorithm} needs at least {need} "
                 "(its leave-one-out baseline)")
    if c.lora.target_modules is not None and not c.lora.target_modules:
        e.append("lora.target_modules is empty")
    e.extend(_check_algorithm(c))
    return e


def _check_algorithm(c: Config) -> list[str]:
    """Every algorithm's section by its ranges and choices (a mistyped value is a mistake whichever algorithm runs:
    `--set rtb.credit=bad` beside `--algorithm dag-db` would otherwise pass unseen), then how the selected
    algorithm's section fits the rest of the config."""
    from dagcli.algorithms import ALGORITHMS, sections
    from dagcli.algorithms.settings import check_section

    problems = [p for section in sections().values() for p in check_section(section, getattr(c, section.name), setting)]
    info = ALGORITHMS.get(c.train.algorithm)
    return problems if info is None else problems + info.settings.validate(c, setting)


def _unset_ok(value: int | float | None) -> int | float:
    """An unset value (the model's default, filled in later) passes the range checks."""
    return 1 if value is None else value


def transitions_per_trajectory(steps: int, fraction: float) -> int:
    """How many of a trajectory's `steps` transitions are trained (`train.timestep_fraction`), at least one:
    ⌊steps·fraction⌋, as DDPO's, Flow-GRPO's and DiffusionNFT's code count them (int(0.99·10) = 9 of 10; the 1e-9
    keeps 0.3·10 = 2.9999… at 3)."""
    return max(1, int(steps * fraction + 1e-9))


def accumulation_steps(accumulation: int, steps: int, fraction: float) -> int:
    """Micro-batches per optimiser step: `gradient_accumulation_steps` scaled by the share of each trajectory
    trained, as the reference code does, so subsampling timesteps keeps the optimiser steps per epoch."""
    return max(1, round(accumulation * transitions_per_trajectory(steps, fraction) / steps))


# What an algorithm trains on (`AlgorithmInfo.unit`), and how its items are named in messages:
#   transitions   a `timestep_fraction` of each trajectory's stored steps x_i -> x_{i+1}
#   trajectories  every stored step of each trajectory, with a per-trajectory coefficient computed first
#   samples       each final latent re-noised at `timestep_fraction` · steps fresh (time, noise) draws
UNIT_NOUNS = {"transitions": "transitions", "trajectories": "transitions", "samples": "noised samples"}


@dataclass(frozen=True)
class EpochSizes:
    """How one process's epoch divides into micro-batches and optimiser steps."""

    unit: str  # one of `UNIT_NOUNS`
    items_per_trajectory: int  # micro-batch items drawn from each trajectory
    items: int  # items per epoch (per process)
    micro_batches: int  # micro-batches per epoch (the last one may be smaller)
    accumulation: int  # micro-batches per optimiser step
    optimizer_steps: int  # optimiser steps per epoch


def unit_fraction(unit: str, fraction: float) -> float:
    """The share of each trajectory's steps the unit trains: every step for `trajectories`."""
    return 1.0 if unit == "trajectories" else fraction


def epoch_sizes(c: Config) -> EpochSizes:
    """The selected algorithm's unit, sized by `sampling` and `train` (steps known: after `fill_model_defaults`)."""
    from dagcli.algorithms import ALGORITHMS

    info = ALGORITHMS.get(c.train.algorithm)
    unit = info.unit if info is not None else "transitions"
    fraction = unit_fraction(unit, c.train.timestep_fraction)
    per_traj = transitions_per_trajectory(c.sampling.steps, fraction)
    items = c.sampling.batch_size * c.sampling.batches_per_epoch * per_traj
    micro = -(-items // c.train.batch_size) if c.train.batch_size > 0 else 0
    steps_known = c.sampling.steps > 0  # else already said
    accum = accumulation_steps(c.train.gradient_accumulation_steps or 1, c.sampling.steps, fraction) if steps_known else 1
    return EpochSizes(unit, per_traj, items, micro, accum, -(-micro // accum))


def _check_micro_batches(c: Config) -> list[str]:
    s = epoch_sizes(c)
    if c.train.batch_size > 0 and s.items > 0 and s.items % c.train.batch_size:
        divisors = [d for d in range(1, min(s.items, 64) + 1) if s.items % d == 0]
        per = "steps" if s.unit != "samples" else "noised copies"
        return [f"{setting('train.batch_size', c.train.batch_size)} does not divide the {s.items} {UNIT_NOUNS[s.unit]} "
                f"trained per epoch ({c.sampling.batch_size} trajectories x {c.sampling.batches_per_epoch} sampler "
                f"calls x {s.items_per_trajectory} {per}); valid options: " + ", ".join(map(str, divisors))]
    return []


def fill_model_defaults(config: Config) -> tuple[Config, str]:
    """The config with the model named and the settings it leaves unset (sampler, reward, accumulation) taken
    from the algorithm (`AlgorithmInfo.sampling_defaults`), else from the model (`models.model_defaults`, read
    without loading weights); also a line saying what was filled in and from where ("" when nothing was).
    Checks what could only be checked once the settings and the model's family are known."""
    from dagcli.algorithms import ALGORITHMS
    from dagcli.models import default_model, model_defaults

    name = config.model.name or default_model()
    d = model_defaults(name)
    from_model = {"sampling.prompts": d.prompts, "sampling.steps": d.steps, "sampling.guidance": d.guidance,
                  "sampling.eta": d.eta, "sampling.resolution": d.resolution, "reward.spec": d.reward,
                  "train.gradient_accumulation_steps": d.gradient_accumulation_steps}
    info = ALGORITHMS.get(config.train.algorithm)
    from_algorithm = info.sampling_defaults(config) if info is not None else {}
    wanted = {**from_model, **from_algorithm}  # the algorithm's before the model's
    filled = {k: v for k, v in wanted.items() if _value(config, k) is None and v is not None}
    config = replace(config, "model", name=name)
    for section in dict.fromkeys(k.split(".")[0] for k in filled):
        config = replace(config, section, **{k.split(".")[1]: v for k, v in filled.items() if k.startswith(section + ".")})
    if config.lora.target_modules is None:
        config = replace(config, "lora", target_modules=d.lora_targets)
    problems = _check_micro_batches(config) + _check_sampler_for_model(config, d.max_eta)
    if problems:
        raise invalid(problems)
    by_source = {d.source: {k: v for k, v in filled.items() if k not in from_algorithm},
                 f"algorithm {config.train.algorithm!r}": {k: v for k, v in filled.items() if k in from_algorithm}}
    return config, defaults_line(by_source)


def _check_sampler_for_model(c: Config, max_eta: float | None) -> list[str]:
    """The sampler's noise level and step against the model's family, read without loading weights (a family that
    cannot be told yet, a hub model not yet downloaded: checked once loaded)."""
    from dagcli.checks import model_sampler_problem

    problems = []
    if max_eta is not None and c.sampling.eta is not None and c.sampling.eta > max_eta:
        problems.append(f"{setting('sampling.eta', c.sampling.eta)}: this model's sampler needs 0 < eta <= {max_eta:g}")
    wrong = model_sampler_problem(setting("sampling.sampler", c.sampling.sampler), c.sampling.sampler,
                                  c.sampling.eta, c.model.name)
    return problems + ([wrong] if wrong else [])


def defaults_line(by_source: dict[str, dict]) -> str:
    """The line saying which settings were filled in, grouped by where they came from (source -> key -> value;
    sources with nothing left out); "" when none was."""
    labels = {"reward.spec": "reward"}

    def said(values: dict) -> str:
        return ", ".join(f"{labels.get(k, k.split('.')[1])} " + (repr(v) if isinstance(v, str) else f"{v:g}")
                         for k, v in values.items())

    parts = [f"from the defaults of {source}: {said(values)}" for source, values in by_source.items() if values]
    return "settings not given, " + "; ".join(parts) if parts else ""


def to_dict(config: Config) -> dict:
    """Plain nested dict (tuples as lists) for TOML/JSON."""

    def plain(v):
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {name: {k: plain(v) for k, v in dataclasses.asdict(getattr(config, name)).items()}
            for name in _hints(config_class())}


def dump_toml(config: Config) -> str:
    """TOML of the config; unset keys (None: the model's default, not yet filled in) are left out."""
    import tomli_w

    data = {name: {k: v for k, v in section.items() if v is not None} for name, section in to_dict(config).items()}
    return tomli_w.dumps(data)
