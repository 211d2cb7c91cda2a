"""Running an evaluation: the embedding model, scoring every set, and writing report.json/.md/.html.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dagcli.errors import DagError
from dagcli.evaluation.generation import ImageSet
from dagcli.evaluation.report import compute_inputs, evaluate_sets


def default_embed_model(base_model: str | None) -> str:
    """The embedding model when none is given: the CLIP the base model registers (the built-in models' small
    CLIP), else ViT-L/14."""
    from dagcli.rewards.clip import DEFAULT_CLIP, model_clip

    folder = model_clip(base_model)
    return DEFAULT_CLIP if folder is None else str(folder)


def load_embedder(embed_model: str | None, base_model: str | None, device, reporter):
    """(CLIP encoder, its name), or (None, None) for `--embed-model none` or when the default is unavailable.

    An embedding model the user named must load (else DagError); the default one may be missing, which
    skips diversity, fidelity and drift with a warning.
    """
    from dagcli.rewards.clip import load_clip

    if embed_model is not None and embed_model.strip().lower() == "none":
        return None, None
    name = embed_model or default_embed_model(base_model)
    try:
        return load_clip(name, device=device, what="embedding model"), name
    except DagError as e:
        if embed_model is not None:
            raise
        reporter.warn(f"diversity, fidelity and drift skipped: {e}; pass --embed-model CLIP_ID_OR_DIR")
        return None, None


def run_evaluation(
    sets: Sequence[ImageSet],
    reward,
    encoder,
    output: Path,
    *,
    batch_size: int,
    use_lpips: bool,
    hack_threshold: float,
    settings: dict,
    reporter,
) -> dict:
    """Score and compare the sets, write report.json/.md/.html into `output`, return the report."""
    from dagcli.evaluation.render import write_report

    inputs = compute_inputs(
        sets,
        reward,
        encoder,
        batch_size=batch_size,
        use_lpips=use_lpips,
        hack_threshold=hack_threshold,
        settings=settings,
        reporter=reporter,
    )
    report = evaluate_sets(sets, inputs)
    write_report(report, sets, output)
    return report
