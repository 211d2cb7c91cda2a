"""`dag eval` (alias `dag evaluate`): compare a base model with checkpoints, or score folders of images."""

from __future__ import annotations

from pathlib import Path

import typer

from dagcli.commands.common import (
    MODEL_EPILOG,
    device_option,
    dtype_option,
    eta_option,
    model_option,
    sampler_option,
)

EVAL_EPILOG = (
    f"{MODEL_EPILOG} --embed-model defaults to the built-in tiny CLIP for the tiny model and to "
    "openai/clip-vit-large-patch14 for other models."
)


def evaluate(
    prompts: str = typer.Option(None, "--prompts", help="Prompt file (.txt/.jsonl) or built-in set name."),
    prompt: list[str] = typer.Option(
        None, "--prompt", "-p", metavar="<text>",
        help="A prompt (repeatable); with --images, the prompt of a bare folder.",
    ),
    ckpt: list[str] = typer.Option(
        None, "--ckpt", metavar="<path>",
        help="Run dir, checkpoint or LoRA folder to compare with the base (repeatable).",
    ),
    images: list[Path] = typer.Option(
        None, "--images", metavar="<path>",
        help="Score the images of this folder instead of generating (repeatable).",
    ),
    reward: str = typer.Option(
        None, "--reward", "-r", help="Rewards, e.g. aesthetic,clip or http://HOST:PORT (one metric each; see dag rewards --help)."
    ),
    reward_option: list[str] = typer.Option(
        None, "--reward-option", metavar="<key=value>", help="Reward option REWARD.KEY=VALUE (repeatable)."
    ),
    num_per_prompt: int = typer.Option(4, "--num-per-prompt", "-n", help="Images per prompt."),
    seed: int = typer.Option(0, "--seed", help="Base seed; image j of prompt i uses seed + i*n + j."),
    output: Path = typer.Option(Path("eval"), "--output", "-o", help="Output folder (reports and images)."),
    model: str = model_option(),
    steps: int = sampler_option("steps"),
    guidance: float = sampler_option("guidance"),
    eta: float = eta_option(),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per sampler and reward call."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    embed_model: str = typer.Option(
        None,
        "--embed-model",
        help="CLIP id or folder for diversity, drift and fidelity; 'none' skips them. \\[default: see below]",
    ),
    hack_threshold: float = typer.Option(
        0.2,
        "--hack-threshold",
        help="Warn when a reward rises while diversity or fidelity drops by this fraction.",
    ),
    lpips: bool = typer.Option(True, "--lpips/--no-lpips", help="LPIPS diversity when lpips is installed."),
) -> None:
    """Compare checkpoints with the base model: rewards, diversity, drift, fidelity (report.json/md/html)."""
    from dagcli import api
    from dagcli.evaluation.render import terminal_table
    from dagcli.progress import default_reporter, print_table

    reporter = default_reporter()
    result = api.evaluate(
        reward=reward, prompts=prompts, prompt=prompt or [], ckpt=ckpt or [], images=images or [],
        reward_option=reward_option or [], num_per_prompt=num_per_prompt, seed=seed, output=output, model=model,
        steps=steps, guidance=guidance, eta=eta, batch_size=batch_size, device=device, dtype=dtype,
        embed_model=embed_model, hack_threshold=hack_threshold, lpips=lpips, reporter=reporter,
    )
    print_table(terminal_table(result.report))
    for line in result.warnings:
        reporter.warn(line)
    reporter.info(f"wrote {result.report_path}, report.md and report.html")


def register(app: typer.Typer) -> None:
    """Add `eval` and its hidden alias `evaluate`."""
    app.command("eval", epilog=EVAL_EPILOG)(evaluate)
    app.command("evaluate", hidden=True, epilog=EVAL_EPILOG)(evaluate)
