"""Scoring saved images: the engine behind `dag rewards --score DIR`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dagcli.rewards.base import Reward, RewardOutput, batches, read_image_folder
from dagcli.stopping import check_interrupt


@dataclass(frozen=True)
class ScoreSummary:
    """Mean and standard deviation of one component over a set of images."""

    name: str
    mean: float
    std: float  # population standard deviation (0 for one image)
    count: int


def score_images(
    reward: Reward, images: torch.Tensor, prompts: list[str], batch_size: int = 16,
    metadata: list[dict] | None = None,
) -> RewardOutput:
    """Run a reward over many images in batches and concatenate the outputs (info is dropped); `metadata` (one
    dict per image, e.g. from a .jsonl prompts file) is handed to the reward with its images."""
    outs = []
    for part in batches(len(images), batch_size):
        check_interrupt()
        outs.append(reward(images[part], prompts[part], None if metadata is None else metadata[part]))
    names = list(outs[0].components)
    return RewardOutput(
        scores=torch.cat([o.scores for o in outs]),
        components={n: torch.cat([o.components[n] for o in outs]) for n in names},
        info={},
    )


def summarize(output: RewardOutput) -> list[ScoreSummary]:
    """One summary per component, then one for the total when there are several components."""
    series = dict(output.components)
    if len(series) > 1 or not series:
        series["total"] = output.scores
    return [
        ScoreSummary(name, float(v.mean()), float(v.std(unbiased=False)), len(v)) for name, v in series.items()
    ]


def score_folder(reward: Reward, directory: str | Path, batch_size: int = 16) -> list[ScoreSummary]:
    """Summaries of a reward over the images of a folder (`read_image_folder`: those samples.jsonl lists)."""
    found = read_image_folder(directory)
    return summarize(score_images(reward, found.tensor(), found.prompts, batch_size, record_metadata(found.records)))


def record_metadata(records: list[dict]) -> list[dict] | None:
    """Each image's prompt metadata as `dag sample` recorded it in samples.jsonl (None when no image has any)."""
    found = [dict(r.get("metadata") or {}) for r in records]
    return found if any(found) else None
