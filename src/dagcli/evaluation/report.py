"""The report: image sets and their scores turned into the typed `Report` (`evaluation.schema`), whose
`to_dict()` is report.json (see docs/evaluation.md for what every number means).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dagcli.errors import DagError
from dagcli.evaluation.generation import EMBED_BATCH, ImageSet, embed_images, lpips_diversity_fn, score_set
from dagcli.evaluation.judges import (
    PIXEL_ATTRIBUTES,
    PIXEL_METRICS,
    judge_images,
    pixel_shares,
    uses_pixel_judges,
)
from dagcli.evaluation.metrics import (
    DEFAULT_RIDGE,
    fidelity,
    frechet_distance,
    mean_std,
    pairwise_cosine_distance,
)
from dagcli.evaluation.monitor import DEFAULT_HACK_THRESHOLD, model_warnings

REPORT_VERSION = 2


def _num(x: float | None) -> float | None:
    """JSON-safe number: NaN and inf become None."""
    return None if x is None or not math.isfinite(x) else float(x)


def _mean_defined(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


@dataclass
class EvalInputs:
    """Everything `evaluate_sets` needs beyond the image sets."""

    rewards: dict[str, dict[str, torch.Tensor]]  # label -> component -> scores [N]
    embeddings: dict[str, torch.Tensor] | None = None  # label -> [N, D] image embeddings
    text_embeddings: torch.Tensor | None = None  # [P, D] one row per prompt in `prompts` order
    lpips: dict[str, dict[str, float]] | None = None  # label -> prompt -> mean pairwise LPIPS
    hack_threshold: float = DEFAULT_HACK_THRESHOLD
    ridge: float = DEFAULT_RIDGE
    settings: dict = field(default_factory=dict)
    pixels: dict[str, list[dict]] | None = None  # label -> per image what its pixels show (built-in models)


def unique_prompts(sets: Sequence[ImageSet]) -> list[str]:
    """The prompts of all sets, each once, in order of first appearance."""
    return list(dict.fromkeys(p for s in sets for p in s.prompts))


def prompt_block(
    s: ImageSet, prompt: str, prompts: list[str], inputs: EvalInputs, base: ImageSet | None
) -> dict:
    """Numbers for one model and one prompt."""
    idx = s.indices(prompt)
    block = {
        "prompt": prompt,
        "seeds": [s.seeds[i] for i in idx],
        "files": [s.files[i] for i in idx],
        "metadata": next((s.metadata[i] for i in idx if i < len(s.metadata) and s.metadata[i]), None),
        "rewards": {
            name: {**mean_std(v[idx]), "scores": [float(x) for x in v[idx]]}
            for name, v in inputs.rewards[s.label].items()
        },
        "diversity": None,
        "fidelity": None,
        **dict.fromkeys(PIXEL_METRICS),
        "drift": None,
        "lpips_diversity": None,
        "pixels": None,
    }
    if inputs.lpips is not None:
        block["lpips_diversity"] = _num(inputs.lpips[s.label].get(prompt))
    if inputs.pixels is not None:
        block["pixels"] = [inputs.pixels[s.label][i] for i in idx]
        block.update(pixel_shares(block["pixels"], [prompt] * len(idx)))
    if inputs.embeddings is None:
        return block
    emb = inputs.embeddings[s.label][idx]
    block["diversity"] = _num(pairwise_cosine_distance(emb))
    if inputs.text_embeddings is not None and len(prompts) > 1:
        block["fidelity"] = _num(fidelity(emb, inputs.text_embeddings, [prompts.index(prompt)] * len(idx)))
    if base is not None and base.indices(prompt):
        block["drift"] = _num(
            frechet_distance(inputs.embeddings[base.label][base.indices(prompt)], emb, inputs.ridge)
        )
    return block


def overall_block(
    s: ImageSet, per_prompt: list[dict], prompts: list[str], inputs: EvalInputs, base: ImageSet | None
) -> dict:
    """Numbers for one model over all prompts: rewards over all images, metrics averaged over prompts."""
    block = {
        "images": len(s.images),
        "rewards": {name: mean_std(v) for name, v in inputs.rewards[s.label].items()},
        "diversity": _mean_defined([p["diversity"] for p in per_prompt]),
        "lpips_diversity": _mean_defined([p["lpips_diversity"] for p in per_prompt]),
        "fidelity": None,
        **dict.fromkeys(PIXEL_METRICS),
        "drift": _mean_defined([p["drift"] for p in per_prompt]),
        "drift_pooled": None,
    }
    if inputs.pixels is not None:
        block.update(pixel_shares(inputs.pixels[s.label], s.prompts))
    if inputs.embeddings is not None and inputs.text_embeddings is not None and len(prompts) > 1:
        targets = [prompts.index(p) for p in s.prompts]
        block["fidelity"] = _num(fidelity(inputs.embeddings[s.label], inputs.text_embeddings, targets))
    if inputs.embeddings is not None and base is not None:
        block["drift_pooled"] = _num(
            frechet_distance(inputs.embeddings[base.label], inputs.embeddings[s.label], inputs.ridge)
        )
    return block


def evaluate_sets(sets: Sequence[ImageSet], inputs: EvalInputs) -> dict:
    """The full report dictionary (JSON-ready): per model, per prompt and overall numbers, and warnings.

    The first set is the reference ("base") for drift and for the hacking monitor.
    """
    if not sets:
        raise DagError("nothing to evaluate")
    prompts = unique_prompts(sets)
    base = sets[0]
    models, warnings = [], []
    for k, s in enumerate(sets):
        ref = base if k > 0 else None
        per_prompt = [prompt_block(s, p, prompts, inputs, ref) for p in prompts if s.indices(p)]
        overall = overall_block(s, per_prompt, prompts, inputs, ref)
        models.append({"label": s.label, "source": s.source, "overall": overall, "per_prompt": per_prompt})
        if k > 0:
            warnings += model_warnings(models[0], models[-1], inputs.hack_threshold)
    return {
        "version": REPORT_VERSION,
        "settings": {**inputs.settings, "hack_threshold": inputs.hack_threshold, "ridge": inputs.ridge},
        "pixel_judges": list(PIXEL_ATTRIBUTES) if inputs.pixels is not None else [],
        "prompts": prompts,
        "rewards": list(next(iter(inputs.rewards.values())).keys()),
        "models": models,
        "warnings": warnings,
    }


def compute_inputs(
    sets: Sequence[ImageSet],
    reward,
    encoder,
    *,
    batch_size: int,
    use_lpips: bool,
    hack_threshold: float,
    settings: dict,
    reporter,
) -> EvalInputs:
    """Score, embed, (optionally) LPIPS and, on the built-in models, pixel-judge every set.

    `encoder` may be None (no embedding metrics).
    """
    prompts = unique_prompts(sets)
    rewards, embeddings = {}, {} if encoder is not None else None
    with reporter.task("scoring", total=len(sets)) as advance:
        for s in sets:
            rewards[s.label] = score_set(reward, s, batch_size)
            if encoder is not None:
                embeddings[s.label] = embed_images(encoder, s.tensor())
            advance()
    text = None
    if encoder is not None and encoder.tokenizer is not None and len(prompts) > 1:
        text = torch.cat(
            [
                encoder.embed_texts(prompts[i : i + EMBED_BATCH]).double().cpu()
                for i in range(0, len(prompts), EMBED_BATCH)
            ]
        )
    lp = lpips_tables(sets) if use_lpips else None
    pixels = (
        {s.label: judge_images(s.images) for s in sets}
        if uses_pixel_judges(settings.get("model"), prompts)
        else None
    )
    return EvalInputs(rewards, embeddings, text, lp, hack_threshold, DEFAULT_RIDGE, settings, pixels)


def lpips_tables(sets: Sequence[ImageSet]) -> dict[str, dict[str, float]] | None:
    """label -> prompt -> mean pairwise LPIPS, or None when LPIPS is unavailable."""
    measure = lpips_diversity_fn()
    if measure is None:
        return None
    out = {}
    for s in sets:
        x = s.tensor()
        try:
            out[s.label] = {p: measure(x[s.indices(p)]) for p in dict.fromkeys(s.prompts)}
        except Exception:  # e.g. images too small for the backbone
            return None
    return out


def settings_dict(settings, **extra) -> dict:
    """Sample settings (a dataclass) plus extra fields, for the report."""
    return {**(asdict(settings) if settings is not None else {}), **extra}
