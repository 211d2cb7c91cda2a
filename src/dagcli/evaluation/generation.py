"""Image sets: the images of the base model, each checkpoint or a folder, generated with the same prompts and
seeds so that differences come from the weights; their reward scores and image embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dagcli.generate import read_manifest

EMBED_BATCH = 32


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
    import dataclasses

    from dagcli.checkpoint import attach_lora, lora_steps_for
    from dagcli.generate import generate, write_samples

    sets = []
    for ref in [None, *checkpoints]:
        label = "base" if ref is None else ref.label
        if ref is not None:
            attach_lora(model.pipe, ref.folder, model.name)
        reporter.info(f"generating {label}")
        own = dataclasses.replace(settings, lora_steps=lora_steps_for(ref.folder if ref else None, settings.steps))
        generated = generate(model, items, own, reporter)
        if ref is not None:
            model.pipe.unload_lora_weights()
        folder = output / "images" / safe_label(label)
        extra = {"model": model.name, **({"ckpt": str(ref.folder)} if ref else {})}
        write_samples(generated, own, folder, extra)
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
