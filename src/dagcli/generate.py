"""Generate images for prompts and write them out: the engine of `dag sample` (and of `dag eval`).

Image j of prompt i always gets seed `seed + i * num_per_prompt + j` and its own generator, so an image
depends only on its prompt and seed, not on the batch it falls in (up to float rounding).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dagcli.images import make_grid
from dagcli.jsonl import json_lines
from dagcli.progress import NullReporter, Reporter
from dagcli.prompts import PromptItem
from dagcli.sampling import generators_for, sample_batch, to_pil


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 50  # sampler steps
    guidance: float = 5.0  # classifier-free guidance weight w
    eta: float = 1.0  # DDIM η: 0 deterministic, 1 DDPM-like (what training samples with)
    height: int | None = None  # pixels; None: the model's native resolution
    width: int | None = None
    batch_size: int = 8  # images per sampler call
    num_per_prompt: int = 4
    seed: int = 0
    lora_steps: int | None = None  # the leading steps the LoRA samples, the base model the rest; None: every step


@dataclass
class GeneratedImage:
    prompt: str
    seed: int
    image: object  # PIL.Image
    metadata: dict


def plan(prompts: list[PromptItem], settings: SampleSettings) -> list[tuple[PromptItem, int]]:
    """(prompt, seed) for every image to generate, in output order."""
    n = settings.num_per_prompt
    return [(item, settings.seed + i * n + j) for i, item in enumerate(prompts) for j in range(n)]


@torch.no_grad()
def generate(
    model, prompts: list[PromptItem], settings: SampleSettings, reporter: Reporter | None = None
) -> list[GeneratedImage]:
    """Sample every (prompt, seed) of `plan` with the model (with whatever LoRA is attached to it)."""
    reporter = reporter or NullReporter()
    jobs = plan(prompts, settings)
    model.family.warn_truncated([item.prompt for item in prompts], reporter.warn)
    out: list[GeneratedImage] = []
    with reporter.task("sampling", total=len(jobs)) as advance:
        for start in range(0, len(jobs), settings.batch_size):
            batch = jobs[start : start + settings.batch_size]
            traj = sample_batch(
                model,
                [item.prompt for item, _ in batch],
                generators_for([seed for _, seed in batch]),
                steps=settings.steps,
                guidance=settings.guidance,
                eta=settings.eta,
                height=settings.height,
                width=settings.width,
                lora_steps=settings.lora_steps,
            )
            for (item, seed), img in zip(batch, to_pil(traj.images), strict=True):
                out.append(GeneratedImage(item.prompt, seed, img, dict(item.metadata)))
            advance(len(batch))
    return out


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of a prompt."""
    s = re.sub(r"[^a-zA-Z0-9]+", "-", text.lower()).strip("-")
    return (s[:limit].rstrip("-")) or "prompt"


def write_samples(images: list[GeneratedImage], settings: SampleSettings, output: Path, extra: dict | None = None) -> Path:
    """One PNG per image, a grid PNG per prompt, and `samples.jsonl` (prompt, seed, file, settings)."""
    output.mkdir(parents=True, exist_ok=True)
    by_prompt: dict[str, list[GeneratedImage]] = {}
    for g in images:
        by_prompt.setdefault(g.prompt, []).append(g)
    records = []
    for p_index, (prompt, group) in enumerate(by_prompt.items()):
        stem = f"{p_index:03d}-{slug(prompt)}"
        for g in group:
            name = f"{stem}-s{g.seed}.png"
            g.image.save(output / name)
            record = {"prompt": prompt, "seed": g.seed, "file": name, "settings": asdict(settings), **(extra or {})}
            if g.metadata:
                record["metadata"] = g.metadata
            records.append(record)
        upscale = max(1, 128 // group[0].image.width)
        make_grid([g.image for g in group], upscale=upscale, label=prompt).save(output / f"grid-{stem}.png")
    manifest = output / "samples.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def read_manifest(directory: Path) -> dict[str, dict]:
    """file name -> record of a folder's `samples.jsonl`, in file order (empty when there is none)."""
    records: dict[str, dict] = {}
    manifest = Path(directory) / "samples.jsonl"
    if not manifest.is_file():
        return records
    text = manifest.read_text(encoding="utf-8")
    for _, record in json_lines(text, lambda n, why: f"{manifest}: line {n} is not JSON ({why})"):
        if isinstance(record, dict) and "file" in record:
            records[Path(str(record["file"])).name] = record
    return records
