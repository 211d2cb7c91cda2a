"""What a run says about itself: one line of `metrics.jsonl` per epoch (over all processes), the same scalars to
TensorBoard or Weights & Biases when asked, a console line, and sample grids to compare epochs by eye."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from dagcli.errors import DagError


def epoch_metrics(batch, train_logs: dict, timing: dict, state, dist) -> dict:
    """The epoch's numbers: counters, rewards over every process's trajectories, per-prompt means, the mean
    forward-looking reward, the training logs and timings."""
    rewards = dist.gather_floats(batch.rewards)
    m = {
        "epoch": state.epoch,
        "optimizer_steps": state.optimizer_steps,
        "trajectories_seen": state.trajectories_seen,
        **_stats("reward", rewards, extremes=True),
        "nonfinite_rewards": state.nonfinite_rewards,
    }
    for name, values in batch.components.items():
        m.update(_stats(f"reward/{name}", dist.gather_floats(values)))
    per_prompt: dict[str, list[float]] = defaultdict(list)
    for p, r in zip(dist.gather_strings(batch.traj.prompts), rewards.tolist(), strict=True):
        per_prompt[p].append(r)
    m["per_prompt_reward"] = {p: sum(v) / len(v) for p, v in sorted(per_prompt.items())}
    if batch.fl_rewards is not None:  # the states whose x̂0 was scored (the others are NaN)
        fl = batch.fl_rewards.flatten()
        fl = dist.gather_floats(fl[torch.isfinite(fl)])
        m["fl_reward_mean"] = float(fl.mean()) if fl.numel() else float("nan")
    m.update(train_logs)
    m.update(timing)
    return m


def _mean_std(v: torch.Tensor) -> tuple[float, float]:
    """Mean and sample std (NaN and 0 for no value, std 0 for one), in v's dtype: float32 keeps the bits the golden
    runs record. Only where that overflows on finite values (rewards near float32's range, 3e38) in float64."""
    mean = float(v.mean()) if v.numel() else float("nan")
    std = float(v.std()) if v.numel() > 1 else 0.0
    if v.numel() and not math.isfinite(mean + std) and bool(torch.isfinite(v).all()):
        return _mean_std(v.double())
    return mean, std


def _stats(name: str, v: torch.Tensor, extremes: bool = False) -> dict:
    mean, std = _mean_std(v)
    out = {f"{name}_mean": mean, f"{name}_std": std}
    if extremes:
        out[f"{name}_min"] = float(v.min()) if v.numel() else float("nan")
        out[f"{name}_max"] = float(v.max()) if v.numel() else float("nan")
    return out


class MetricsLog:
    """Writes each epoch's metrics (main process only): `metrics.jsonl`, a tracker, one console line."""

    def __init__(self, run_dir: Path, report_to: str, config: dict, reporter):
        self.run_dir, self.report_to, self.config, self.reporter = Path(run_dir), report_to, config, reporter
        self._tracker = None

    def keep_epochs(self, epochs: int) -> None:
        """Keep the lines of the first `epochs` epochs only (what the checkpoint training continues from holds):
        a resumed run drops the epochs of a process killed after its last checkpoint, a fresh run (0) starts
        the file anew, so the file has one line per epoch, 1 to the last."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                epoch = json.loads(line).get("epoch")
            except (json.JSONDecodeError, AttributeError):  # a line cut short by a kill
                continue
            if isinstance(epoch, int) and epoch <= epochs:
                kept.append(line + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)

    def log(self, metrics: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.track(metrics)
        beta = f"β {metrics['beta']:.3g}  " if "beta" in metrics else ""
        self.reporter.info(
            f"epoch {metrics['epoch']:>4}  reward {metrics['reward_mean']:+.4f} ± {metrics['reward_std']:.4f}  "
            f"loss {metrics.get('loss', float('nan')):.4g}  {beta}"
            f"trajectories {metrics['trajectories_seen']}  "
            f"({metrics['time_sampling']:.1f}s sample, {metrics['time_reward']:.1f}s reward, "
            f"{metrics['time_training']:.1f}s train)"
        )

    def track(self, metrics: dict) -> None:
        """Scalars to TensorBoard or Weights & Biases (`output.report_to`), opened on first use."""
        if self.report_to == "none":
            return
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}
        step = int(metrics["epoch"])
        if self._tracker is None:
            self._tracker = open_tracker(self.report_to, self.run_dir, self.config)
        if self.report_to == "tensorboard":
            for name, value in scalars.items():
                self._tracker.add_scalar(name, value, step)
            self._tracker.flush()
        else:
            self._tracker.log(scalars, step=step)


def open_tracker(kind: str, run_dir: Path, config: dict):
    """A TensorBoard SummaryWriter or a wandb run; a missing package is a one-line error with the fix."""
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        import wandb

        return wandb.init(project="dagcli", name=run_dir.name, dir=str(run_dir), config=config)
    except ImportError as e:
        raise DagError(f"output.report_to = {kind!r} needs the {kind} package: pip install 'dagcli[{kind}]'") from e


def write_sample_grid(model, denoiser, prompts: list[str], settings, height: int, width: int, path: Path) -> None:
    """A grid of samples from four of the run's prompts × four fixed seeds, so epochs can be compared by eye;
    each row is labelled with its prompt."""
    from dagcli.images import labelled_rows
    from dagcli.sampling import generators_for, sample_batch, to_pil

    chosen = sorted(set(prompts))[:4]
    rows = [p for p in chosen for _ in range(4)]
    denoiser.eval()
    with torch.no_grad():
        traj = sample_batch(model, rows, generators_for(range(len(rows))), steps=settings.steps,
                            guidance=settings.guidance, eta=settings.eta, denoiser=denoiser, height=height,
                            width=width)
    images = to_pil(traj.images)
    path.parent.mkdir(parents=True, exist_ok=True)
    by_prompt = [(p, images[4 * i : 4 * i + 4]) for i, p in enumerate(chosen)]
    labelled_rows(by_prompt, upscale=max(1, 96 // images[0].width), label_width=160).save(path)
