"""The hacking monitor: a reward that rises while a monitored metric (diversity, fidelity, pixel shares) falls
by more than a threshold is reported as a warning, per prompt and overall.
"""

from __future__ import annotations

import math

DEFAULT_HACK_THRESHOLD = 0.2  # relative drop of a monitored metric that, with a reward gain, raises a warning
# Metrics whose fall, while a reward rises, the hacking monitor reports (overall and per prompt). The pixel shape
# share is reported, not monitored.
MONITORED = ("diversity", "lpips_diversity", "fidelity", "pixel_colour", "pixel_background")


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
