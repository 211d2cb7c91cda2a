"""Golden training runs: 2 epochs per algorithm on the built-in model, one thread, fixed seed.

`python tests/golden/runs.py [NAME ...]` (re)writes `tests/golden/golden.json` (only the named runs' entries):
each run's per-epoch metrics, a sha256 of its trained weights, per-tensor statistics of those weights (norm, sum,
a fixed random projection, in float64) and the platform it was recorded on (CPU, library versions, the kernel
dispatch). `tests/integration/test_golden.py` repeats the runs and compares them two ways:

- within `TOLERANCE` (always, on any machine): the relative deviation of every metric and weight statistic,
  tight while the run draws the recorded rewards and looser after the first epoch whose rewards moved; the
  tolerance is measured by `tests/golden/spread.py` over kernel variants that stand in for other CPUs
  (tests/golden/README.md);
- to the last bit, sha256 of the weights too, when the platform equals the recorded one.

The runs go through the real `dag train` entry point, so the test holds whatever the engine looks like inside.
Change the golden file only on purpose, in a commit of its own that says why the numbers moved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform as host
import sys
import tempfile
import zlib
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
    # relative DB: DAG-DB with the base model's step (LoRA disabled) in the place of P_B
    "dag-rdb": {"train": {"algorithm": "dag-rdb"}},
    # relative trajectory balance on the trajectories unit, both log Z choices, two groups of 4 per epoch
    "rtb": {"train": {"algorithm": "rtb"},
            "rtb": {"beta": 50.0, "log_z": "learned", "log_z_learning_rate": 1e-2, "group_size": 4}},
    "rtb-vargrad": {"train": {"algorithm": "rtb"},
                    "rtb": {"beta": 50.0, "log_z": "vargrad", "log_z_learning_rate": 1e-2, "group_size": 4}},
    # two groups of 4, sampled with the deterministic sampler and no guidance; the sampling policy lags from the
    # first refresh on
    "nft": {"train": {"algorithm": "nft"}, "sampling": {"eta": 0.0, "guidance": 1.0},
            "nft": {"group_size": 4, "strength": 1.0, "kl_weight": 1e-4, "adv_clip": 5.0, "std_eps": 1e-4,
                    "std": "global", "weight_floor": 1e-5, "old_decay_start": 0, "old_decay_rate": 0.001,
                    "old_decay_max": 0.5, "guidance": 1.0}},
}

# What is compared: losses, rewards, log-probabilities, gradient norms and counters (not timings; metrics added
# later do not break the comparison).
RECORDED = ("loss", "db_loss", "policy_loss", "kl_loss", "proximity", "log_pf", "log_pb", "approx_kl", "flow",
            "grad_norm_lora", "grad_norm_flow", "reward_mean", "reward_std", "reward_min", "reward_max",
            "fl_reward_mean", "per_prompt_reward", "beta", "optimizer_steps", "trajectories_seen", "log_ratio_base",
            "log_z", "rtb_residual_abs")

# Environment variables that choose the kernels of ATen, MKL and oneDNN: part of the platform when set.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE",
              "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE")

# The tolerance off the recording platform, measured by `spread.py` (tests/golden/README.md). A quantity agrees
# when |got - golden| <= rtol * max(|golden|, floor): the floors keep quantities near zero (PPO-style losses, the
# approximate KL) from counting their last bits as relative change. The rewards are JPEG sizes, whole bytes:
# another kernel either leaves every image's size as recorded or moves some by a byte or more, and then the run
# takes another path. So an epoch whose rewards (and those of the epochs before) agree within `same_rewards` is on
# the recorded path and must agree within `rtol`; after the first epoch whose rewards moved, within
# `rtol_diverged`. A run whose loss scores x̂0 during training (DAG with x0_source "current") does not record
# those rewards, so it is never known to be on the path. The final weights likewise (`weight_rtol` on the path),
# each tensor's statistics relative to its norm. Counters and β are exact everywhere.
TOLERANCE = {"rtol": 2.5e-4, "rtol_diverged": 0.25, "weight_rtol": 2.5e-4, "weight_rtol_diverged": 0.25,
             "same_rewards": 1e-6, "floor": {"approx_kl": 1e-4, "policy_loss": 1e-3, "loss": 1e-3,
                                                  # Σ_t (log P_θ − log P_base): 0 at a zero LoRA, a difference of
                                                  # per-step log-probs of about a nat each (reduction "mean")
                                                  "log_ratio_base": 1.0},
             "exact": ("beta", "optimizer_steps", "trajectories_seen")}
REWARDS = ("reward_mean", "reward_std", "reward_min", "reward_max", "fl_reward_mean", "per_prompt_reward")


def run_config(name: str) -> dict:
    config = json.loads(json.dumps(BASE))
    for section, keys in RUNS[name].items():
        config.setdefault(section, {}).update(keys)
    return config


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def tensor_digest(path: Path) -> str:
    """sha256 over the sorted names and raw float32 bytes of a safetensors file's tensors."""
    tensors = _tensors(path)
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _direction(name: str, size: int):
    """A fixed random unit vector for a tensor (numpy's generator, seeded by the tensor's name)."""
    import numpy as np

    u = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(size)
    return u / np.linalg.norm(u)


def tensor_stats(path: Path) -> dict[str, list[float]]:
    """Per tensor w, in float64: [|w|, sum(w) / sqrt(numel), u·w] (u a fixed random unit vector), its length and
    its projections on two unit vectors. Each moves by at most |Δw| when w does: comparable on other kernels."""
    import numpy as np

    stats = {}
    for key, tensor in sorted(_tensors(path).items()):
        w = tensor.double().flatten().numpy()
        stats[key] = [float(np.linalg.norm(w)), float(w.sum() / math.sqrt(w.size)), float(_direction(key, w.size) @ w)]
    return stats


def _cpu() -> str:
    """Vendor, model name, family and model of the first CPU (/proc/cpuinfo; the platform module elsewhere)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return f"{host.machine()} {host.processor()}".strip()
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return (f"{fields.get('vendor_id', '?')} {fields.get('model name', '?')} "
            f"(family {fields.get('cpu family', '?')} model {fields.get('model', '?')})")


def platform() -> dict:
    """What decides the kernels that compute a run: the CPU, the libraries, their dispatch and the threads."""
    import numpy
    import PIL
    import torch

    return {"cpu": _cpu(), "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn": torch.backends.mkldnn.enabled, "threads": torch.get_num_threads(), "numpy": numpy.__version__,
            "pillow": PIL.__version__, "python": host.python_version(),
            "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}


def _numbers(metrics: dict) -> dict:
    """The recorded metrics of one epoch."""
    return {k: metrics[k] for k in RECORDED if k in metrics}


def run_one(name: str, workdir: Path, threads: int = 1) -> dict:
    """Train one golden run through `dag train` on `threads` threads and return its numbers, weights and platform."""
    import tomli_w
    import torch

    from dagcli.cli import main

    config_file = workdir / f"{name}.toml"
    config_file.write_text(tomli_w.dumps(run_config(name)))
    out = workdir / name
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        main(["train", "--config", str(config_file), "--output", str(out)])
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"golden run {name} failed with exit code {e.code}") from e
    finally:
        where = platform()
        torch.set_num_threads(before)
    epochs = [_numbers(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = out / "checkpoints" / "step-000002"
    files = {"lora": step / "pytorch_lora_weights.safetensors", "flow": step / "flow.safetensors"}
    files = {part: path for part, path in files.items() if path.is_file()}
    return {"epochs": epochs, "weights_sha256": {part: tensor_digest(path) for part, path in files.items()},
            "weights": {part: tensor_stats(path) for part, path in files.items()}, "platform": where}


@contextlib.contextmanager
def beta_r_scaled(factor: float):
    """DAG's loss with β·r scaled by `factor` (the terminal β·r(x_T) and the forward-looking β·r(x̂0)), the
    logged β unchanged: a change of DAG's arithmetic that the golden comparison must catch."""
    from dagcli.algorithms.dag import Dag

    loss = Dag.loss

    def scaled(self, mb, policy, batch, epoch):
        settings = self.settings
        self.settings = dataclasses.replace(settings, beta=settings.beta * factor)
        try:
            return loss(self, mb, policy, batch, epoch)
        finally:
            self.settings = settings

    Dag.loss = scaled
    try:
        yield
    finally:
        Dag.loss = loss


def _values(value) -> list[tuple[str, float]]:
    """A metric as (suffix, number) pairs: one for a number, one per prompt for per-prompt rewards."""
    if isinstance(value, dict):
        return [(f"[{k!r}]", v) for k, v in sorted(value.items())]
    return [("", value)]


def metric_deviations(got: dict, want: dict) -> tuple[list[dict[str, float]], list[str]]:
    """Per epoch and metric the largest |got - golden| / max(|golden|, floor) (over prompts), and what is missing
    or has another shape (a missing metric, another epoch count, other prompts)."""
    floors = TOLERANCE["floor"]
    epochs: list[dict[str, float]] = []
    missing = []
    if len(got["epochs"]) != len(want["epochs"]):
        missing.append(f"{len(got['epochs'])} epochs, golden {len(want['epochs'])}")
    for epoch, (g, w) in enumerate(zip(got["epochs"], want["epochs"], strict=False), start=1):
        worst: dict[str, float] = {}
        for key, value in w.items():
            if key not in g:
                missing.append(f"epoch {epoch}: metric {key} is no longer recorded")
                continue
            pairs, got_pairs = _values(value), dict(_values(g[key]))
            if [s for s, _ in pairs] != sorted(got_pairs):
                missing.append(f"epoch {epoch}: {key} has entries {sorted(got_pairs)}, golden {[s for s, _ in pairs]}")
                continue
            worst[key] = max(abs(got_pairs[s] - x) / max(abs(x), floors.get(key, 0.0), 1e-300) for s, x in pairs)
        epochs.append(worst)
    return epochs, missing


def weight_deviations(got: dict, want: dict) -> tuple[dict[str, float], list[str]]:
    """Per weight file the largest deviation of a tensor's statistics (`tensor_stats`) relative to its norm."""
    worst: dict[str, float] = {}
    missing = []
    for part, tensors in want["weights"].items():
        mine = got["weights"].get(part, {})
        if sorted(mine) != sorted(tensors):
            missing.append(f"weights {part}: other tensors than the golden ones")
            continue
        worst[part] = max(max(abs(g - w) for g, w in zip(mine[key], stats, strict=True)) / max(stats[0], 1e-30)
                          for key, stats in tensors.items())
    return worst, missing


def rewards_recorded(name: str) -> bool:
    """Whether every reward that the run's loss uses is in its metrics: not when DAG scores x̂0 while training."""
    config = run_config(name)
    return not (config["train"].get("algorithm", "").startswith("dag") and config["dag"]["x0_source"] == "current")


def on_path(epochs: list[dict[str, float]]) -> int:
    """How many leading epochs drew the recorded rewards (every image's JPEG size as recorded)."""
    count = 0
    for worst in epochs:
        if any(worst.get(key, 0.0) > TOLERANCE["same_rewards"] for key in REWARDS):
            break
        count += 1
    return count


def deviations(name: str, got: dict, want: dict) -> dict:
    """How far a run is from the golden one: per epoch and metric, per weight file, the epochs known to be on the
    recorded path (`on_path`; none when the rewards are not all recorded, unless nothing deviates) and what is
    missing."""
    epochs, missing = metric_deviations(got, want)
    weights, missing_weights = weight_deviations(got, want)
    path = on_path(epochs)
    if not rewards_recorded(name) and any(any(w.values()) for w in epochs):
        path = 0
    return {"epochs": epochs, "weights": weights, "on_path": path, "missing": missing + missing_weights}


def _limit(key: str, path: bool, weight: bool = False) -> float:
    if key in TOLERANCE["exact"]:
        return 0.0
    return TOLERANCE[("weight_rtol" if weight else "rtol") + ("" if path else "_diverged")]


def tolerance_mismatches(name: str, got: dict, want: dict) -> list[str]:
    """What lies outside TOLERANCE (or is missing), one line each; empty when the run agrees."""
    found = deviations(name, got, want)
    lines = [f"{name}: {line}" for line in found["missing"]]
    for epoch, worst in enumerate(found["epochs"], start=1):
        path = epoch <= found["on_path"]
        lines += [f"{name} epoch {epoch}: {key} deviates by {dev:.3g}, tolerance {_limit(key, path):g}"
                  f"{'' if path else ' (after the rewards moved)'}"
                  for key, dev in sorted(worst.items()) if dev > _limit(key, path)]
    path = found["on_path"] == len(want["epochs"])
    lines += [f"{name}: {part} weights deviate by {dev:.3g}, tolerance {_limit(part, path, weight=True):g}"
              for part, dev in sorted(found["weights"].items()) if dev > _limit(part, path, weight=True)]
    return lines


def exact_mismatches(name: str, got: dict, want: dict) -> list[str]:
    """Every metric and weight digest that is not equal to the last bit, one line each."""
    lines = []
    for epoch, (g, w) in enumerate(zip(got["epochs"], want["epochs"], strict=False), start=1):
        lines += [f"{name} epoch {epoch}: {key} = {g.get(key)!r}, golden {value!r}"
                  for key, value in w.items() if g.get(key) != value]
    if got["weights_sha256"] != want["weights_sha256"]:
        lines.append(f"{name}: trained weights differ (sha256)")
    return lines


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
