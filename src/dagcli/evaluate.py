"""Evaluation: generate (or load) images for a base model and checkpoints, score them, compare them.

The engine behind `dag eval`. Metrics are pure functions over tensors (`pairwise_cosine_distance`,
`frechet_distance`, `fidelity`); on the built-in models the pixel judges of `dagcli.builtin.dataset` add
colour, background and shape shares; `evaluate_sets` turns image sets into the nested dictionary written to
`report.json` (see docs/evaluation.md for what every number means).

An image set is everything one model produced: the base model first, then each checkpoint, all generated
with the same prompts and seeds, so differences come from the weights and not from the noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dagcli.errors import DagError
from dagcli.generate import read_manifest

REPORT_VERSION = 2
DEFAULT_HACK_THRESHOLD = 0.2  # relative drop of a monitored metric that, with a reward gain, raises a warning
DEFAULT_RIDGE = 1e-6  # added to the diagonal of covariances before the Fréchet distance
EMBED_BATCH = 32
# What the pixel judges of the built-in models read, and the report keys of their shares.
PIXEL_ATTRIBUTES = ("colour", "background", "shape")
PIXEL_METRICS = tuple(f"pixel_{a}" for a in PIXEL_ATTRIBUTES)
# Metrics whose fall, while a reward rises, the hacking monitor reports (overall and per prompt). The pixel shape
# share is reported, not monitored.
MONITORED = ("diversity", "lpips_diversity", "fidelity", "pixel_colour", "pixel_background")


# --- metrics: pure functions over tensors -------------------------------------------------------------


def pairwise_cosine_distance(emb: torch.Tensor) -> float:
    """Mean of `1 - cos(e_i, e_j)` over all pairs i < j of the rows of `emb` [N, D]; NaN when N < 2."""
    n = int(emb.shape[0])
    if n < 2:
        return float("nan")
    unit = torch.nn.functional.normalize(emb.detach().double(), dim=-1)
    sim = unit @ unit.T
    i, j = torch.triu_indices(n, n, offset=1)
    return float((1.0 - sim[i, j]).mean())


def mean_and_covariance(x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of the rows of `x`; zero covariance for one row."""
    arr = np.asarray(
        x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64
    )
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, D] array, got shape {arr.shape}")
    mu = arr.mean(axis=0)
    if arr.shape[0] < 2:
        return mu, np.zeros((arr.shape[1], arr.shape[1]))
    centred = arr - mu
    return mu, centred.T @ centred / (arr.shape[0] - 1)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigen-decomposition (negative eigenvalues clipped to 0)."""
    sym = (matrix + matrix.T) / 2
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ1 Σ2)^{1/2}) for PSD Σ1, Σ2.

    With scipy installed, `scipy.linalg.sqrtm(Σ1 Σ2)`; otherwise the equal and numerically kinder
    tr((Σ1^{1/2} Σ2 Σ1^{1/2})^{1/2}), whose argument is symmetric PSD (same eigenvalues as Σ1 Σ2).
    """
    try:
        from scipy.linalg import sqrtm
    except ImportError:
        root1 = sqrtm_psd(sigma1)
        inner = root1 @ sigma2 @ root1
        values = np.linalg.eigvalsh((inner + inner.T) / 2)
        return float(np.sqrt(np.clip(values, 0.0, None)).sum())
    root = sqrtm(sigma1 @ sigma2)
    return float(np.real(np.trace(root)))


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of N(μ1, Σ1) and N(μ2, Σ2): |μ1 − μ2|² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})."""
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, dtype=np.float64)),
        np.atleast_1d(np.asarray(mu2, dtype=np.float64)),
    )
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, dtype=np.float64)),
        np.atleast_2d(np.asarray(sigma2, dtype=np.float64)),
    )
    diff = mu1 - mu2
    value = float(
        diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    )
    return max(value, 0.0)


def frechet_distance(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, ridge: float = DEFAULT_RIDGE
) -> float:
    """Fréchet distance between Gaussians fitted to the rows of `a` [N, D] and `b` [M, D].

    `ridge` is added to both covariances' diagonals: with few images per prompt the covariances are
    singular and the ridge keeps the matrix square root well defined.
    """
    mu1, s1 = mean_and_covariance(a)
    mu2, s2 = mean_and_covariance(b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"embeddings differ in width: {mu1.shape[0]} vs {mu2.shape[0]}")
    eye = np.eye(mu1.shape[0]) * ridge
    return frechet_from_stats(mu1, s1 + eye, mu2, s2 + eye)


def caption_matches(
    image_emb: torch.Tensor, text_emb: torch.Tensor, targets: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """[N] bool: whether image i's most similar caption (cosine, rows of `text_emb`) is `targets[i]`."""
    img = torch.nn.functional.normalize(image_emb.detach().double(), dim=-1)
    txt = torch.nn.functional.normalize(text_emb.detach().double().to(img.device), dim=-1)
    best = (img @ txt.T).argmax(dim=-1).cpu()
    return best == torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor) else targets).cpu()


def fidelity(image_emb: torch.Tensor, text_emb: torch.Tensor, targets: Sequence[int] | torch.Tensor) -> float:
    """Fraction of images whose best-matching caption among the prompt set is their own prompt."""
    if int(image_emb.shape[0]) == 0:
        return float("nan")
    return float(caption_matches(image_emb, text_emb, targets).double().mean())


def mean_std(values: torch.Tensor | Sequence[float]) -> dict[str, float]:
    """{'mean', 'std'} with the population standard deviation (0 for one value), as `dag rewards --score`."""
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(t) else float("nan")}


def relative_drop(base: float | None, value: float | None) -> float | None:
    """(base − value) / |base|: how much a metric fell relative to the base; None when undefined."""
    if base is None or value is None or not math.isfinite(base) or not math.isfinite(value) or base == 0:
        return None
    return (base - value) / abs(base)


def fallen_metrics(base: dict, other: dict, threshold: float) -> list[tuple[str, float, float, float]]:
    """(metric, base value, value, relative drop) for each monitored metric that fell by >= threshold."""
    fallen = []
    for metric in MONITORED:
        drop = relative_drop(base.get(metric), other.get(metric))
        if drop is not None and drop >= threshold - 1e-12:  # tolerance: 0.5 -> 0.4 is a 20 % drop
            fallen.append((metric, base[metric], other[metric], drop))
    return fallen


def hacking_warnings(
    base: dict, other: dict, label: str, threshold: float = DEFAULT_HACK_THRESHOLD, prompt: str | None = None
) -> list[dict]:
    """Warnings for one checkpoint: a reward mean rose while a monitored metric fell by >= threshold.

    `base` and `other` are the `overall` blocks of two models in the report, or, with `prompt`, their
    blocks for that prompt.
    """
    fallen = fallen_metrics(base, other, threshold)
    where = "" if prompt is None else f" on prompt {prompt!r}"
    warnings = []
    for reward, stats in other.get("rewards", {}).items():
        base_mean = base.get("rewards", {}).get(reward, {}).get("mean")
        if base_mean is None or not stats["mean"] > base_mean:
            continue
        for metric, before, after, drop in fallen:
            warnings.append(
                {
                    "model": label,
                    "prompt": prompt,
                    "reward": reward,
                    "reward_base": base_mean,
                    "reward_value": stats["mean"],
                    "metric": metric,
                    "metric_base": before,
                    "metric_value": after,
                    "relative_drop": drop,
                    "message": (
                        f"possible reward hacking in {label}{where}: {reward} rose {base_mean:.4g} -> "
                        f"{stats['mean']:.4g} while {metric} fell {before:.4g} -> {after:.4g} "
                        f"({drop:.0%} >= {threshold:.0%})"
                    ),
                }
            )
    return warnings


def warning_lines(warnings: list[dict]) -> list[str]:
    """One terminal line per checkpoint and prompt (or overall): the rewards that rose and the metrics that fell
    (the report keeps one warning per reward and metric)."""
    groups: dict[tuple, dict] = {}
    for w in warnings:
        g = groups.setdefault((w["model"], w.get("prompt")), {"rewards": {}, "metrics": {}})
        g["rewards"][w["reward"]] = f"{w['reward']} {w['reward_base']:.4g} -> {w['reward_value']:.4g}"
        g["metrics"][w["metric"]] = (f"{w['metric']} {w['metric_base']:.4g} -> {w['metric_value']:.4g} "
                                     f"({w['relative_drop']:.0%})")
    lines = []
    for (model, prompt), g in groups.items():
        where = "" if prompt is None else f" on prompt {prompt!r}"
        lines.append(f"possible reward hacking in {model}{where}: {', '.join(g['rewards'].values())} rose while "
                     f"{', '.join(g['metrics'].values())} fell")
    return lines


def model_warnings(base: dict, other: dict, threshold: float = DEFAULT_HACK_THRESHOLD) -> list[dict]:
    """The monitor for one checkpoint against the base: over all prompts, then prompt by prompt.

    `base` and `other` are model entries of the report (`label`, `overall`, `per_prompt`). A prompt can
    collapse while the averages over all prompts hold, hence the per-prompt check.
    """
    warnings = hacking_warnings(base["overall"], other["overall"], other["label"], threshold)
    base_blocks = {p["prompt"]: p for p in base["per_prompt"]}
    for block in other["per_prompt"]:
        if block["prompt"] in base_blocks:
            warnings += hacking_warnings(
                base_blocks[block["prompt"]], block, other["label"], threshold, prompt=block["prompt"]
            )
    return warnings


# --- pixel judges (built-in models) -------------------------------------------------------------------


def model_judge(model: str | None):
    """The pixel judge a named model registers (`NamedModel.judge`), else None."""
    from dagcli.extensions import named_model

    named = named_model(model)
    return named.judge if named is not None else None


def shapes_judge():
    """The pixel judge of the shapes captions (`dagcli.extensions.judge`)."""
    from dagcli.extensions import judge

    return judge("shapes")


def uses_pixel_judges(model: str | None, prompts: Sequence[str]) -> bool:
    """Whether the pixel judges apply: a model with a pixel judge and at least one prompt that is its caption."""
    return model_judge(model) is not None and any(caption_wants(p) is not None for p in prompts)


def caption_wants(prompt: str):
    """The attributes a shapes caption names (`ParsedCaption`), or None when the prompt is not one."""
    parsed = shapes_judge().parse_caption(prompt)
    return parsed if parsed.colour is not None and parsed.shape is not None else None


def judge_images(images: Sequence) -> list[dict[str, str | None]]:
    """What each image's pixels show: {'colour', 'background', 'shape'} names (colour/shape None if blank)."""
    read = shapes_judge().read
    out = []
    for image in images:
        seen = read(np.asarray(image.convert("RGB")))
        out.append({a: getattr(seen, a) for a in PIXEL_ATTRIBUTES})
    return out


def pixel_matches(seen: dict[str, str | None], prompt: str) -> dict[str, bool | None]:
    """Per attribute, whether the pixels show what the prompt names; None where the prompt names nothing."""
    wants = caption_wants(prompt)
    if wants is None:
        return {a: None for a in PIXEL_ATTRIBUTES}
    return {a: None if getattr(wants, a) is None else seen[a] == getattr(wants, a) for a in PIXEL_ATTRIBUTES}


def pixel_shares(seen: Sequence[dict], prompts: Sequence[str]) -> dict[str, float | None]:
    """'pixel_<attribute>' -> share of the images whose pixels match their prompt (None: nothing to judge)."""
    matches = [pixel_matches(s, p) for s, p in zip(seen, prompts, strict=True)]
    out = {}
    for attribute, key in zip(PIXEL_ATTRIBUTES, PIXEL_METRICS, strict=True):
        judged = [m[attribute] for m in matches if m[attribute] is not None]
        out[key] = float(np.mean(judged)) if judged else None
    return out


# --- image sets ---------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """The images of one model (base, checkpoint, or a folder), one entry per image, in prompt order."""

    label: str
    prompts: list[str]
    images: list  # PIL images
    seeds: list[int | None]
    files: list[str]  # paths as written in the report (relative to the output folder when generated)
    source: dict = field(default_factory=dict)  # kind (base/checkpoint/folder), path, run_dir
    metadata: list[dict] = field(default_factory=list)  # per image, its prompt's .jsonl fields (empty: none)

    def tensor(self) -> torch.Tensor:
        """[N, 3, H, W] float32 in [0, 1]: exactly what was written to disk (uint8)."""
        from dagcli.rewards import images_from_pil

        return images_from_pil(self.images)

    def indices(self, prompt: str) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if p == prompt]


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint to evaluate: the LoRA folder, a label for the report, and its run directory if any."""

    folder: Path
    label: str
    run_dir: Path | None


def find_run_dir(given: Path, folder: Path) -> Path | None:
    """The training run a checkpoint came from (the folder holding `metrics.jsonl`), if there is one."""
    for candidate in (given, folder.parent.parent, folder.parent):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def checkpoint_refs(paths: Sequence[str]) -> list[CheckpointRef]:
    """Resolve `--ckpt` values (run dirs, checkpoint or LoRA folders) with unique labels."""
    from dagcli.checkpoint import resolve_checkpoint

    refs, seen = [], {"base"}
    for raw in paths:
        given = Path(raw).expanduser()
        folder = resolve_checkpoint(given)
        run_dir = find_run_dir(given, folder)
        label = f"{run_dir.name}@{folder.name}" if run_dir and run_dir != folder else folder.name
        base_label, k = label, 2
        while label in seen:
            label, k = f"{base_label}-{k}", k + 1
        seen.add(label)
        refs.append(CheckpointRef(folder, label, run_dir))
    return refs


def safe_label(label: str) -> str:
    """A folder name for a model label."""
    from dagcli.generate import slug

    return slug(label, limit=60)


def generate_sets(
    model, items, settings, checkpoints: Sequence[CheckpointRef], output: Path, reporter
) -> list[ImageSet]:
    """Generate the base model's images, then each checkpoint's with the same seeds, into output/images/."""
    from dagcli.checkpoint import attach_lora
    from dagcli.generate import generate, write_samples

    sets = []
    for ref in [None, *checkpoints]:
        label = "base" if ref is None else ref.label
        if ref is not None:
            attach_lora(model.pipe, ref.folder, model.name)
        reporter.info(f"generating {label}")
        generated = generate(model, items, settings, reporter)
        if ref is not None:
            model.pipe.unload_lora_weights()
        folder = output / "images" / safe_label(label)
        extra = {"model": model.name, **({"ckpt": str(ref.folder)} if ref else {})}
        write_samples(generated, settings, folder, extra)
        files = list(read_manifest(folder))  # file names in the order `generate` returned the images
        source = (
            {"kind": "base"}
            if ref is None
            else {
                "kind": "checkpoint",
                "path": str(ref.folder),
                "run_dir": str(ref.run_dir) if ref.run_dir else None,
            }
        )
        sets.append(
            ImageSet(
                label,
                [g.prompt for g in generated],
                [g.image for g in generated],
                [g.seed for g in generated],
                [str(Path("images") / folder.name / f) for f in files],
                source,
                [dict(g.metadata) for g in generated],
            )
        )
    return sets


def folder_model(directory: Path) -> str | None:
    """The model a folder of samples came from, as `dag sample` recorded it (None when unknown)."""
    return next((str(r["model"]) for r in read_manifest(directory).values() if r.get("model")), None)


def folder_set(directory: Path, label: str, prompt: str | None) -> ImageSet:
    """An image set from a folder, read as `dag rewards --score` reads it (`read_image_folder`); `prompt`
    is the prompt of images no samples.jsonl describes."""
    from dagcli.rewards.base import read_image_folder

    found = read_image_folder(directory, prompt or "")
    seeds = [r.get("seed") for r in found.records]
    source = {"kind": "folder", "path": str(directory)}
    metadata = [dict(r.get("metadata") or {}) for r in found.records]
    return ImageSet(label, found.prompts, found.images, seeds, [str(f) for f in found.files], source, metadata)


# --- scoring and embedding ----------------------------------------------------------------------------


def score_set(reward, image_set: ImageSet, batch_size: int) -> dict[str, torch.Tensor]:
    """Each reward component's scores [N] for a set (a spec `a,b` gives components a and b)."""
    from dagcli.rewards.scoring import score_images

    metadata = list(image_set.metadata) if any(image_set.metadata) else None
    out = score_images(reward, image_set.tensor(), list(image_set.prompts), batch_size, metadata)
    return {name: scores.double() for name, scores in out.components.items()}


def embed_images(encoder, images: torch.Tensor, batch_size: int = EMBED_BATCH) -> torch.Tensor:
    """[N, D] float64 CPU CLIP image embeddings (not normalised)."""
    parts = [
        encoder.embed_images(images[i : i + batch_size]).double().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts)


def lpips_diversity_fn():
    """A function images [N,3,H,W] -> mean pairwise LPIPS; None without the optional `lpips` package."""
    try:
        import lpips  # optional
    except ImportError:
        return None
    try:
        net = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception:  # its backbone weights may be unavailable offline
        return None

    @torch.no_grad()
    def measure(images: torch.Tensor) -> float:
        n = len(images)
        if n < 2:
            return float("nan")
        x = images * 2 - 1
        i, j = torch.triu_indices(n, n, offset=1)
        return float(net(x[i], x[j]).mean())

    return measure


# --- the report ---------------------------------------------------------------------------------------


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


# --- running an evaluation ----------------------------------------------------------------------------


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
    from dagcli.report import write_report

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
