"""`dag sample`: images from the base model or a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from dagcli.commands.common import (
    MODEL_EPILOG,
    check_eta,
    check_positive,
    check_writable_dir,
    device_option,
    dtype_option,
    eta_option,
    flow_sampler_option,
    model_option,
    sampler_defaults,
    sampler_option,
)
from dagcli.errors import DagError


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
    from dagcli.checkpoint import (
        attach_lora,
        check_lora_fits,
        read_meta,
        resolve_checkpoint,
        trained_resolution,
    )
    from dagcli.families import set_sampler
    from dagcli.families.base import check_image_size
    from dagcli.generate import SampleSettings, generate, write_samples
    from dagcli.models import check_model_name, default_model, load_model, same_model
    from dagcli.progress import default_reporter
    from dagcli.prompts import PromptItem, load_prompts

    # Validate everything before loading any weights.
    if not prompt and not prompts:
        raise DagError("no prompts given; use --prompt TEXT (repeatable) or --prompts FILE|SET")
    items = [PromptItem(p) for p in (prompt or [])] + (load_prompts(prompts) if prompts else [])
    for name, value in [("--num-per-prompt", num_per_prompt), ("--steps", steps), ("--batch-size", batch_size),
                        ("--height", height), ("--width", width)]:
        check_positive(name, value)
    folder = resolve_checkpoint(ckpt) if ckpt else None
    trained_on = read_meta(folder).get("base_model") if folder else None
    model = model or trained_on or default_model()
    check_model_name(model)
    if folder:
        check_lora_fits(folder, model)
    check_eta(eta, model)
    check_writable_dir(output)

    reporter = default_reporter()
    if not same_model(trained_on, model):  # it fits: another name for the model, or a fine-tune of it
        reporter.warn(f"{ckpt} was trained on {trained_on!r}, sampled with {model!r}")
    loaded = load_model(model, device=device, dtype=dtype)
    set_sampler(loaded.family, sampler or "sde", eta, what="--sampler")
    size = (trained_resolution(folder) if folder else None) or loaded.resolution  # the run's, else the model's
    height, width = height or size, width or size
    check_image_size(loaded.family, {"--height": height, "--width": width})
    if folder:
        attach_lora(loaded.pipe, folder, loaded.name)
    settings = SampleSettings(
        **sampler_defaults(loaded, steps, guidance, eta),
        height=height,
        width=width,
        batch_size=batch_size,
        num_per_prompt=num_per_prompt,
        seed=seed,
    )
    images = generate(loaded, items, settings, reporter)
    extra = {"model": loaded.name, **({"ckpt": str(folder)} if folder else {})}
    manifest = write_samples(images, settings, output, extra)
    reporter.info(f"wrote {len(images)} images for {len(items)} prompts to {output} ({manifest.name})")


def register(app: typer.Typer) -> None:
    app.command("sample", epilog=MODEL_EPILOG)(sample)
