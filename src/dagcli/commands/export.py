"""`dag export`: a trained LoRA as a diffusers folder, a kohya file, or a merged pipeline."""

from __future__ import annotations

from pathlib import Path

import typer

from dagcli.commands.common import MODEL_EPILOG
from dagcli.errors import DagError


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
    from dagcli.checkpoint import LORA_FILE, resolve_checkpoint
    from dagcli.errors import unknown_choice
    from dagcli.export import FORMATS
    from dagcli.export import export as run_export
    from dagcli.progress import default_reporter

    if fmt is None:
        raise DagError(f"--format is required; valid options: {', '.join(FORMATS)}")
    if fmt not in FORMATS:
        raise unknown_choice("export format", fmt, FORMATS)
    if output is None:
        raise DagError("--output is required: a folder (diffusers, merged) or a .safetensors file (kohya)")
    if step is not None and (Path(run) / LORA_FILE).is_file():
        raise DagError(f"--step {step} needs a run directory; {str(run)!r} is already a single checkpoint")
    folder = resolve_checkpoint(run, step)
    written = run_export(folder, fmt, output, model=model)
    default_reporter().info(f"exported {folder} as {fmt} to {written}")


def register(app: typer.Typer) -> None:
    app.command("export", epilog=MODEL_EPILOG)(export)
