"""The evaluation report as types: a `Report` holds one `ModelReport` per model (base first), each with its
overall numbers (`Overall`) and one `PromptReport` per prompt; a reward's numbers are a `RewardStats`.

`to_dict()` gives exactly the dictionary written to report.json (same keys, same order) and `from_dict()` reads
it back, so the renderers read attributes while the file keeps its format (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dagcli.evaluation.judges import PIXEL_METRICS

# the metrics a model block carries beside its rewards, in report.json's order after "rewards"
PROMPT_METRICS = ("diversity", "fidelity", *PIXEL_METRICS, "drift", "lpips_diversity")
OVERALL_METRICS = ("diversity", "lpips_diversity", "fidelity", *PIXEL_METRICS, "drift", "drift_pooled")


@dataclass(frozen=True)
class RewardStats:
    """One reward over a set of images."""

    mean: float  # mean score
    std: float  # population standard deviation (NaN for no image)
    scores: tuple[float, ...] | None = None  # every image's score (per prompt only; None overall)

    def to_dict(self) -> dict:
        out = {"mean": self.mean, "std": self.std}
        return out if self.scores is None else {**out, "scores": list(self.scores)}

    @classmethod
    def from_dict(cls, d: dict) -> RewardStats:
        scores = d.get("scores")
        return cls(d["mean"], d["std"], None if scores is None else tuple(scores))


def _rewards(d: dict) -> dict[str, RewardStats]:
    return {name: RewardStats.from_dict(stats) for name, stats in d.items()}


@dataclass(frozen=True)
class PromptReport:
    """One model's numbers on one prompt."""

    prompt: str  # the prompt's text
    seeds: tuple  # the seed of each image (None for a folder image without one)
    files: tuple[str, ...]  # each image's path as the report writes it
    metadata: dict | None  # the prompt's .jsonl fields (None: none)
    rewards: dict[str, RewardStats]  # reward name -> its numbers on this prompt's images
    metrics: dict[str, float | None]  # PROMPT_METRICS name -> value (None: not measured)
    pixels: tuple[dict, ...] | None = None  # per image what its pixels show (None: no pixel judge)

    def metric(self, key: str) -> float | None:
        return self.metrics.get(key)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "seeds": list(self.seeds), "files": list(self.files),
                "metadata": self.metadata, "rewards": {k: v.to_dict() for k, v in self.rewards.items()},
                **{k: self.metrics.get(k) for k in PROMPT_METRICS},
                "pixels": None if self.pixels is None else list(self.pixels)}

    @classmethod
    def from_dict(cls, d: dict) -> PromptReport:
        pixels = d.get("pixels")
        return cls(d["prompt"], tuple(d.get("seeds", ())), tuple(d.get("files", ())), d.get("metadata"),
                   _rewards(d.get("rewards", {})), {k: d.get(k) for k in PROMPT_METRICS},
                   None if pixels is None else tuple(pixels))


@dataclass(frozen=True)
class Overall:
    """One model's numbers over all prompts."""

    images: int  # how many images
    rewards: dict[str, RewardStats]  # reward name -> its numbers over all images
    metrics: dict[str, float | None]  # OVERALL_METRICS name -> value (None: not measured)

    def metric(self, key: str) -> float | None:
        return self.metrics.get(key)

    def to_dict(self) -> dict:
        return {"images": self.images, "rewards": {k: v.to_dict() for k, v in self.rewards.items()},
                **{k: self.metrics.get(k) for k in OVERALL_METRICS}}

    @classmethod
    def from_dict(cls, d: dict) -> Overall:
        return cls(d.get("images", 0), _rewards(d.get("rewards", {})), {k: d.get(k) for k in OVERALL_METRICS})


@dataclass(frozen=True)
class ModelReport:
    """One model (base, checkpoint or folder) of the comparison."""

    label: str  # its name in the tables
    source: dict  # kind (base / checkpoint / folder), path, run_dir
    overall: Overall  # over all prompts
    per_prompt: tuple[PromptReport, ...]  # one per prompt it has images of, in the report's prompt order

    def prompt(self, prompt: str) -> PromptReport | None:
        """Its block for `prompt`, or None when it has no image of it."""
        return next((p for p in self.per_prompt if p.prompt == prompt), None)

    def to_dict(self) -> dict:
        return {"label": self.label, "source": self.source, "overall": self.overall.to_dict(),
                "per_prompt": [p.to_dict() for p in self.per_prompt]}

    @classmethod
    def from_dict(cls, d: dict) -> ModelReport:
        return cls(d["label"], d.get("source") or {}, Overall.from_dict(d["overall"]),
                   tuple(PromptReport.from_dict(p) for p in d.get("per_prompt", ())))


@dataclass(frozen=True)
class MonitorWarning:
    """One finding of the hacking monitor."""

    model: str  # the model's label
    metric: str  # the metric that fell
    message: str  # the sentence shown
    prompt: str | None = None  # the prompt it fell on (None: overall)
    fields: dict = field(default_factory=dict)  # the finding as report.json holds it (every key)

    def to_dict(self) -> dict:
        return dict(self.fields)

    @classmethod
    def from_dict(cls, d: dict) -> MonitorWarning:
        return cls(d["model"], d["metric"], d["message"], d.get("prompt"), dict(d))


@dataclass(frozen=True)
class Report:
    """A whole evaluation: what report.json holds."""

    version: int  # the format's version (`report.REPORT_VERSION`)
    settings: dict  # sampling and scoring settings, hack_threshold, ridge
    pixel_judges: tuple[str, ...]  # the attributes the pixel judges read (empty: none)
    prompts: tuple[str, ...]  # every prompt, in order of first appearance
    rewards: tuple[str, ...]  # every reward component
    models: tuple[ModelReport, ...]  # base first
    warnings: tuple[MonitorWarning, ...]  # the hacking monitor's findings

    def to_dict(self) -> dict:
        return {"version": self.version, "settings": self.settings, "pixel_judges": list(self.pixel_judges),
                "prompts": list(self.prompts), "rewards": list(self.rewards),
                "models": [m.to_dict() for m in self.models], "warnings": [w.to_dict() for w in self.warnings]}

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        return cls(d.get("version", 0), d.get("settings", {}), tuple(d.get("pixel_judges", ())),
                   tuple(d.get("prompts", ())), tuple(d.get("rewards", ())),
                   tuple(ModelReport.from_dict(m) for m in d.get("models", ())),
                   tuple(MonitorWarning.from_dict(w) for w in d.get("warnings", ())))


def as_report(report: Report | dict) -> Report:
    """A `Report`, from itself or from its report.json dictionary."""
    return report if isinstance(report, Report) else Report.from_dict(report)
