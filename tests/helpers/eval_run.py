"""A training run folder with a LoRA checkpoint and metrics, built without training, for the eval tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora_run(run_dir: Path, pipeline_dir: Path | str, seed: int = 0, scale: float = 0.5) -> Path:
    """Write `run_dir/checkpoints/step-000002/` (a random non-zero LoRA + meta.json) and `metrics.jsonl`.

    `pipeline_dir` is a pipeline folder or a built-in model name ('tiny'); meta.json names it as the base.
    """
    from peft import LoraConfig

    from dagcli.checkpoint import write_lora
    from dagcli.models import load_model

    loaded = load_model(str(pipeline_dir), device="cpu")
    unet = loaded.pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    folder = run_dir / "checkpoints" / "step-000002"
    folder.mkdir(parents=True)
    write_lora(folder, loaded.family, unet, 4, 4.0, TARGETS)
    meta = {"base_model": str(pipeline_dir), "lora": {"rank": 4, "alpha": 4.0, "target_modules": TARGETS}}
    (folder / "meta.json").write_text(json.dumps(meta))
    rows = [
        {"epoch": e, "trajectories_seen": 3 * e, "reward_mean": -1.0 + 0.1 * e, "loss": 1.0 / e}
        for e in (1, 2)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir
