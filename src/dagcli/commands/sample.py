"""`dag sample`: images from the base model or a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from dagcli.commands.common import (
    MODEL_EPILOG,
    device_option,
    dtype_option,
    eta_option,
    flow_sampler_option,
    model_option,
    sampler_option,
)


def sample(
    prompt: list[str] = typer.Option(None, "--prompt", "-p", metavar="<text>", help="A prompt (repeatable)."),
    prompts: str = typer.Option(None, "--prompts", help="Prompt file (.txt/.jsonl) or built-in set name."),
    num_per_prompt: int = typer.Option(4, "--num-per-prompt", "-n", help="Images per prompt."),
    seed: int = typer.Option(0, "--seed", help="Base seed; image j of prompt i uses seed + i*n + j."),
    steps: int = sampler_option("steps"),
    eta: float = eta_option(),
    sampler: str = flow_sampler_option(),
    guidance: float = sampler_option("guidance"),
    height: int = typer.Option(
        None, "--height", help="Image height in pixels. \\[default: the --ckpt run's, else the model's]"
    ),
    width: int = typer.Option(
        None, "--width", help="Image width in pixels. \\[default: the --ckpt run's, else the model's]"
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per sampler call."),
    ckpt: str = typer.Option(None, "--ckpt", help="A LoRA folder, checkpoint folder or training run (latest)."),
    output: Path = typer.Option(Path("samples"), "--output", "-o", help="Output folder."),
    model: str = model_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Generate images (one PNG each, a grid per prompt, samples.jsonl)."""
    from dagcli import api
    from dagcli.progress import default_reporter

    reporter = default_reporter()
    result = api.sample(prompt=prompt or [], prompts=prompts, num_per_prompt=num_per_prompt, seed=seed, steps=steps,
                        eta=eta, sampler=sampler, guidance=guidance, height=height, width=width, batch_size=batch_size, ckpt=ckpt,
                        output=output, model=model, device=device, dtype=dtype, reporter=reporter)
    reporter.info(f"wrote {len(result.images)} images for {result.prompts} prompts to {output} "
                  f"({result.manifest.name})")


def register(app: typer.Typer) -> None:
    app.command("sample", epilog=MODEL_EPILOG)(sample)
