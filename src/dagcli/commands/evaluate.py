"""`dag eval` (alias `dag evaluate`): compare a base model with checkpoints, or score folders of images."""

from __future__ import annotations

from dataclasses import dataclass
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
    model_option,
    sampler_defaults,
    sampler_option,
)
from dagcli.errors import DagError

EVAL_EPILOG = (
    f"{MODEL_EPILOG} --embed-model defaults to the built-in tiny CLIP for the tiny model and to "
    "openai/clip-vit-large-patch14 for other models."
)


@dataclass(frozen=True)
class Scoring:
    """How the images are scored and compared, whatever produced them."""

    reward: str
    options: dict
    output: Path
    batch_size: int
    device: str
    embed_model: str | None
    hack_threshold: float
    lpips: bool


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
    from dagcli.rewards.registry import parse_reward_options, validate_spec

    if not reward:
        raise DagError("no reward given; use --reward NAME[,NAME...] (see `dag rewards`)")
    validate_spec(reward)
    check_positive("--batch-size", batch_size)
    if not 0 < hack_threshold < 1:
        raise DagError(f"--hack-threshold must be a fraction in (0, 1), got {hack_threshold}")
    options = parse_reward_options(reward_option or [])
    scoring = Scoring(reward, options, output, batch_size, device, embed_model, hack_threshold, lpips)
    if images:
        if ckpt or prompts:
            raise DagError("--images scores existing images; it cannot be combined with --ckpt or --prompts")
        if prompt and len(prompt) > 1:
            raise DagError("with --images give at most one --prompt (for folders without samples.jsonl)")
        _evaluate_folders(images, prompt[0] if prompt else None, model, scoring)
        return
    for name, value in [("--num-per-prompt", num_per_prompt), ("--steps", steps)]:
        check_positive(name, value)
    sampling = dict(num_per_prompt=num_per_prompt, seed=seed, steps=steps, guidance=guidance, eta=eta)
    _evaluate_models(prompts, prompt or [], ckpt or [], model, dtype, sampling, scoring)


def _evaluate_models(prompts, prompt, ckpt, model, dtype, sampling: dict, scoring: Scoring) -> None:
    """Generate for the base model and every checkpoint with the same seeds, then compare. Everything that can
    fail is checked before the first image is generated: prompts, checkpoints and their fit with the model,
    the output folder, the rewards with their options, the embedding model and the image size."""
    from dagcli.checkpoint import check_lora_fits, trained_resolution
    from dagcli.evaluation import checkpoint_refs, generate_sets
    from dagcli.generate import SampleSettings
    from dagcli.models import check_model_name, default_model, load_model, same_model
    from dagcli.progress import default_reporter
    from dagcli.prompts import PromptItem, load_prompts

    if not prompts and not prompt:
        raise DagError("no prompts given; use --prompts FILE|SET or --prompt TEXT (or --images DIR)")
    items = [PromptItem(p) for p in prompt] + (load_prompts(prompts) if prompts else [])
    refs = checkpoint_refs(ckpt)
    trained_on = _base_models(refs)
    model = model or next(iter(trained_on.values()), None) or default_model()
    check_model_name(model)
    for ref in refs:
        check_lora_fits(ref.folder, model)
    check_eta(sampling["eta"], model)
    check_writable_dir(scoring.output)

    reporter = default_reporter()
    for label, base in trained_on.items():
        if not same_model(base, model):
            reporter.warn(f"{label} was trained on {base!r}, evaluated on {model!r}")
    loaded = load_model(model, device=scoring.device, dtype=dtype)
    for ref in refs:  # against the loaded denoiser: a model whose configuration could not be read before
        check_lora_fits(ref.folder, loaded.name, type(loaded.family), loaded.family.denoiser)
    scorers = _scorers(scoring, loaded.name, str(loaded.device), reporter)
    size = _evaluation_size(loaded, [trained_resolution(r.folder) for r in refs])
    guidance = sampling["guidance"]
    settings = SampleSettings(
        **sampler_defaults(loaded, sampling["steps"], guidance, sampling["eta"]),
        height=size,
        width=size,
        batch_size=scoring.batch_size,
        num_per_prompt=sampling["num_per_prompt"],
        seed=sampling["seed"],
    )
    sets = generate_sets(loaded, items, settings, refs, scoring.output, reporter)
    extra = {"mode": "generate", "model": loaded.name, "checkpoints": [str(r.folder.resolve()) for r in refs]}
    _finish(sets, scorers, reporter, scoring, settings, extra)


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


def _evaluate_folders(folders: list[Path], prompt: str | None, model: str | None, scoring: Scoring) -> None:
    """Score existing images; the first folder is the reference for drift and the hacking monitor."""
    from dagcli.evaluation import folder_model, folder_set
    from dagcli.models import resolve_device
    from dagcli.progress import default_reporter

    labels: list[str] = []
    for folder in folders:
        label = Path(folder).resolve().name or "images"
        while label in labels:
            label += "'"
        labels.append(label)
    sets = [folder_set(Path(f), label, prompt) for f, label in zip(folders, labels, strict=True)]
    check_writable_dir(scoring.output)
    model = model or folder_model(Path(folders[0]))
    device = str(resolve_device(scoring.device))
    extra = {"mode": "images", "model": model, "folders": [str(Path(f).resolve()) for f in folders]}
    reporter = default_reporter()
    _finish(sets, _scorers(scoring, model, device, reporter), reporter, scoring, None, extra)


def _scorers(scoring: Scoring, base_model, device, reporter):
    """The reward (with its options) and the embedding encoder with its name: built before any image is made,
    so a bad reward option or embedding model costs no generation."""
    from dagcli.evaluation import load_embedder
    from dagcli.rewards import build_reward

    scorer = build_reward(scoring.reward, device=device, base_model=base_model, options=scoring.options)
    encoder, embed_name = load_embedder(scoring.embed_model, base_model, device, reporter)
    return scorer, encoder, embed_name


def _finish(sets, scorers, reporter, scoring: Scoring, settings, extra: dict) -> None:
    """Evaluate with the built reward and embedder, write the reports, print the table and warnings."""
    from dagcli.evaluation import run_evaluation, settings_dict, warning_lines
    from dagcli.evaluation.render import terminal_table
    from dagcli.progress import print_table

    scorer, encoder, embed_name = scorers
    report = run_evaluation(
        sets,
        scorer,
        encoder,
        scoring.output,
        batch_size=scoring.batch_size,
        use_lpips=scoring.lpips,
        hack_threshold=scoring.hack_threshold,
        settings=settings_dict(settings, **extra, reward=scoring.reward, embed_model=embed_name),
        reporter=reporter,
    )
    print_table(terminal_table(report))
    for line in warning_lines(report["warnings"]):
        reporter.warn(line)
    reporter.info(f"wrote {scoring.output / 'report.json'}, report.md and report.html")


def register(app: typer.Typer) -> None:
    """Add `eval` and its hidden alias `evaluate`."""
    app.command("eval", epilog=EVAL_EPILOG)(evaluate)
    app.command("evaluate", hidden=True, epilog=EVAL_EPILOG)(evaluate)
