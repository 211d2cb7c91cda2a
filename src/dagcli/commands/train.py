"""`dag train`: align a model to a reward with DAG-DB (default), DAG-KL or DDPO."""

from __future__ import annotations

from pathlib import Path

import typer

from dagcli.algorithms import ALGORITHMS
from dagcli.commands.common import dtype_option, eta_option, flow_sampler_option, sampler_option


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
    sampler: str = flow_sampler_option(),
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
    from dagcli import api
    from dagcli.progress import default_reporter

    reporter = default_reporter()
    api.train(config, overrides=set_ or [], algorithm=algorithm, reward=reward, prompts=prompts, epochs=epochs,
              batch_size=batch_size, train_batch_size=train_batch_size, steps=steps, eta=eta, sampler=sampler, guidance=guidance,
              seed=seed, output=output, model=model, device=device, dtype=dtype, report_to=report_to, resume=resume,
              resume_from=resume_from, reporter=reporter, on_start=lambda trainer: banner(trainer, reporter))


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
