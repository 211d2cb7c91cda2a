"""`dag export`: a trained LoRA as a diffusers folder, a kohya file, or a merged pipeline."""

from __future__ import annotations

from pathlib import Path

import typer

from dagcli.commands.common import MODEL_EPILOG


def export(
    run: Path = typer.Argument(
        ..., metavar="RUN", help="A training run (its latest checkpoint), a checkpoint or LoRA folder."
    ),
    step: int = typer.Option(None, "--step", help="Export this checkpoint step of the run instead of the latest."),
    fmt: str = typer.Option(None, "--format", "-f", help="diffusers | kohya | merged (required)."),
    output: Path = typer.Option(
        None, "--output", "-o", help="Folder (diffusers, merged) or .safetensors file (kohya); required."
    ),
    model: str = typer.Option(
        None, "--model", "-m", help="Base model (see below); the LoRA must fit it. \\[default: the checkpoint's]"
    ),
) -> None:
    """Export a checkpoint's LoRA for diffusers, kohya/A1111/ComfyUI, or as a full merged pipeline."""
    from dagcli import api
    from dagcli.progress import default_reporter

    result = api.export(run, format=fmt, output=output, step=step, model=model)
    reporter = default_reporter()
    for line in result.warnings:
        reporter.warn(line)
    reporter.info(f"exported {result.checkpoint} as {result.format} to {result.output}")


def register(app: typer.Typer) -> None:
    app.command("export", epilog=MODEL_EPILOG)(export)
