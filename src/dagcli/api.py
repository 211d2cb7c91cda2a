"""dagcli from Python: train, sample, evaluate and export with the `dag` commands' flags as keyword arguments.

Every function checks what it can before loading a model, raises `DagError` for bad input (the message names
the value and the valid options, as the CLI prints it), reports progress to `reporter` (default: nothing;
`dagcli.progress.default_reporter()` prints like the CLI) and returns a small frozen result.

    from dagcli import api
    run = api.train(model="tiny", epochs=1, output="runs/try")
    shots = api.sample(prompt=["a red circle"], ckpt=str(run.run_dir), output="samples")

A run is planned once (`plan_training`: the preset, `--set` overrides and flags resolved, the model's defaults
filled in, prompts read, the checkpoint to resume checked), then trained (`run_plan`), so a script can also
build the trainer itself (`build_trainer`) and drive its epochs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dagcli.checks import check_eta, check_positive, check_sampler, check_writable_dir, sampler_defaults
from dagcli.errors import DagError, Interrupted
from dagcli.progress import NullReporter, Reporter

# --- training: plan, then run ------------------------------------------------------------------------------

# the config key each flag of `dag train` sets, and the flag (messages name what the user typed)
TRAIN_FLAGS = {
    "train.algorithm": "--algorithm", "reward.spec": "--reward", "sampling.prompts": "--prompts",
    "train.epochs": "--epochs", "sampling.batch_size": "--batch-size", "train.batch_size": "--train-batch-size",
    "sampling.steps": "--steps", "sampling.eta": "--eta", "sampling.sampler": "--sampler",
    "sampling.guidance": "--guidance", "train.seed": "--seed", "output.dir": "--output", "model.name": "--model", "model.device": "--device", "model.dtype": "--dtype",
    "output.report_to": "--report-to",
}


@dataclass(frozen=True)
class RunPlan:
    """A training run resolved before any model is loaded."""

    config: object  # the `Config`: preset, overrides and flags, the model's defaults for what is unset
    prompts: tuple[str, ...]  # the training prompts, one per entry of the prompt set
    resume_from: Path | None  # the checkpoint to continue from, checked against `config`; None: a new run
    defaults_used: str  # the line saying which settings came from the model's defaults ("" when none)


@dataclass(frozen=True)
class TrainResult:
    """What a training run left behind."""

    run_dir: Path  # the run directory (config.toml, metrics.jsonl, checkpoints/)
    epochs: int  # epochs done in all
    metrics: dict  # the last epoch's metrics (the last line of metrics.jsonl); {} when none was written
    checkpoint: Path | None  # the latest complete checkpoint folder
    already_finished: bool  # the run to resume had done every epoch: nothing was trained


def plan_training(
    config: str | Path | None = None,
    *,
    overrides: Sequence[str] = (),  # --set section.key=value
    algorithm: str | None = None,
    reward: str | None = None,
    prompts: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    train_batch_size: int | None = None,
    steps: int | None = None,
    eta: float | None = None,
    sampler: str | None = None,  # flow families: "sde" | "ddim"
    guidance: float | None = None,
    seed: int | None = None,
    output: str | Path | None = None,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    report_to: str | None = None,
    resume: bool = False,
    resume_from: str | Path | None = None,
    reporter: Reporter | None = None,
) -> RunPlan:
    """The run `dag train` would start with these flags (`config`: the TOML preset of `--config`); every
    problem is reported at once. A resumed run keeps its own settings; `reporter` hears which ones changed."""
    from dagcli.config import config_from_dict, named_by_flags, read_settings

    values = {
        "train.algorithm": algorithm, "reward.spec": reward, "sampling.prompts": prompts, "train.epochs": epochs,
        "sampling.batch_size": batch_size, "train.batch_size": train_batch_size, "sampling.steps": steps,
        "sampling.eta": eta, "sampling.sampler": sampler, "sampling.guidance": guidance, "train.seed": seed,
        "output.dir": str(output) if output is not None else None, "model.name": model, "model.device": device,
        "model.dtype": dtype, "output.report_to": report_to,
    }
    given_flags = {key: TRAIN_FLAGS[key] for key, v in values.items() if v is not None}
    settings = list(overrides or [])
    overrides = settings + [f"{k}={_toml(v)}" for k, v in values.items() if v is not None]
    resume_from = Path(resume_from) if resume_from is not None else None
    with named_by_flags(given_flags):
        given = read_settings(config, overrides)
        if resume or resume_from:
            cfg = _resumed_config(given, resume_from, reporter or NullReporter())
        else:
            cfg = config_from_dict(given)
        plan = plan_config(cfg, resume=resume, resume_from=resume_from)
    for line in unread_settings(settings, plan.config.train.algorithm):
        (reporter or NullReporter()).warn(line)
    return plan


def unread_settings(overrides: Sequence[str], algorithm: str) -> list[str]:
    """A line for each `--set` of another algorithm's section (`--algorithm dag-db --set rtb.credit=to-go`): the
    run does not read it, which is most often a mistake in the algorithm or the key."""
    from dagcli.algorithms import ALGORITHMS, sections

    own = ALGORITHMS[algorithm].section
    lines = []
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        section = key.split(".", 1)[0]
        if section in sections() and section != own:
            readers = [n for n, info in ALGORITHMS.items() if info.section == section]
            lines.append(f"--set {key}: {algorithm} does not read {section}.* (only {', '.join(readers)} "
                         f"{'does' if len(readers) == 1 else 'do'}); the setting has no effect")
    return lines


def _toml(value) -> str:
    """A flag's value as a TOML value for an override."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def _resumed_config(given: dict, resume_from: Path | None, reporter: Reporter):
    """A resumed run's settings come from the run itself (`RUN/config.toml`, else the checkpoint's metadata);
    the given ones may only extend or watch it (`config.RESUMABLE_KEYS`), anything else is refused."""
    from dagcli.checkpoint import read_meta, resolve_checkpoint
    from dagcli.config import OutputConfig, resume_config

    run_dir = Path(given.get("output", {}).get("dir", OutputConfig.dir))
    saved, source = None, None
    if resume_from is not None:
        folder = resolve_checkpoint(resume_from)
        saved, source = read_meta(folder).get("config"), str(folder)
        if "dir" not in given.get("output", {}):
            run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else run_dir
    elif (run_dir / "config.toml").is_file():
        saved, source = _read_toml(run_dir / "config.toml"), str(run_dir / "config.toml")
    if saved is None:
        if resume_from is not None:
            raise DagError(f"{source!r} records no settings (no config in meta.json); it cannot be resumed")
        raise DagError(f"--resume: {str(run_dir)!r} has no config.toml and no checkpoints to resume; "
                       "start without --resume, or pass the run's folder with --output")
    given = {**given, "output": {**given.get("output", {}), "dir": str(run_dir)}}
    cfg, changes = resume_config(saved, given)
    if changes:
        reporter.info("resuming with " + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes))
    longer = [new for k, _, new in changes if k == "train.epochs"]
    if longer and cfg.train.lr_schedule != "constant":
        reporter.warn(f"train.lr_schedule {cfg.train.lr_schedule!r} follows train.epochs: from the checkpoint on, "
                      f"the learning rate is that of a {longer[0]}-epoch run at the same epoch")
    return cfg


def _read_toml(path: Path) -> dict:
    import tomllib

    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DagError(f"{str(path)!r} is not valid TOML ({str(e).splitlines()[0]})") from e


def plan_config(cfg, resume: bool = False, resume_from: Path | None = None) -> RunPlan:
    """The plan of a run of `cfg` (a `Config`): the model's defaults filled in for what is unset (the one place
    a run does so), then everything that can be checked before loading a model, all problems at once: prompts,
    reward names and plugins, model name, tracker, the run directory and the checkpoint to resume."""
    from dagcli.config import fill_model_defaults
    from dagcli.models import check_decoder_name, check_model_name, default_model
    from dagcli.prompts import load_prompts
    from dagcli.rewards import validate_spec

    problems: list[str] = []
    cfg, used = fill_model_defaults(cfg)

    def check(fn, *args):
        try:
            return fn(*args)
        except DagError as e:
            problems.append(str(e))
            return None

    items = check(load_prompts, cfg.sampling.prompts)
    check(validate_spec, cfg.reward.spec)
    check(check_model_name, cfg.model.name or default_model())
    folder = check(_checkpoint_to_resume, cfg, resume, resume_from)
    check(_check_tracker, cfg.output.report_to)
    if cfg.dag.x0_decoder:
        check(check_decoder_name, cfg.dag.x0_decoder)
    if not problems:
        check(check_writable_dir, Path(cfg.output.dir))
    if problems:
        raise DagError("; ".join(problems))
    return RunPlan(cfg, tuple(p.prompt for p in items), folder, used)


def _check_tracker(kind: str) -> None:
    import importlib.util

    if kind in ("tensorboard", "wandb") and importlib.util.find_spec(kind) is None:
        raise DagError(f"--report-to {kind} needs the {kind} package: pip install 'dagcli[{kind}]'")


def _checkpoint_to_resume(cfg, resume: bool, resume_from: Path | None) -> Path | None:
    """The checkpoint folder to continue from (or None), checked against this run's settings."""
    from dagcli.checkpoint import check_compatible, list_checkpoints, read_meta, resolve_checkpoint
    from dagcli.models import default_model

    run_dir = Path(cfg.output.dir)
    if resume_from is not None:
        folder = resolve_checkpoint(resume_from)
    elif resume:
        found = list_checkpoints(run_dir)
        if not found:
            raise DagError(f"--resume: {str(run_dir)!r} has no checkpoints to resume; start without --resume")
        folder = found[-1][1]
    elif list_checkpoints(run_dir):
        raise DagError(f"{str(run_dir)!r} already has checkpoints; pass --resume to continue it, "
                       "or choose another --output")
    else:
        return None
    check_compatible(folder, read_meta(folder), base_model=cfg.model.name or default_model(),
                     lora_rank=cfg.lora.rank, lora_targets=list(cfg.lora.target_modules),
                     algorithm=cfg.train.algorithm)
    return folder


def build_trainer(plan: RunPlan, reporter: Reporter | None = None, model=None):
    """The `Trainer` of a plan, resumed from its checkpoint if it has one (`model`: an already loaded one)."""
    from dagcli.trainer import Trainer

    trainer = Trainer(plan.config, list(plan.prompts), reporter=reporter, model=model, defaults_filled=True)
    if plan.resume_from is not None:
        trainer.resume(plan.resume_from)
    return trainer


def run_plan(plan: RunPlan, reporter: Reporter | None = None,
             on_start: Callable[[object], None] | None = None) -> TrainResult:
    """Train a planned run to its last epoch. `on_start(trainer)` is called once set-up succeeded (on the main
    process), e.g. to print a banner. Ctrl-C or SIGTERM stops after the epoch with a checkpoint and raises
    `Interrupted` saying where the last checkpoint is; a second Ctrl-C stops at once."""
    reporter = reporter or NullReporter()
    done = _epochs_done(plan.resume_from) if plan.resume_from is not None else 0
    if plan.resume_from is not None and done >= plan.config.train.epochs:
        reporter.info(f"{plan.config.output.dir} is finished: {done} of {plan.config.train.epochs} epochs done; "
                      f"to train it further, pass --resume --epochs N with N > {done}")
        return _result(Path(plan.config.output.dir), done, already_finished=True)
    trainer = build_trainer(plan, reporter)
    if trainer.is_main:  # said once set-up succeeded: an error stays one line
        if plan.defaults_used:
            reporter.info(plan.defaults_used)
        if on_start is not None:
            on_start(trainer)
    try:
        trainer.train()
    except KeyboardInterrupt as e:  # a second Ctrl-C: at once
        raise Interrupted(f"stopped at once; {_last_checkpoint(trainer.run_dir)}") from e
    if trainer.stopped:
        raise Interrupted(f"stopped after epoch {trainer.state.epoch}; {_last_checkpoint(trainer.run_dir)}",
                          trainer.stop.signum or 2)  # 2: another process got the signal
    return _result(trainer.run_dir, trainer.state.epoch, already_finished=False)


def train(config: str | Path | None = None, *, reporter: Reporter | None = None,
          on_start: Callable[[object], None] | None = None, **flags) -> TrainResult:
    """`dag train`: plan a run with the flags of `plan_training` (e.g. `model="tiny", epochs=1`), then run it."""
    return run_plan(plan_training(config, reporter=reporter, **flags), reporter=reporter, on_start=on_start)


def _epochs_done(folder: Path) -> int:
    """The epochs a checkpoint holds; its checksums are verified (no model is loaded)."""
    from dagcli.checkpoint import verify_checkpoint

    return int(verify_checkpoint(folder).get("state", {}).get("epoch", 0))


def _last_checkpoint(run_dir: Path) -> str:
    """Where an interrupted run can be continued from, for its last message."""
    from dagcli.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    if not found:
        return "no checkpoint was saved yet"
    step, folder = found[-1]
    return f"the last checkpoint is {folder} (epoch {step}); resume with --resume"


def _result(run_dir: Path, epochs: int, already_finished: bool) -> TrainResult:
    """A run's result, read from what it wrote: the last line of metrics.jsonl and the latest checkpoint."""
    import json

    from dagcli.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    log = run_dir / "metrics.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    metrics = json.loads(lines[-1]) if lines else {}
    return TrainResult(run_dir, epochs, metrics, found[-1][1] if found else None, already_finished)


# --- sampling ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleResult:
    """What `sample` wrote."""

    output: Path  # the folder: one PNG per image, a grid per prompt, samples.jsonl
    images: tuple[Path, ...]  # the PNG of every image, prompt by prompt, seed by seed
    manifest: Path  # samples.jsonl: prompt, seed, file and settings of every image
    prompts: int  # how many prompts were sampled


def sample(
    *,
    prompt: Sequence[str] = (),
    prompts: str | None = None,
    num_per_prompt: int = 4,
    seed: int = 0,
    steps: int | None = None,
    eta: float | None = None,
    sampler: str | None = None,  # flow families: "sde" (default) | "ddim"
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    ckpt: str | Path | None = None,
    output: str | Path = "samples",
    model: str | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    reporter: Reporter | None = None,
) -> SampleResult:
    """`dag sample`: images of the base model, or of a checkpoint's LoRA on it (image j of prompt i uses seed
    seed + i*num_per_prompt + j). Everything is checked before any weights are loaded."""
    from dagcli.checkpoint import (
        attach_lora,
        check_lora_fits,
        lora_steps_for,
        read_meta,
        resolve_checkpoint,
        trained_resolution,
    )
    from dagcli.families import set_sampler
    from dagcli.families.base import check_image_size
    from dagcli.generate import SampleSettings, generate, read_manifest, write_samples
    from dagcli.models import check_model_name, default_model, load_model, same_model

    reporter = reporter or NullReporter()
    output = Path(output)
    items = _prompt_items(prompt, prompts, "use --prompt TEXT (repeatable) or --prompts FILE|SET")
    for name, value in [("--num-per-prompt", num_per_prompt), ("--steps", steps), ("--batch-size", batch_size),
                        ("--height", height), ("--width", width)]:
        check_positive(name, value)
    folder = resolve_checkpoint(str(ckpt)) if ckpt else None
    trained_on = read_meta(folder).get("base_model") if folder else None
    model = model or trained_on or default_model()
    check_model_name(model)
    if folder:
        check_lora_fits(folder, model)
    check_eta(eta, model)
    check_sampler(f"--sampler {sampler or 'sde'}", sampler or "sde", eta, model)
    check_writable_dir(output)

    if not same_model(trained_on, model):  # it fits: another name for the model, or a fine-tune of it
        reporter.warn(f"{ckpt} was trained on {trained_on!r}, sampled with {model!r}")
    loaded = load_model(model, device=device, dtype=dtype)
    set_sampler(loaded.family, sampler or "sde", eta, what="--sampler")
    size = (trained_resolution(folder) if folder else None) or loaded.resolution  # the run's, else the model's
    height, width = height or size, width or size
    check_image_size(loaded.family, {"--height": height, "--width": width})
    if folder:
        attach_lora(loaded.pipe, folder, loaded.name)
    settings = SampleSettings(**sampler_defaults(loaded, steps, guidance, eta), height=height, width=width,
                              batch_size=batch_size, num_per_prompt=num_per_prompt, seed=seed)
    settings = dataclasses.replace(settings, lora_steps=lora_steps_for(folder, settings.steps))
    images = generate(loaded, items, settings, reporter)
    extra = {"model": loaded.name, **({"ckpt": str(folder)} if folder else {})}
    manifest = write_samples(images, settings, output, extra)
    return SampleResult(output, tuple(output / name for name in read_manifest(output)), manifest, len(items))


def _prompt_items(prompt: Sequence[str], prompts: str | None, hint: str) -> list:
    """The `--prompt` texts, then the prompts of the `--prompts` file or set; none at all is an error."""
    from dagcli.prompts import PromptItem, load_prompts

    if isinstance(prompt, str):
        raise DagError(f"prompt must be a list of prompts, got the text {prompt!r}; pass prompt=[{prompt!r}]")
    if not prompt and not prompts:
        raise DagError(f"no prompts given; {hint}")
    return [PromptItem(p) for p in prompt] + (load_prompts(prompts) if prompts else [])


# --- evaluation --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalResult:
    """What `evaluate` measured and wrote."""

    report: dict  # the content of report.json: settings, metrics per image set, warnings
    report_path: Path  # report.json; report.md and report.html lie beside it
    warnings: tuple[str, ...]  # one line per suspected reward hack (a reward rose, diversity or fidelity fell)


@dataclass(frozen=True)
class _Scoring:
    """How the images are scored and compared, whatever produced them."""

    reward: str  # reward spec, one metric per component
    options: dict  # reward name -> {option: value}
    output: Path  # the folder of the reports and images
    batch_size: int  # images per sampler and reward call
    device: str  # device name for the reward and embedding models
    embed_model: str | None  # CLIP id or folder for diversity, drift and fidelity; "none": skipped
    hack_threshold: float  # the drop (a fraction) of diversity or fidelity that is warned about
    lpips: bool  # LPIPS diversity when lpips is installed


def evaluate(
    *,
    reward: str | None = None,
    prompts: str | None = None,
    prompt: Sequence[str] = (),
    ckpt: Sequence[str | Path] = (),
    images: Sequence[str | Path] = (),
    reward_option: Sequence[str] = (),
    num_per_prompt: int = 4,
    seed: int = 0,
    output: str | Path = "eval",
    model: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    eta: float | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "fp32",
    embed_model: str | None = None,
    hack_threshold: float = 0.2,
    lpips: bool = True,
    reporter: Reporter | None = None,
) -> EvalResult:
    """`dag eval`: generate with the base model and every checkpoint (same seeds), or score the folders of
    `images` (the first is the reference), then compare rewards, diversity, drift and fidelity; writes
    report.json, report.md and report.html to `output`."""
    from dagcli.rewards.registry import parse_reward_options, validate_spec

    if not reward:
        raise DagError("no reward given; use --reward NAME[,NAME...] (see `dag rewards`)")
    validate_spec(reward)
    check_positive("--batch-size", batch_size)
    if not 0 < hack_threshold < 1:
        raise DagError(f"--hack-threshold must be a fraction in (0, 1), got {hack_threshold}")
    options = parse_reward_options(list(reward_option))
    scoring = _Scoring(reward, options, Path(output), batch_size, device, embed_model, hack_threshold, lpips)
    reporter = reporter or NullReporter()
    if images:
        if ckpt or prompts:
            raise DagError("--images scores existing images; it cannot be combined with --ckpt or --prompts")
        if len(prompt) > 1:
            raise DagError("with --images give at most one --prompt (for folders without samples.jsonl)")
        return _evaluate_folders([Path(f) for f in images], prompt[0] if prompt else None, model, scoring, reporter)
    for name, value in [("--num-per-prompt", num_per_prompt), ("--steps", steps)]:
        check_positive(name, value)
    sampling = dict(num_per_prompt=num_per_prompt, seed=seed, steps=steps, guidance=guidance, eta=eta)
    return _evaluate_models(prompts, prompt, [str(c) for c in ckpt], model, dtype, sampling, scoring, reporter)


def _evaluate_models(prompts, prompt, ckpt, model, dtype, sampling: dict, scoring: _Scoring,
                     reporter: Reporter) -> EvalResult:
    """Generate for the base model and every checkpoint with the same seeds, then compare. Everything that can
    fail is checked before the first image is generated: prompts, checkpoints and their fit with the model,
    the output folder, the rewards with their options, the embedding model and the image size."""
    from dagcli.checkpoint import check_lora_fits, trained_resolution
    from dagcli.evaluation import checkpoint_refs, generate_sets
    from dagcli.generate import SampleSettings
    from dagcli.models import check_model_name, default_model, load_model, same_model

    items = _prompt_items(prompt, prompts, "use --prompts FILE|SET or --prompt TEXT (or --images DIR)")
    refs = checkpoint_refs(ckpt)
    trained_on = _base_models(refs)
    model = model or next(iter(trained_on.values()), None) or default_model()
    check_model_name(model)
    for ref in refs:
        check_lora_fits(ref.folder, model)
    check_eta(sampling["eta"], model)
    check_writable_dir(scoring.output)

    for label, base in trained_on.items():
        if not same_model(base, model):
            reporter.warn(f"{label} was trained on {base!r}, evaluated on {model!r}")
    loaded = load_model(model, device=scoring.device, dtype=dtype)
    for ref in refs:  # against the loaded denoiser: a model whose configuration could not be read before
        check_lora_fits(ref.folder, loaded.name, type(loaded.family), loaded.family.denoiser)
    scorers = _scorers(scoring, loaded.name, str(loaded.device), reporter)
    size = _evaluation_size(loaded, [trained_resolution(r.folder) for r in refs])
    settings = SampleSettings(
        **sampler_defaults(loaded, sampling["steps"], sampling["guidance"], sampling["eta"]),
        height=size, width=size, batch_size=scoring.batch_size, num_per_prompt=sampling["num_per_prompt"],
        seed=sampling["seed"],
    )
    sets = generate_sets(loaded, items, settings, refs, scoring.output, reporter)
    extra = {"mode": "generate", "model": loaded.name, "checkpoints": [str(r.folder.resolve()) for r in refs]}
    return _compare(sets, scorers, reporter, scoring, settings, extra)


def _evaluation_size(loaded, trained: list[int | None]) -> int:
    """The image side to generate at: the one the checkpoints were trained at when they agree, else the
    model's native size; checked against the model."""
    from dagcli.families.base import check_image_size

    sizes = {s for s in trained if s is not None}
    size = sizes.pop() if len(sizes) == 1 else loaded.resolution
    check_image_size(loaded.family, {"the checkpoints' sampling.resolution": size})
    return size


def _base_models(refs) -> dict[str, str]:
    """Checkpoint label -> the base model its meta.json names (bare LoRA folders have none)."""
    from dagcli.checkpoint import read_meta

    found = {r.label: read_meta(r.folder).get("base_model") for r in refs}
    return {label: base for label, base in found.items() if base}


def _evaluate_folders(folders: list[Path], prompt: str | None, model: str | None, scoring: _Scoring,
                      reporter: Reporter) -> EvalResult:
    """Score existing images; the first folder is the reference for drift and the hacking monitor."""
    from dagcli.evaluation import folder_model, folder_set
    from dagcli.models import resolve_device

    labels: list[str] = []
    for folder in folders:
        label = folder.resolve().name or "images"
        while label in labels:
            label += "'"
        labels.append(label)
    sets = [folder_set(f, label, prompt) for f, label in zip(folders, labels, strict=True)]
    check_writable_dir(scoring.output)
    model = model or folder_model(folders[0])
    device = str(resolve_device(scoring.device))
    extra = {"mode": "images", "model": model, "folders": [str(f.resolve()) for f in folders]}
    return _compare(sets, _scorers(scoring, model, device, reporter), reporter, scoring, None, extra)


def _scorers(scoring: _Scoring, base_model, device, reporter: Reporter):
    """The reward (with its options) and the embedding encoder with its name: built before any image is made,
    so a bad reward option or embedding model costs no generation."""
    from dagcli.evaluation import load_embedder
    from dagcli.rewards import build_reward

    scorer = build_reward(scoring.reward, device=device, base_model=base_model, options=scoring.options)
    encoder, embed_name = load_embedder(scoring.embed_model, base_model, device, reporter)
    return scorer, encoder, embed_name


def _compare(sets, scorers, reporter: Reporter, scoring: _Scoring, settings, extra: dict) -> EvalResult:
    """Evaluate the image sets with the built reward and embedder and write the reports."""
    from dagcli.evaluation import run_evaluation, settings_dict, warning_lines

    scorer, encoder, embed_name = scorers
    report = run_evaluation(
        sets, scorer, encoder, scoring.output, batch_size=scoring.batch_size, use_lpips=scoring.lpips,
        hack_threshold=scoring.hack_threshold,
        settings=settings_dict(settings, **extra, reward=scoring.reward, embed_model=embed_name), reporter=reporter,
    )
    return EvalResult(report, scoring.output / "report.json", tuple(warning_lines(report["warnings"])))


# --- export ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote."""

    checkpoint: Path  # the checkpoint folder that was exported
    format: str  # diffusers | kohya | merged
    output: Path  # the folder (diffusers, merged) or .safetensors file (kohya) written
    files: tuple[Path, ...]  # every file written, sorted
    warnings: tuple[str, ...] = ()  # what a user of the export must know (a LoRA trained with a base-model tail)


def export(run: str | Path, *, format: str | None = None, output: str | Path | None = None,
           step: int | None = None, model: str | None = None) -> ExportResult:
    """`dag export RUN`: a run's latest checkpoint (or its `step`), a checkpoint or a LoRA folder as a diffusers
    folder, a kohya `.safetensors` file, or a full pipeline with the LoRA merged (`model`: the base it fits)."""
    from dagcli.checkpoint import LORA_FILE, resolve_checkpoint
    from dagcli.errors import unknown_choice
    from dagcli.export import FORMATS
    from dagcli.export import export as write_export

    if format is None:
        raise DagError(f"--format is required; valid options: {', '.join(FORMATS)}")
    if format not in FORMATS:
        raise unknown_choice("export format", format, FORMATS)
    if output is None:
        raise DagError("--output is required: a folder (diffusers, merged) or a .safetensors file (kohya)")
    if step is not None and (Path(run) / LORA_FILE).is_file():
        raise DagError(f"--step {step} needs a run directory; {str(run)!r} is already a single checkpoint")
    folder = resolve_checkpoint(Path(run), step)
    written = Path(write_export(folder, format, Path(output), model=model))
    files = (written,) if written.is_file() else tuple(sorted(p for p in written.rglob("*") if p.is_file()))
    return ExportResult(folder, format, written, files, tuple(tail_warnings(folder, format)))


def tail_warnings(folder: Path, format: str) -> list[str]:
    """The line an export of a LoRA trained with a base-model tail needs: it was trained to act on the first k of
    T steps only, which no export format records."""
    from dagcli.checkpoint import trained_lora_steps

    trained = trained_lora_steps(folder)
    if trained is None:
        return []
    k, total = trained
    how = ("a merged pipeline cannot switch it off; export diffusers or kohya instead" if format == "merged" else
           f"switch it off after step {k - 1} of {total} with a callback_on_step_end (docs/training.md)")
    return [f"{folder}: this LoRA was trained on the first {k} of {total} steps, the base model the rest "
            f"(its tail_steps); {how}"]


# --- rewards -----------------------------------------------------------------------------------------------


def score(folder: str | Path, *, reward: str = "compressibility", model: str | None = None, device: str = "cpu",
          batch_size: int = 16, reward_option: Sequence[str] = ()) -> list:
    """`dag rewards --score FOLDER`: the reward's mean and spread over a folder's images, one `ScoreSummary` per
    component (`model`: the base model the images came from, which picks clip's default)."""
    from dagcli.rewards import build_reward
    from dagcli.rewards.registry import parse_reward_options
    from dagcli.rewards.scoring import score_folder

    check_positive("--batch-size", batch_size)
    options = parse_reward_options(list(reward_option))
    return score_folder(build_reward(reward, device=device, base_model=model, options=options), folder, batch_size)


def reward_server(spec: str, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
                  batch_size: int = 32, model: str | None = None, reward_option: Sequence[str] = ()):
    """`dag serve-reward SPEC`: a `RewardServer` bound to host:port (0: any free port, see its `url`), scoring
    with the reward; the caller runs `serve_forever()` and closes it."""
    from dagcli.rewards import build_reward
    from dagcli.rewards.base import parse_device
    from dagcli.rewards.registry import parse_reward_options
    from dagcli.rewards.serve import RewardServer

    check_positive("--batch-size", batch_size)
    if not 0 <= port <= 65535:
        raise DagError(f"--port must be 0 to 65535, got {port}")
    options = parse_reward_options(list(reward_option))
    reward = build_reward(spec, device=str(parse_device(device)), base_model=model, options=options,
                          strict_finite=False)
    try:
        return RewardServer(reward, spec, host, port, batch_size)
    except OSError as e:
        raise DagError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                       "(0 picks a free one) or --host") from e
