"""`dag train`: align a model to a reward with DAG-DB (default), DAG-KL or DDPO."""

from __future__ import annotations

from pathlib import Path

import typer

from dagcli.algorithms import ALGORITHMS
from dagcli.commands.common import dtype_option, eta_option, sampler_option
from dagcli.errors import DagError, Interrupted


def train(
    config: Path = typer.Option(None, "--config", "-c", help="TOML preset (see examples/); flags override it."),
    set_: list[str] = typer.Option(
        None, "--set", metavar="<key=value>", help="Override a key: section.key=value (repeatable)."
    ),
    algorithm: str = typer.Option(None, "--algorithm", help=f"{' | '.join(ALGORITHMS)}. \\[default: dag-db]"),
    reward: str = typer.Option(
        None, "--reward", "-r",
        help="Reward spec, e.g. aesthetic, aesthetic:1,clip:0.5 or http://HOST:PORT. "
        "\\[default: the model's; built-in models: compressibility, others: aesthetic]",
    ),
    prompts: str = typer.Option(
        None, "--prompts",
        help="Prompt file or built-in set. \\[default: the model's; Stable Diffusion: simple_animals]",
    ),
    epochs: int = typer.Option(None, "--epochs", help="Number of epochs. \\[default: 100]"),
    batch_size: int = typer.Option(
        None, "--batch-size", help="Trajectories per sampler call (per process). \\[default: 16]"
    ),
    train_batch_size: int = typer.Option(
        None, "--train-batch-size", help="Transitions per micro-batch (per process). \\[default: 8]"
    ),
    steps: int = sampler_option("steps"),
    eta: float = eta_option(training=True),
    guidance: float = sampler_option("guidance"),
    seed: int = typer.Option(None, "--seed", help="Run seed. \\[default: 0]"),
    output: Path = typer.Option(None, "--output", "-o", help="Run directory. \\[default: runs/dag]"),
    model: str = typer.Option(
        None, "--model", "-m", help="Base model: built-in name, local folder or hub id. \\[default: tiny]"
    ),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda. \\[default: auto]"),
    dtype: str = dtype_option(default=None),
    report_to: str = typer.Option(
        None, "--report-to", help="none | tensorboard | wandb (optional extras). \\[default: none]"
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint of --output."),
    resume_from: Path = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder."),
) -> None:
    """Fine-tune a LoRA so that high-reward images become likely (DAG-DB with the forward-looking flow)."""
    from dagcli.config import named_by_flags, read_settings
    from dagcli.progress import default_reporter

    values = {
        "train.algorithm": algorithm, "reward.spec": reward, "sampling.prompts": prompts, "train.epochs": epochs,
        "sampling.batch_size": batch_size, "train.batch_size": train_batch_size, "sampling.steps": steps,
        "sampling.eta": eta, "sampling.guidance": guidance, "train.seed": seed,
        "output.dir": str(output) if output is not None else None, "model.name": model, "model.device": device,
        "model.dtype": dtype, "output.report_to": report_to,
    }
    given_flags = {key: FLAGS[key] for key, v in values.items() if v is not None}
    overrides = list(set_ or []) + [f"{k}={_toml(v)}" for k, v in values.items() if v is not None]
    with named_by_flags(given_flags):  # messages name what the user typed: `--batch-size 0`, not the key
        given = read_settings(config, overrides)
        reporter = default_reporter()
        cfg = resumed_config(given, resume_from) if (resume or resume_from) else config_from_given(given)
        run(cfg, resume=resume, resume_from=resume_from, reporter=reporter)


# the config key each flag of `dag train` sets
FLAGS = {
    "train.algorithm": "--algorithm", "reward.spec": "--reward", "sampling.prompts": "--prompts",
    "train.epochs": "--epochs", "sampling.batch_size": "--batch-size", "train.batch_size": "--train-batch-size",
    "sampling.steps": "--steps", "sampling.eta": "--eta", "sampling.guidance": "--guidance", "train.seed": "--seed",
    "output.dir": "--output", "model.name": "--model", "model.device": "--device", "model.dtype": "--dtype",
    "output.report_to": "--report-to",
}


def config_from_given(given: dict):
    from dagcli.config import config_from_dict

    return config_from_dict(given)


def resumed_config(given: dict, resume_from: Path | None):
    """A resumed run's settings come from the run itself (`RUN/config.toml`, else the checkpoint's metadata);
    the given flags may only extend or watch it (`config.RESUMABLE_KEYS`), anything else is refused."""
    import tomllib

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
        try:
            saved = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise DagError(f"{str(run_dir / 'config.toml')!r} is not valid TOML ({str(e).splitlines()[0]})") from e
        source = str(run_dir / "config.toml")
    if saved is None:
        if resume_from is not None:
            raise DagError(f"{source!r} records no settings (no config in meta.json); it cannot be resumed")
        raise DagError(f"--resume: {str(run_dir)!r} has no config.toml and no checkpoints to resume; "
                       "start without --resume, or pass the run's folder with --output")
    given = {**given, "output": {**given.get("output", {}), "dir": str(run_dir)}}
    cfg, changes = resume_config(saved, given)
    if changes:
        from dagcli.progress import default_reporter

        default_reporter().info("resuming with " + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes))
    return cfg


def _toml(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def preflight(cfg, resume: bool, resume_from: Path | None) -> tuple[object, list[str], Path | None]:
    """Everything that can be checked before loading a model, all problems reported at once: the model's
    defaults for what is unset, prompts, reward names and plugins, model name, the run directory, and the
    checkpoint to resume. Returns the completed config, the prompts and the checkpoint folder (or None)."""
    from dagcli.commands.common import check_writable_dir
    from dagcli.config import fill_model_defaults
    from dagcli.models import check_decoder_name, check_model_name, default_model
    from dagcli.prompts import load_prompts
    from dagcli.rewards import validate_spec

    problems: list[str] = []
    cfg, _ = fill_model_defaults(cfg)

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
    return cfg, [p.prompt for p in items], folder


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


def run(cfg, resume: bool = False, resume_from: Path | None = None, reporter=None):
    """Validate, build the trainer, print the banner, train. Returns the trainer (for tests and scripts), or None
    when the run to resume is already finished."""
    from dagcli.config import fill_model_defaults
    from dagcli.trainer import Trainer

    cfg, used = fill_model_defaults(cfg)
    cfg, prompts, folder = preflight(cfg, resume, resume_from)
    if folder is not None and finished(folder, cfg, reporter):
        return None
    trainer = Trainer(cfg, prompts, reporter=reporter)
    if folder is not None:
        trainer.resume(folder)
    if trainer.is_main and reporter is not None:  # said once set-up succeeded: an error stays one line
        if used:
            reporter.info(used)
        banner(trainer, reporter)
    try:
        trainer.train()
    except KeyboardInterrupt as e:  # a second Ctrl-C: at once
        raise Interrupted(f"stopped at once; {_last_checkpoint(trainer.run_dir)}") from e
    if trainer.stopped:
        raise Interrupted(f"stopped after epoch {trainer.state.epoch}; {_last_checkpoint(trainer.run_dir)}",
                          trainer.stop.signum or 2)  # 2: another process got the signal
    return trainer


def finished(folder: Path, cfg, reporter) -> bool:
    """Whether the checkpoint to resume (intact: its checksums are verified) already holds every configured
    epoch; if so, says so and how to extend the run (no model is loaded)."""
    from dagcli.checkpoint import verify_checkpoint

    done = int(verify_checkpoint(folder).get("state", {}).get("epoch", 0))
    if done < cfg.train.epochs:
        return False
    if reporter is not None:
        reporter.info(f"{cfg.output.dir} is finished: {done} of {cfg.train.epochs} epochs done; to train it further, "
                      f"pass --resume --epochs N with N > {done}")
    return True


def _last_checkpoint(run_dir: Path) -> str:
    """Where an interrupted run can be continued from, for its last message."""
    from dagcli.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    if not found:
        return "no checkpoint was saved yet"
    step, folder = found[-1]
    return f"the last checkpoint is {folder} (epoch {step}); resume with --resume"


def run_sizes(trainer) -> dict:
    """Derived sizes shown in the start-up banner (per item of the algorithm's loss unit)."""
    from dagcli.config import epoch_sizes

    c, n_proc, s = trainer.config, trainer.dist.size, epoch_sizes(trainer.config)
    counts = {f"{n}_parameters": sum(p.numel() for p in m.parameters()) for n, m in trainer.raw_modules().items()}
    return {
        "processes": n_proc,
        "trajectories_per_epoch": c.sampling.batch_size * c.sampling.batches_per_epoch * n_proc,
        "unit": s.unit,
        "transitions_per_trajectory": s.items_per_trajectory,
        "micro_batches_per_epoch": s.micro_batches,
        "micro_batches_per_optimizer_step": s.accumulation,
        "optimizer_steps_per_epoch": s.optimizer_steps,
        "lora_parameters": sum(p.numel() for p in trainer.raw_denoiser.parameters() if p.requires_grad),
        "denoiser_parameters": sum(p.numel() for p in trainer.raw_denoiser.parameters()),
        **counts,
    }


def banner(trainer, reporter) -> None:
    from dagcli.config import UNIT_NOUNS

    c, s = trainer.config, run_sizes(trainer)
    noun = UNIT_NOUNS[s["unit"]]
    reporter.info(
        f"[bold]dag train[/] {c.train.algorithm} on {trainer.model.name} · reward {c.reward.spec} · "
        f"{len(set(trainer.prompts))} prompts · output {c.output.dir}"
    )
    reporter.info(
        f"  {s['trajectories_per_epoch']} trajectories/epoch ({s['processes']} process(es)), "
        f"{s['transitions_per_trajectory']} {noun} each, {s['micro_batches_per_epoch']} micro-batches, "
        f"{s['optimizer_steps_per_epoch']} optimiser step(s)/epoch · LoRA {s['lora_parameters']:,} params"
        + "".join(f", {k.removesuffix('_parameters')} {v:,}" for k, v in s.items()
                  if k.endswith("_parameters") and k not in ("lora_parameters", "denoiser_parameters"))
        + f", {type(trainer.raw_denoiser).__name__} {s['denoiser_parameters']:,}"
    )
    total = c.sampling.batch_size * c.sampling.batches_per_epoch * s["transitions_per_trajectory"]
    if total % c.train.batch_size:
        reporter.warn(f"{total} {noun} per epoch do not divide into micro-batches of {c.train.batch_size}; "
                      "the last one is smaller")
    if s["micro_batches_per_epoch"] > s["micro_batches_per_optimizer_step"] \
            and s["micro_batches_per_epoch"] % s["micro_batches_per_optimizer_step"]:  # fewer: one step per epoch
        reporter.warn(f"{s['micro_batches_per_epoch']} micro-batches per epoch are not a multiple of "
                      f"{s['micro_batches_per_optimizer_step']} micro-batches per optimiser step; "
                      "the last optimiser step of each epoch accumulates fewer")


def register(app: typer.Typer) -> None:
    from dagcli.commands.common import REWARD_SERVERS_EPILOG

    app.command("train", epilog=REWARD_SERVERS_EPILOG)(train)
