"""Evaluation, the engine behind `dag eval`: generate (or load) images for a base model and checkpoints with the
same prompts and seeds, score them, compare them, and write the report.

    generation  image sets (base model, checkpoints, folders), their reward scores and embeddings
    metrics     diversity, fidelity, drift (Fréchet distance), mean/std: pure functions over tensors
    judges      the pixel judges a named model registers (colour, background and shape shares)
    monitor     the hacking monitor: a reward that rises while a monitored metric falls
    schema      the typed report (frozen dataclasses) and its report.json form
    report      image sets and their numbers turned into that report
    run         one evaluation end to end
    render      report.md, the self-contained report.html, the terminal table
"""

from __future__ import annotations

from dagcli.evaluation.generation import (
    ImageSet,
    checkpoint_refs,
    folder_model,
    folder_set,
    generate_sets,
)
from dagcli.evaluation.judges import judge_images, uses_pixel_judges
from dagcli.evaluation.metrics import (
    fidelity,
    frechet_distance,
    frechet_from_stats,
    pairwise_cosine_distance,
    sqrtm_psd,
)
from dagcli.evaluation.monitor import hacking_warnings, warning_lines
from dagcli.evaluation.report import EvalInputs, evaluate_sets, settings_dict
from dagcli.evaluation.run import default_embed_model, load_embedder, run_evaluation

__all__ = [
    "EvalInputs", "ImageSet", "checkpoint_refs", "default_embed_model", "evaluate_sets", "fidelity", "folder_model",
    "folder_set", "frechet_distance", "frechet_from_stats", "generate_sets", "hacking_warnings", "judge_images",
    "load_embedder", "pairwise_cosine_distance", "run_evaluation", "settings_dict", "sqrtm_psd",
    "uses_pixel_judges", "warning_lines",
]
