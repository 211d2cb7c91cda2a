"""Golden training runs: 2 epochs per algorithm on the built-in model, one thread, fixed seed.

`python tests/golden/runs.py [NAME ...]` (re)writes `tests/golden/golden.json` (only the named runs' entries);
`tests/test_golden.py` repeats the runs and requires every recorded number to be equal to the last bit. The runs go through the real `dag train`
entry point, so the test holds whatever the engine looks like inside.

Change the golden file only on purpose, in a commit of its own that says why the numbers moved.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN_FILE = HERE / "golden.json"

# Every key spelled out: a change of a default elsewhere must not move these runs.
BASE = {
    "model": {"name": "tiny", "device": "cpu", "dtype": "fp32"},
    "sampling": {"steps": 6, "eta": 1.0, "guidance": 3.0, "batch_size": 8, "batches_per_epoch": 1,
                 "prompts": "shapes"},
    "reward": {"spec": "compressibility"},
    "lora": {"rank": 4, "alpha": 4.0, "init": "gaussian"},
    "train": {"epochs": 2, "batch_size": 8, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
              "reduction": "mean", "timestep_fraction": 1.0, "seed": 0},
    "dag": {"flow_learning_rate": 1e-3, "beta": 50.0, "beta_ramp_epochs": 2, "flow_warmup_epochs": 0,
            "proximity": 1.0, "x0_source": "sampling", "x0_guidance": "cond", "clip_range": 1e-4, "adv_clip": 5.0},
    "output": {"checkpoint_every": 1, "keep_last": 2, "sample_every": 0},
}

RUNS = {
    "dag-db": {"train": {"algorithm": "dag-db"}},
    "dag-kl": {"train": {"algorithm": "dag-kl"}},
    "ddpo": {"train": {"algorithm": "ddpo"},
             "ddpo": {"clip_range": 1e-4, "adv_clip": 5.0, "buffer_size": 16, "min_count": 2}},
    # the other code paths of DAG-DB: subsampled transitions and x̂0 from the current, guided model
    "dag-db-subsampled": {"train": {"algorithm": "dag-db", "timestep_fraction": 0.5, "always_last_step": True},
                          "dag": {"x0_source": "current", "x0_guidance": "guided"}},
    # two groups of 4 per epoch; the KL to the base model (LoRA disabled) acts from the second optimiser step on
    "grpo": {"train": {"algorithm": "grpo"},
             "grpo": {"group_size": 4, "clip_range": 1e-4, "kl_weight": 0.04, "adv_clip": 5.0, "std_eps": 1e-4,
                      "std": "global"}},
}


def run_config(name: str) -> dict:
    config = json.loads(json.dumps(BASE))
    for section, keys in RUNS[name].items():
        config.setdefault(section, {}).update(keys)
    return config


def tensor_digest(path: Path) -> str:
    """sha256 over the sorted names and raw float32 bytes of a safetensors file's tensors."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].float().contiguous().numpy().tobytes())
    return h.hexdigest()


# What is compared: losses, rewards, log-probabilities, gradient norms and counters (not timings; metrics added
# later do not break the comparison).
RECORDED = ("loss", "db_loss", "policy_loss", "kl_loss", "proximity", "log_pf", "log_pb", "approx_kl", "flow",
            "grad_norm_lora", "grad_norm_flow", "reward_mean", "reward_std", "reward_min", "reward_max",
            "fl_reward_mean", "per_prompt_reward", "beta", "optimizer_steps", "trajectories_seen")


def _numbers(metrics: dict) -> dict:
    """The recorded metrics of one epoch."""
    return {k: metrics[k] for k in RECORDED if k in metrics}


def run_one(name: str, workdir: Path) -> dict:
    """Train one golden run through `dag train` (one thread) and return its numbers."""
    import tomli_w
    import torch

    from dagcli.cli import main

    config_file = workdir / f"{name}.toml"
    config_file.write_text(tomli_w.dumps(run_config(name)))
    out = workdir / name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["train", "--config", str(config_file), "--output", str(out)])
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"golden run {name} failed with exit code {e.code}") from e
    finally:
        torch.set_num_threads(threads)
    epochs = [_numbers(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = out / "checkpoints" / "step-000002"
    digests = {"lora": tensor_digest(step / "pytorch_lora_weights.safetensors")}
    if (step / "flow.safetensors").is_file():
        digests["flow"] = tensor_digest(step / "flow.safetensors")
    return {"epochs": epochs, "weights_sha256": digests}


def main(names: list[str]) -> None:
    golden = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or list(RUNS):
            golden[name] = run_one(name, Path(tmp))
            print(f"{name}: rewards {[e['reward_mean'] for e in golden[name]['epochs']]}, "
                  f"losses {[e.get('loss') for e in golden[name]['epochs']]}")
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_FILE}")


if __name__ == "__main__":
    main(sys.argv[1:])
