"""DAG-DB, DAG-KL, DAG-RDB, RTB, GRPO, DDPO and NFT on the same model, reward, prompts and sampling budget, over
several seeds.

    python benchmarks/compare_algorithms.py --quick                 # the modes reward, 6 epochs: < 10 min on 2 cores
    python benchmarks/compare_algorithms.py --quick --reward compressibility
    python benchmarks/compare_algorithms.py                         # compressibility and modes, 16 epochs, 3 seeds
    python benchmarks/compare_algorithms.py --reward clip --algo-set grpo:train.learning_rate=3e-3
    python benchmarks/compare_algorithms.py --model tiny-flow       # another built-in model (its own algorithm set)
    python benchmarks/compare_algorithms.py --reward modes-exact    # DAG-DB, DAG-RDB, RTB (learned, VarGrad) vs p*

For every (reward, algorithm, seed) it trains in a worker process (`--jobs` at a time, one thread each on a
2-core machine) and records the reward of each epoch against the trajectories seen so far. Before training,
every `--eval-every` epochs and at the end it samples fixed held-out seeds for the training prompts and
measures reward, diversity (mean pairwise cosine distance of CLIP image embeddings within a prompt) and
prompt fidelity (the image's best-matching caption among the prompts is its own), with `dag eval`'s metrics,
so diversity can be compared at equal reward. With the `modes` reward (`background-modes`: black or white
backgrounds rewarded, prompts that name none) it also counts each background's share of the evaluation samples
and compares them with the GFlowNet target, computed from the base model's own shares (`--base-samples` per
prompt, cached in `benchmarks/results/modes-base-<model>.json`; see `dagcli.modes`): total-variation distance and
rewarded modes kept. `modes-exact` runs the exact-target presets (`examples/configs/<model>-modes-exact-target.toml`:
β_eff = ln 4, a target strictly between the base model and "always rewarded") and reads every evaluation against
that exact target p* of each run's own β (`dagcli.modes.target_report`): TV to p*, the reward gap to E_{p*}[r], the
split among the rewarded backgrounds, and for rtb with a learned log Z the learned log Z per prompt against the
true one; its last evaluation takes 200 samples per prompt. The reference level is the final reward of
`--reference` (GRPO by default). Writes
`benchmarks/results/compare-<reward>[-<model>][-quick][-NAME].json`, a PNG plot beside it, and prints a summary
table."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dagcli import modes  # noqa: E402
from dagcli.config import load_config, replace  # noqa: E402
from dagcli.evaluation import default_embed_model, fidelity, pairwise_cosine_distance  # noqa: E402
from dagcli.rewards.clip import load_clip  # noqa: E402
from dagcli.rewards.modes import image_backgrounds  # noqa: E402
from dagcli.sampling import generators_for, sample_batch  # noqa: E402

ALGORITHMS = ("dag-db", "dag-kl", "dag-rdb", "rtb", "rtb-vargrad", "grpo", "ddpo", "nft")
VARIANTS = {"rtb-vargrad": ("rtb", ['rtb.log_z="vargrad"'])}  # a label -> (train.algorithm, the overrides it adds)
MODEL_ALGORITHMS = {"tiny": ("dag-db", "grpo", "ddpo"), "tiny-flow": ("dag-db", "dag-kl", "grpo", "ddpo")}
REWARD_ALGORITHMS = {"modes-exact": ("dag-db", "dag-rdb", "rtb", "rtb-vargrad")}  # before the model's set
REFERENCES = ("grpo", "ddpo")  # the level is the final reward of the first of these that ran (or --reference)
QUICK_EPOCHS = 6
PRESETS = {"compressibility": "examples/demo-compressibility.toml", "clip": "examples/demo-clip.toml",
           "modes": "examples/demo-modes.toml", "modes-exact": "examples/configs/tiny-modes-exact-target.toml"}
MODEL_PRESETS = {"tiny-flow": {"compressibility": "examples/demo-flow-compressibility.toml",
                               "modes": "examples/demo-flow-modes.toml",
                               "modes-exact": "examples/configs/tiny-flow-modes-exact-target.toml"}}  # its sampler
MODE_REWARDS = ("modes", "modes-exact")  # background-modes: shares against the target (modes-exact: β_eff = ln 4)
EVAL_PER_PROMPT = {"modes": 48, "modes-exact": 48}  # shares need more samples per prompt than a mean reward (8)
# the last evaluation of modes-exact: TV of n samples drawn from p* itself is ≈ 0.1 at n = 48, ≈ 0.05 at 200
FINAL_EVAL_PER_PROMPT = {"modes-exact": 200}
BASE_SAMPLES = 2000  # base-model samples per prompt behind the target shares
BASE_CACHE = ROOT / "benchmarks" / "results"  # where the base model's shares are kept (modes-base-<model>.json)
COLOURS = {"dag-db": "tab:blue", "dag-kl": "tab:green", "dag-rdb": "tab:cyan", "rtb": "tab:brown",
           "rtb-vargrad": "tab:pink", "grpo": "tab:orange", "ddpo": "tab:red", "nft": "tab:purple",
           "base": "tab:gray", "target": "black"}


def run_one(preset: Path, algorithm: str, seed: int, epochs: int, out_dir: Path, eval_per_prompt: int,
            overrides: list[str], eval_every: int = 0, threads: int | None = None,
            mode_targets: dict | None = None, final_eval_per_prompt: int | None = None) -> dict:
    """Train one configuration, evaluating it every `eval_every` epochs (and before training and at the end, there
    with `final_eval_per_prompt` samples per prompt if given); returns its reward curve, its evaluation points and
    the final metrics. `algorithm` is a name of `ALGORITHMS` (a `VARIANTS` label adds its overrides).
    `mode_targets` ({"targets": prompt -> target shares, "rewarded": backgrounds}, and for the exact target "base",
    "values", "beta_eff", "log_z_scale": `exact_targets`) adds the mode metrics to every evaluation."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train_and_evaluate(preset, algorithm, seed, epochs, out_dir, eval_per_prompt, overrides, eval_every,
                                   mode_targets, final_eval_per_prompt or eval_per_prompt)
    finally:
        torch.set_num_threads(before)  # an in-process caller keeps its own thread count


def run_config(preset: Path, algorithm: str, seed: int, epochs: int, overrides: list[str]):
    """The configuration of one run: `algorithm` (a `VARIANTS` label: its algorithm and overrides) on the preset."""
    name, extra = VARIANTS.get(algorithm, (algorithm, []))
    return load_config(preset, [f"train.algorithm=\"{name}\"", f"train.seed={seed}", f"train.epochs={epochs}",
                                "output.checkpoint_every=100000", "output.checkpoint_minutes=0",
                                "output.sample_every=0", *extra, *overrides])


def _train_and_evaluate(preset: Path, algorithm: str, seed: int, epochs: int, out_dir: Path, eval_per_prompt: int,
                        overrides: list[str], eval_every: int, mode_targets: dict | None,
                        final_per_prompt: int) -> dict:
    from dagcli import api

    cfg = run_config(preset, algorithm, seed, epochs, overrides)
    cfg = replace(cfg, "output", dir=str(out_dir / f"{algorithm}-s{seed}"))
    if algorithm == "dag-kl" and cfg.train.batch_size < 2:
        cfg = replace(cfg, "train", batch_size=2)
    plan = api.plan_config(cfg)
    prompts_eval = sorted(set(plan.prompts))
    trainer = api.build_trainer(plan)
    embedder = load_clip(default_embed_model(trainer.model.name), device=trainer.model.device)  # once per run

    def evaluation(epoch: int, per_prompt: int = eval_per_prompt) -> dict:
        return {"epoch": epoch, "trajectories": trainer.state.trajectories_seen, "per_prompt": per_prompt,
                **evaluate(trainer, embedder, prompts_eval, per_prompt, seed, mode_targets),
                **learned_log_z(trainer, mode_targets)}

    stops = sorted({*range(eval_every, epochs, eval_every), epochs}) if eval_every else [epochs]
    points = [evaluation(0)] if eval_every else []
    seconds = 0.0
    for stop in stops:
        t0 = time.perf_counter()
        trainer.train(until_epoch=stop)
        seconds += time.perf_counter() - t0
        if trainer.state.epoch < stop:  # stopped by a signal: later points would score the same checkpoint again
            raise SystemExit(f"{algorithm} (seed {seed}) stopped at epoch {trainer.state.epoch} of {epochs} (a "
                             f"signal); no result is written for a run that did not finish")
        points.append(evaluation(stop, final_per_prompt if stop == epochs else eval_per_prompt))
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [{"trajectories": m["trajectories_seen"], "reward": m["reward_mean"],
              **{k: m[k] for k in CURVE_LOGS if k in m}} for m in lines]
    return {"algorithm": algorithm, "seed": seed, "overrides": overrides, "curve": curve, "evals": points,
            "train_seconds": seconds, **points[-1]}


CURVE_LOGS = ("log_ratio_base", "log_z", "rtb_residual_abs", "db_loss")  # kept per epoch beside the reward


def learned_log_z(trainer, mode_targets: dict | None) -> dict:
    """For rtb with a learned log Z: the table's value per prompt in nats of a whole trajectory (`log_z_scale`:
    D under reduction "mean", where every log-prob, hence the residual's log Z, is divided by D), beside the exact
    log Z of the target and the mean |learned − true| over prompts. Empty for any other run."""
    table = getattr(trainer.algorithm, "table", None)
    if table is None or mode_targets is None or "log_z_scale" not in mode_targets:
        return {}
    scale = mode_targets["log_z_scale"]
    learned = {p: float(v) * scale for p, v in zip(table.prompts, table.log_z.detach().cpu(), strict=True)}
    true = {p: modes.log_partition(mode_targets["base"][p], mode_targets["values"], mode_targets["beta_eff"])
            for p in learned}
    return {"log_z_learned": learned, "log_z_true": true,
            "log_z_error": sum(abs(learned[p] - true[p]) for p in learned) / len(learned)}


@contextlib.contextmanager
def workers_stop_with_us(pool: ProcessPoolExecutor):
    """A SIGTERM to this process ends the pool's workers too: without that they would go on training, orphaned, to
    the end of their runs, and skew any timing measured beside them. They are killed, and the runs not yet started
    fail with them: a comparison writes nothing for a run it did not finish. (Ctrl-C reaches the workers by itself.)"""

    def stop(signum, frame):  # the pool then finds its workers gone and fails the runs left (BrokenProcessPool)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        print("compare_algorithms: stopped by SIGTERM, and so were its runs; nothing written", file=sys.stderr,
              flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_task(task: dict) -> dict:
    """Process-pool entry point: one run, its configuration passed as keyword arguments."""
    return run_one(**task)


@torch.no_grad()
def evaluate(trainer, encoder, prompts: list[str], per_prompt: int, seed: int,
             mode_targets: dict | None = None) -> dict:
    """Reward, diversity and fidelity of fresh samples (seeds disjoint from training) of the trained LoRA, and with
    `mode_targets` the backgrounds' shares against them (`mode_metrics`); `encoder` embeds images and prompts (a
    `dagcli.rewards.clip.ClipEncoder`)."""
    c = trainer.config
    denoiser = trainer.raw_denoiser
    denoiser.eval()
    rows = [p for p in prompts for _ in range(per_prompt)]
    seeds = [10_000_000 + 1000 * seed + i for i in range(len(rows))]
    images, rewards = [], []
    for i in range(0, len(rows), c.sampling.batch_size):
        traj = sample_batch(trainer.model, rows[i : i + c.sampling.batch_size],
                            generators_for(seeds[i : i + c.sampling.batch_size]), steps=c.sampling.steps,
                            guidance=c.sampling.guidance, eta=c.sampling.eta, denoiser=denoiser,
                            height=trainer.resolution, width=trainer.resolution,
                            lora_steps=trainer.rollout.lora_steps)
        images.append(traj.images)
        rewards.append(trainer.rollout.score(traj.images, traj.prompts)[0])
    images_t, rewards_t = torch.cat(images), torch.cat(rewards)
    emb = encoder.embed_images(images_t).double().cpu()
    text = encoder.embed_texts(prompts).double().cpu()
    targets = [prompts.index(p) for p in rows]
    diversity = [pairwise_cosine_distance(emb[j * per_prompt : (j + 1) * per_prompt]) for j in range(len(prompts))]
    out = {
        "eval_reward": float(rewards_t.mean()),
        "eval_reward_std": float(rewards_t.std()),
        "diversity": float(sum(diversity) / len(diversity)),
        "fidelity": fidelity(emb, text, targets) if len(prompts) > 1 else None,
    }
    return out if mode_targets is None else {**out, **mode_metrics(images_t, rows, mode_targets)}


def mode_metrics(images: torch.Tensor, rows: list[str], mode_targets: dict) -> dict:
    """Background shares of the images (one prompt per row), their TV distance to the target shares and the
    rewarded modes kept, averaged (TV, shares) or summed (modes) over prompts; see `dagcli.modes`."""
    labels: dict[str, list[str]] = {}
    for prompt, background in zip(rows, image_backgrounds(images), strict=True):
        labels.setdefault(prompt, []).append(background)
    report = modes.mode_report(labels, mode_targets["targets"], mode_targets["rewarded"])
    out = {"tv": report["tv"], "split_tv": report["split_tv"], "modes_kept": report["modes_kept"],
           "modes_possible": report["modes_possible"], "shares": report["shares"],
           "per_prompt_shares": {p: r["shares"] for p, r in report["per_prompt"].items()}}
    return out if "base" not in mode_targets else {**out, **exact_metrics(out["per_prompt_shares"], mode_targets)}


def exact_metrics(shares: dict[str, dict[str, float]], mode_targets: dict) -> dict:
    """A run's shares (prompt -> shares) against the exact target (`modes.target_report`): TV to p*, the reward
    gap E_run[r] − E_{p*}[r] and the split among the rewarded backgrounds beside the target's, per prompt and
    averaged over prompts."""
    report = modes.target_report(shares, mode_targets["base"], mode_targets["values"], mode_targets["beta_eff"],
                                 mode_targets["rewarded"])
    return {"tv_exact": report["tv"], "reward_gap": report["reward_gap"], "split": report["split"],
            "target_split": report["target_split"],
            "per_prompt_exact": {p: {k: r[k] for k in ("tv", "reward_gap", "split", "target_split", "log_z",
                                                       "expected_reward")}
                                 for p, r in report["per_prompt"].items()}}


SMOOTH = 3  # epochs: the final reward and the reward curve used for "trajectories to reach" are 3-epoch means


def smoothed(curve: list[dict], window: int = SMOOTH) -> list[dict]:
    """The curve with each reward replaced by the mean of the last `window` epochs' rewards (fewer at the start)."""
    out = []
    for i, point in enumerate(curve):
        tail = curve[max(0, i - window + 1) : i + 1]
        out.append({**point, "reward": sum(p["reward"] for p in tail) / len(tail)})
    return out


def trajectories_to_reach(curve: list[dict], level: float) -> int | None:
    """Trajectories seen when the `SMOOTH`-epoch mean reward first reaches `level` (None if never): the same
    smoothing as the final reward, so one lucky epoch of 32 trajectories does not count as reaching it."""
    for point in smoothed(curve):
        if point["reward"] >= level:
            return point["trajectories"]
    return None


def value_at(evals: list[dict], level: float, key: str = "diversity") -> float | None:
    """`key` (diversity, TV distance, ...) where the evaluation reward first reaches `level`, interpolated linearly
    between the two evaluation points around it (None if it never does)."""
    for a, b in zip(evals, evals[1:], strict=False):
        if a["eval_reward"] >= level:
            return a[key]
        if b["eval_reward"] >= level:
            w = (level - a["eval_reward"]) / (b["eval_reward"] - a["eval_reward"])
            return a[key] + w * (b[key] - a[key])
    return None


def diversity_at(evals: list[dict], level: float) -> float | None:
    """Diversity where the evaluation reward first reaches `level` (see `value_at`)."""
    return value_at(evals, level, "diversity")


def mean_std(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(vals) > 1 else 0.0, "n": len(vals)}


def final_reward(run: dict) -> float:
    """The run's mean training reward over its last `SMOOTH` epochs."""
    return smoothed(run["curve"])[-1]["reward"]


def pick_reference(runs: list[dict], reference: str | None = None) -> str | None:
    """The algorithm whose final reward is the level: `reference` if it ran, else the first of `REFERENCES`."""
    ran = {r["algorithm"] for r in runs}
    for name in ([reference] if reference else []) + list(REFERENCES):
        if name in ran:
            return name
    return None


def summarize(runs: list[dict], reference: str | None = None) -> dict:
    """Per algorithm, mean ± std over seeds; the reward level is the reference's final mean reward (last 3 epochs)
    and its final evaluation reward (see `pick_reference`)."""
    ref = pick_reference(runs, reference)
    mine_ref = [r for r in runs if r["algorithm"] == ref]
    level = sum(final_reward(r) for r in mine_ref) / len(mine_ref) if mine_ref else None
    eval_level = sum(r["eval_reward"] for r in mine_ref) / len(mine_ref) if mine_ref else None
    out = {"reference": ref, "level": level, "eval_level": eval_level, "algorithms": {}}
    for algo in ALGORITHMS:
        mine = [r for r in runs if r["algorithm"] == algo]
        if mine:
            out["algorithms"][algo] = summarize_algorithm(mine, level, eval_level)
    return out


def summarize_algorithm(mine: list[dict], level: float | None, eval_level: float | None) -> dict:
    """One algorithm's runs: rewards, trajectories to the level, diversity (and mode metrics) at the eval level."""
    reach = [trajectories_to_reach(r["curve"], level) for r in mine] if level is not None else []

    def at_level(key):
        if eval_level is None:
            return mean_std([])
        return mean_std([value_at(r.get("evals", []), eval_level, key) for r in mine])

    out = {
        "final_reward": mean_std([final_reward(r) for r in mine]),
        "eval_reward": mean_std([r["eval_reward"] for r in mine]),
        "diversity": mean_std([r["diversity"] for r in mine]),
        "fidelity": mean_std([r["fidelity"] for r in mine]),
        "trajectories_to_level": mean_std([x for x in reach if x is not None]),
        "diversity_at_eval_level": at_level("diversity"),
        "train_seconds": mean_std([r["train_seconds"] for r in mine]),
        "runs_reaching_level": sum(x is not None for x in reach),
        "runs": len(mine),
        "initial_reward": mean_std([r["curve"][0]["reward"] for r in mine]),
    }
    if all("tv" in r for r in mine):
        out.update({
            "tv": mean_std([r["tv"] for r in mine]),
            "tv_at_eval_level": at_level("tv"),
            "split_tv": mean_std([r.get("split_tv") for r in mine]),
            "split_tv_at_eval_level": at_level("split_tv") if all("split_tv" in r for r in mine) else mean_std([]),
            "modes_kept": sum(r["modes_kept"] for r in mine),
            "modes_possible": sum(r["modes_possible"] for r in mine),
            "shares": {b: mean_std([r["shares"][b] for r in mine]) for b in mine[0]["shares"]},
        })
    if all("reward_gap" in r for r in mine):
        out.update({
            "reward_gap": mean_std([r["reward_gap"] for r in mine]),
            "split": {b: mean_std([r["split"][b] for r in mine]) for b in mine[0]["split"]},
            "target_split": {b: mean_std([r["target_split"][b] for r in mine]) for b in mine[0]["target_split"]},
            "expected_reward_target": mean_std([sum(v["expected_reward"] for v in r["per_prompt_exact"].values())
                                                / len(r["per_prompt_exact"]) for r in mine]),
        })
    if all("log_z_learned" in r for r in mine):
        prompts = list(mine[0]["log_z_learned"])
        out.update({
            "log_z_error": mean_std([r["log_z_error"] for r in mine]),
            "log_z_learned": {p: mean_std([r["log_z_learned"][p] for r in mine]) for p in prompts},
            "log_z_true": {p: mean_std([r["log_z_true"][p] for r in mine]) for p in prompts},
        })
    return out


def plot(runs: list[dict], summary: dict, reward: str, path: Path, base: dict | None = None) -> None:
    """Reward vs trajectories and diversity vs reward; with mode metrics also TV distance vs reward and the final
    background shares against the base model's and the target's (`base`: the base-shares record)."""
    from matplotlib.figure import Figure

    if any("reward_gap" in r for r in runs):
        return plot_exact(runs, summary, path, base)
    with_modes = any("tv" in r for r in runs)
    fig = Figure(figsize=(10, 8) if with_modes else (10, 4))
    axes = fig.subplots(2, 2).flatten() if with_modes else fig.subplots(1, 2)
    ref = (summary.get("reference") or "reference").upper()
    _plot_curves(axes[0], runs, summary, reward, ref)
    _plot_along_training(axes[1], runs, summary, reward, ref, "diversity", "diversity (pairwise CLIP distance)")
    if with_modes:
        key = "split_tv" if all("split_tv" in e for r in runs for e in r.get("evals", [])) else "tv"
        _plot_along_training(axes[2], runs, summary, reward, ref, key, f"{key.replace('_', ' ')} to the target "
                             "(background shares)")
        _plot_shares(axes[3], summary, base)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_exact(runs: list[dict], summary: dict, path: Path, base: dict | None = None) -> None:
    """Against the exact target: TV to p* and the reward gap against trajectories seen (mean ± std over seeds),
    rtb's learned log Z against the true one, and the final background shares beside the base model's and p*."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(2, 2).flatten()
    floors = (base or {}).get("tv_floor", {})
    for n, floor in floors.items():
        axes[0].axhline(floor, ls=":", color="grey", lw=1, label=f"p* itself, {n} samples/prompt")
    _plot_evals(axes[0], runs, "tv", "TV to p* (background shares)")
    axes[0].set_title("TV to the exact target (mean ± std over seeds)")
    axes[0].legend(fontsize=7)
    axes[1].axhline(0.0, color="black", lw=1)
    _plot_evals(axes[1], runs, "reward_gap", "E_run[r] − E_p*[r]")
    axes[1].set_title("reward gap (> 0: past the target)")
    axes[1].legend(fontsize=7)
    _plot_log_z(axes[2], runs)
    _plot_shares(axes[3], summary, base)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_evals(ax, runs: list[dict], key: str, label: str) -> None:
    """`key` of the evaluation points against trajectories seen, mean ± std over each algorithm's seeds."""
    for algo in ALGORITHMS:
        evals = [r["evals"] for r in runs if r["algorithm"] == algo and r.get("evals")]
        if not evals:
            continue
        k = min(len(e) for e in evals)
        x = [evals[0][i]["trajectories"] for i in range(k)]
        ys = torch.tensor([[e[i][key] for i in range(k)] for e in evals], dtype=torch.float64)
        m = ys.mean(0)
        sd = ys.std(0) if len(evals) > 1 else torch.zeros_like(m)
        ax.plot(x, m, marker="o", label=algo, color=COLOURS[algo])
        ax.fill_between(x, m - sd, m + sd, alpha=0.2, color=COLOURS[algo])
    ax.set_xlabel("trajectories seen")
    ax.set_ylabel(label)


def _plot_log_z(ax, runs: list[dict]) -> None:
    """rtb's learned log Z per prompt (nats of a trajectory, mean over seeds) at each evaluation; true as lines."""
    shown = False
    for algo in ALGORITHMS:
        evals = [r["evals"] for r in runs if r["algorithm"] == algo and r.get("evals")
                 and all("log_z_learned" in e for e in r["evals"])]
        if not evals:
            continue
        k = min(len(e) for e in evals)
        x = [evals[0][i]["trajectories"] for i in range(k)]
        for j, prompt in enumerate(evals[0][0]["log_z_learned"]):
            y = [sum(e[i]["log_z_learned"][prompt] for e in evals) / len(evals) for i in range(k)]
            line = ax.plot(x, y, marker="o", ls=["-", "--", "-."][j % 3], color=COLOURS[algo],
                           label=f"{algo}: {prompt}")[0]
            ax.axhline(evals[0][-1]["log_z_true"][prompt], ls=line.get_linestyle(), color="black", lw=0.8)
        shown = True
    ax.set_xlabel("trajectories seen")
    ax.set_ylabel("log Z (nats of a trajectory)")
    ax.set_title("learned log Z per prompt (black: true log Z)" if shown else "no learned log Z in these runs")
    if shown:
        ax.legend(fontsize=7)


def _plot_curves(ax, runs: list[dict], summary: dict, reward: str, ref: str) -> None:
    for algo in ALGORITHMS:
        curves = [r["curve"] for r in runs if r["algorithm"] == algo]
        if not curves:
            continue
        x = [p["trajectories"] for p in curves[0]]
        ys = torch.tensor([[p["reward"] for p in c] for c in curves])
        m = ys.mean(0)
        s = ys.std(0) if len(curves) > 1 else torch.zeros_like(m)
        ax.plot(x, m, label=algo, color=COLOURS[algo])
        ax.fill_between(x, m - s, m + s, alpha=0.2, color=COLOURS[algo])
    if summary["level"] is not None:
        ax.axhline(summary["level"], ls="--", color="grey", lw=1, label=f"{ref} final")
    ax.set_xlabel("trajectories seen")
    ax.set_ylabel(f"mean {reward} reward")
    ax.set_title("reward vs sampling budget (mean ± std over seeds)")
    ax.legend()


def _plot_along_training(ax, runs: list[dict], summary: dict, reward: str, ref: str, key: str, label: str) -> None:
    for algo in ALGORITHMS:
        evals = [r["evals"] for r in runs if r["algorithm"] == algo and r.get("evals")]
        if not evals:
            continue
        k = min(len(e) for e in evals)
        rew = [sum(e[i]["eval_reward"] for e in evals) / len(evals) for i in range(k)]
        val = [sum(e[i][key] for e in evals) / len(evals) for i in range(k)]
        ax.plot(rew, val, marker="o", label=algo, color=COLOURS[algo])
        ax.annotate(f"ep {evals[0][k - 1]['epoch']}", (rew[-1], val[-1]), fontsize=7)
    if summary.get("eval_level") is not None:
        ax.axvline(summary["eval_level"], ls="--", color="grey", lw=1, label=f"{ref} final")
    ax.set_xlabel(f"eval {reward} reward (fresh seeds)")
    ax.set_ylabel(label)
    ax.set_title(f"{key} vs reward along training (mean over seeds)")
    ax.legend()


def _plot_shares(ax, summary: dict, base: dict | None) -> None:
    """Grouped bars: each background's share (mean over prompts) for the base model, the target and each
    algorithm at the end (mean over seeds)."""
    names = list(modes.background_names())
    rows = {}
    if base is not None:
        rows["base"] = [sum(s[b] for s in base["shares"].values()) / len(base["shares"]) for b in names]
        rows["target"] = [sum(t[b] for t in base["targets"].values()) / len(base["targets"]) for b in names]
    for algo, s in summary["algorithms"].items():
        if "shares" in s:
            rows[algo] = [s["shares"][b]["mean"] for b in names]
    width = 0.8 / max(len(rows), 1)
    for k, (label, values) in enumerate(rows.items()):
        ax.bar([i + k * width for i in range(len(names))], values, width, label=label, color=COLOURS.get(label))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
    ax.set_ylabel("share of samples (mean over prompts)")
    ax.set_title("background shares at the end")
    ax.legend()


def _fmt(d: dict, digits: int = 3) -> str:
    return "–" if d.get("mean") is None else f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def table(summary: dict) -> str:
    """The summary as a Markdown table (mode columns when the runs have them)."""
    ref = summary.get("reference") or "the reference"
    modes_cols = any("tv" in s for s in summary["algorithms"].values())
    head = (f"| algorithm | initial reward | final reward | trajectories to {ref}'s final level | eval reward | "
            f"diversity | diversity at {ref}'s eval reward | fidelity | train s/run |")
    if modes_cols:
        head += (f" TV to target | TV at {ref}'s eval reward | split TV (rewarded only) | split TV at {ref}'s eval "
                 "reward | rewarded modes kept |")
    lines = [head, "|---" * head.count("|")[:-1] if False else "|" + "---|" * (head.count("|") - 1)]
    for algo, s in summary["algorithms"].items():
        lines.append(_row(algo, s, modes_cols))
    return "\n".join(lines)


def _row(algo: str, s: dict, modes_cols: bool) -> str:
    def at_level(d):
        return "never reached" if d["mean"] is None else f"{_fmt(d)} ({d['n']}/{s['runs']} runs)"

    reach = s["trajectories_to_level"]
    reach_txt = "never" if reach["mean"] is None else f"{reach['mean']:.0f} ± {reach['std']:.0f}"
    reach_txt += f" ({s['runs_reaching_level']}/{s['runs']} runs)"
    row = (f"| {algo} | {_fmt(s['initial_reward'])} | {_fmt(s['final_reward'])} | {reach_txt} | "
           f"{_fmt(s['eval_reward'])} | {_fmt(s['diversity'])} | {at_level(s['diversity_at_eval_level'])} | "
           f"{_fmt(s['fidelity'])} | {_fmt(s.get('train_seconds', {'mean': None}), 0)} |")
    if modes_cols:
        row += (f" {_fmt(s['tv'])} | {at_level(s['tv_at_eval_level'])} | {_fmt(s['split_tv'])} | "
                f"{at_level(s['split_tv_at_eval_level'])} | {s['modes_kept']}/{s['modes_possible']} |"
                if "tv" in s else " – | – | – | – | – |")
    return row


def exact_table(summary: dict) -> str:
    """The runs against the exact target as a Markdown table: TV to p*, reward gap, the first rewarded
    background's share of the rewarded samples beside the target's, eval reward beside E_{p*}[r], diversity,
    fidelity and rtb's log Z error, |learned − true| (mean over prompts; nats)."""
    rows = {a: s for a, s in summary["algorithms"].items() if "reward_gap" in s}
    if not rows:
        return ""
    first = next(iter(next(iter(rows.values()))["split"]))
    head = (f"| algorithm | TV to p* | reward gap | {first} share of rewarded (target) | eval reward (E_p*[r]) | "
            "diversity | fidelity | log Z error (nats) | train s/run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for algo, s in rows.items():
        lz = _fmt(s["log_z_error"]) if "log_z_error" in s else "–"
        lines.append(f"| {algo} | {_fmt(s['tv'])} | {_fmt(s['reward_gap'], 3)} | {_fmt(s['split'][first])} "
                     f"({s['target_split'][first]['mean']:.3f}) | {_fmt(s['eval_reward'])} "
                     f"({s['expected_reward_target']['mean']:.3f}) | {_fmt(s['diversity'])} | {_fmt(s['fidelity'])} | "
                     f"{lz} | {_fmt(s['train_seconds'], 0)} |")
    return "\n".join(lines)


def log_z_table(summary: dict) -> str:
    """rtb's learned log Z per prompt (nats of a whole trajectory, mean ± std over seeds) beside the true log Z."""
    rows = {a: s for a, s in summary["algorithms"].items() if "log_z_learned" in s}
    if not rows:
        return ""
    lines = ["| algorithm | prompt | learned log Z | true log Z | learned − true |", "|---|---|---|---|---|"]
    for algo, s in rows.items():
        for prompt, learned in s["log_z_learned"].items():
            true = s["log_z_true"][prompt]["mean"]
            lines.append(f"| {algo} | {prompt} | {_fmt(learned)} | {true:.3f} | {learned['mean'] - true:+.3f} |")
    return "\n".join(lines)


def weights_fingerprint(name: str) -> str | None:
    """SHA-256 (16 hex digits) of a built-in model's or a local folder's safetensors, so that cached base shares
    are sampled again when the weights change; None for a hub id (its revision is the hub's business)."""
    import hashlib

    from dagcli.builtin import PRETRAINED_DIRS

    folder = PRETRAINED_DIRS.get(name) or (Path(name) if Path(name).is_dir() else None)
    if folder is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


DEFAULT_SAMPLER = "sde"  # sampling.sampler's default: the family's own sampler (the only one of the SD families)


def base_cache_name(model: str, sampler: str) -> str:
    """The base shares' cache file of a model and sampler: the default sampler's keeps the plain name."""
    return f"modes-base-{model}.json" if sampler == DEFAULT_SAMPLER else f"modes-base-{model}-{sampler}.json"


def base_modes(preset: Path, overrides: list[str], per_prompt: int, cache_dir: Path = BASE_CACHE) -> dict:
    """The base model's background shares per prompt (`per_prompt` samples each, the preset's sampler settings) and
    the GFlowNet target shares for its reward and β (`modes.effective_beta`). The shares are cached in
    `cache_dir/modes-base-<model>[-<sampler>].json` (whatever --output is; `base_cache_name`) and sampled again
    when a setting differs; the targets depend on the run's β and go into each comparison's result instead."""
    from dagcli.config import fill_model_defaults
    from dagcli.families import set_sampler
    from dagcli.models import load_model
    from dagcli.prompts import load_prompts
    from dagcli.rewards.modes import background_modes

    cfg, _ = fill_model_defaults(load_config(preset, overrides))
    if cfg.reward.spec != "background-modes":
        raise ValueError(f"{preset}: the modes comparison needs reward.spec = 'background-modes', not "
                         f"{cfg.reward.spec!r}")
    s = cfg.sampling
    prompts = sorted({p.prompt for p in load_prompts(s.prompts)})
    reward = background_modes(**dict(cfg.reward.options).get("background-modes", {}))
    key = {"model": cfg.model.name, "weights": weights_fingerprint(cfg.model.name), "prompts": prompts,
           "steps": s.steps, "guidance": s.guidance, "eta": s.eta, "sampler": s.sampler, "resolution": s.resolution,
           "per_prompt": per_prompt}
    cache = cache_dir / base_cache_name(cfg.model.name, s.sampler)
    record = json.loads(cache.read_text()) if cache.is_file() else {}
    if record.get("key") is not None:
        record["key"] = {"sampler": DEFAULT_SAMPLER, **record["key"]}  # written before the key named the sampler
    if record.get("key") != key:
        model = load_model(cfg.model.name, device="cpu")
        set_sampler(model.family, s.sampler, s.eta)
        started = time.perf_counter()
        labels = modes.sample_backgrounds(model, prompts, per_prompt, steps=s.steps, guidance=s.guidance, eta=s.eta)
        dims = model.family.initial_latents(1, s.resolution, s.resolution, torch.Generator().manual_seed(0)).numel()
        names = modes.background_names()
        record = {"key": key, "latent_dims": dims, "seconds": time.perf_counter() - started,
                  "counts": {p: {b: v.count(b) for b in names} for p, v in labels.items()},
                  "shares": {p: modes.shares(v, names) for p, v in labels.items()}}
        cache.write_text(json.dumps(record, indent=1))
    values = {b: reward.value_of(b) for b in modes.background_names()}
    beta_eff = modes.effective_beta(cfg.dag.beta, cfg.train.reduction, record["latent_dims"])
    record.update({"beta": cfg.dag.beta, "reduction": cfg.train.reduction, "beta_eff": beta_eff,
                   "values": values, "rewarded": list(reward.colours),
                   "targets": modes.targets_for(record["shares"], values, beta_eff)})
    record["base_tv"] = sum(modes.tv_distance(record["shares"][p], record["targets"][p]) for p in prompts) / len(prompts)
    return record


def exact_targets(base: dict, cfg) -> dict:
    """A run's exact target from the base shares record (`base_modes`) and the run's configuration: β_eff of its
    algorithm's β under its reduction, p* per prompt, and the factor that turns rtb's learned log Z into nats of a
    whole trajectory (D under "mean": the residual log Z + Σ ρ − β·r adds per-dimension means, so its log Z is
    log Z(β_eff) / D; 1 under "sum")."""
    dims, reduction = base["latent_dims"], cfg.train.reduction
    beta_eff = modes.effective_beta(modes.target_beta(cfg), reduction, dims)
    return {"targets": modes.targets_for(base["shares"], base["values"], beta_eff), "rewarded": base["rewarded"],
            "base": base["shares"], "values": base["values"], "beta_eff": beta_eff,
            "log_z_scale": modes.effective_beta(1.0, reduction, dims)}


def sampling_floor(base: dict, mode_targets: dict, per_prompt: int, draws: int = 2000) -> float:
    """The TV to p* that `per_prompt` samples drawn from p* itself read on average (over prompts and `draws`
    multinomial draws, seeded): below it a run's TV is sampling noise."""
    names = list(modes.background_names())
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    for prompt in base["shares"]:
        p = torch.tensor([mode_targets["targets"][prompt][b] for b in names], dtype=torch.float64)
        counts = torch.stack([torch.bincount(torch.multinomial(p, per_prompt, True, generator=gen), minlength=len(p))
                              for _ in range(draws)]).double()
        total += float((counts / per_prompt - p).abs().sum(1).mean() / 2)
    return total / len(base["shares"])


def merge_source(spec: str | Path) -> tuple[Path, set[str] | None]:
    """`FILE` or `FILE:ALGO,ALGO` (only those algorithms' runs of the file) -> (file, algorithms or None)."""
    path, sep, tail = str(spec).rpartition(":")
    names = set(tail.split(",")) if sep else set()
    if sep and names <= set(ALGORITHMS):
        return Path(path), names
    return Path(spec), None


def merge(specs: list, output: Path, name: str, reference: str | None = None) -> dict:
    """Summarise the runs of several result files (one reward; `FILE:ALGO,...` keeps some algorithms' runs of a
    file) as one comparison; writes JSON and PNG."""
    sources = [merge_source(s) for s in specs]
    files = [f for f, _ in sources]
    results = [json.loads(f.read_text()) for f in files]
    for result, (_, keep) in zip(results, sources, strict=True):
        if keep is not None:
            result["runs"] = [run for run in result["runs"] if run["algorithm"] in keep]
    rewards = {r["reward"] for r in results}
    if len(rewards) != 1:
        raise ValueError(f"the files hold different rewards ({', '.join(sorted(rewards))}); merge one reward")
    reward = rewards.pop()
    runs = [run for r in results for run in r["runs"]]
    summary = summarize(runs, reference)
    result = {**results[0], "merged_from": [str(f) for f in specs], "summary": summary, "runs": runs,
              "wall_seconds": sum(r["wall_seconds"] for r in results)}
    # one file and no name: its summary and plot are rewritten in place (after a change to the summary)
    path = files[0] if len(files) == 1 and not name else output / f"compare-{reward}-{name or 'merged'}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    plot(runs, summary, reward, path.with_suffix(".png"), results[0].get("base"))
    print(f"{reward}: {len(runs)} runs from {len(files)} files\n{table(summary)}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", action="append", choices=sorted(PRESETS), help="reward(s) to compare")
    p.add_argument("--model", default="tiny",
                   help="the model every run trains (default tiny); sets model.name over the presets'")
    p.add_argument("--algorithms", nargs="+", default=None, choices=ALGORITHMS,
                   help="default: the model's set (" + "; ".join(f"{m}: {', '.join(a)}" for m, a in
                                                             MODEL_ALGORITHMS.items()) + "; else all)")
    p.add_argument("--reference", choices=ALGORITHMS, default=None,
                   help="whose final reward is the level to reach (default: grpo, else ddpo)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    p.add_argument("--eval-per-prompt", type=int, default=None,
                   help="evaluation samples per prompt (default 8; 48 for the modes reward)")
    p.add_argument("--final-eval-per-prompt", type=int, default=None,
                   help="evaluation samples per prompt at the end (default: as --eval-per-prompt; 200 for "
                        "modes-exact)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N epochs (0: at the end only; default 4, 3 with --quick)")
    p.add_argument("--base-samples", type=int, default=BASE_SAMPLES,
                   help="base-model samples per prompt behind the modes reward's target shares (cached)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value for all runs")
    p.add_argument("--algo-set", action="append", default=[], metavar="ALGO:section.key=value",
                   help="an override for one algorithm only, e.g. grpo:train.learning_rate=3e-4")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel, one process each (default: the number of CPU cores, at most 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: CPU cores / jobs; 1 on a machine shared with others)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_EPOCHS} epochs and, unless --reward says otherwise, the modes reward only: < 10 min on 2 "
                        "cores")
    p.add_argument("--name", default="", help="suffix of the result files, e.g. 'grpo-lr3e-4'")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON[:ALGO,...]",
                   help="no training: summarise the runs of earlier result files of one reward together (one file and no "
                        "--name: rewrite its summary in place); FILE:grpo,ddpo takes only those algorithms' runs")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--runs-dir", type=Path, default=Path("/tmp/dagcli-compare"))
    args = p.parse_args(argv)
    args.per_algo = {a: [] for a in ALGORITHMS}
    for item in args.algo_set:
        algo, _, override = item.partition(":")
        if algo not in args.per_algo or "=" not in override:
            p.error(f"--algo-set {item!r}: expected ALGO:section.key=value with ALGO one of {', '.join(ALGORITHMS)}")
        args.per_algo[algo].append(override)
    if args.algorithms is None:
        sets = [REWARD_ALGORITHMS[r] for r in args.reward or () if r in REWARD_ALGORITHMS]
        args.algorithms = list(sets[0] if sets else MODEL_ALGORITHMS.get(args.model, ALGORITHMS))
    return args


def main() -> None:
    args = parse_args()
    cores = os.cpu_count() or 1
    jobs = max(1, args.jobs or min(2, cores))
    args.output.mkdir(parents=True, exist_ok=True)
    if args.merge:
        try:
            merge(args.merge, args.output, args.name, args.reference)
        except (OSError, ValueError, KeyError) as e:  # unreadable, not JSON, or not a comparison result
            print(f"--merge: {type(e).__name__}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    rewards = args.reward or (["modes"] if args.quick else ["compressibility", "modes"])
    for reward in rewards:
        compare_reward(reward, args, jobs, args.threads or max(1, cores // jobs))


def compare_reward(reward: str, args: argparse.Namespace, jobs: int, threads: int) -> dict:
    """Every (algorithm, seed) run of one reward, in `jobs` worker processes; writes the result JSON and plot."""
    preset_name = MODEL_PRESETS.get(args.model, {}).get(reward, PRESETS[reward])
    preset = ROOT / preset_name
    overrides = [f'model.name="{args.model}"', *args.overrides]
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else load_config(preset).train.epochs)
    eval_every = args.eval_every if args.eval_every is not None else (3 if args.quick else 4)
    per_prompt = args.eval_per_prompt or EVAL_PER_PROMPT.get(reward, 8)
    final_per_prompt = args.final_eval_per_prompt or FINAL_EVAL_PER_PROMPT.get(reward, per_prompt)
    base = base_modes(preset, overrides, args.base_samples) if reward in MODE_REWARDS else None
    # one folder per invocation: two comparisons started in the same second must not write one metrics.jsonl
    run_root = args.runs_dir / reward / f"{int(time.time())}-{os.getpid()}"
    tasks = []
    for seed in args.seeds:
        for algo in args.algorithms:
            task_overrides = [*overrides, *args.per_algo[algo]]
            if reward == "modes-exact":  # each run against the target of its own β
                mode_targets = exact_targets(base, run_config(preset, algo, seed, epochs, task_overrides))
            else:
                mode_targets = {"targets": base["targets"], "rewarded": base["rewarded"]} if base else None
            tasks.append(dict(preset=preset, algorithm=algo, seed=seed, epochs=epochs,
                              out_dir=run_root, eval_per_prompt=per_prompt,
                              overrides=task_overrides, eval_every=eval_every, threads=threads,
                              mode_targets=mode_targets, final_eval_per_prompt=final_per_prompt))
    if reward == "modes-exact":
        base = {**base, "tv_floor": {str(n): sampling_floor(base, tasks[0]["mode_targets"], n)
                                     for n in sorted({per_prompt, final_per_prompt})}}
    started = time.perf_counter()
    runs = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool, \
            workers_stop_with_us(pool):
        for run in pool.map(_run_task, tasks):
            runs.append(run)
            tv = f", TV {run['tv']:.3f}" if "tv" in run else ""
            tv += f", reward gap {run['reward_gap']:+.3f}" if "reward_gap" in run else ""
            tv += f", |log Z - true| {run['log_z_error']:.3f}" if "log_z_error" in run else ""
            print(f"{reward} {run['algorithm']} seed {run['seed']}: reward {run['curve'][0]['reward']:.4f} -> "
                  f"{run['curve'][-1]['reward']:.4f}, diversity {run['diversity']:.4f}{tv}, "
                  f"fidelity {run['fidelity']}, {run['train_seconds']:.0f}s", flush=True)
    summary = summarize(runs, args.reference)
    result = {
        "reward": reward, "preset": preset_name, "model": args.model, "epochs": epochs, "seeds": args.seeds,
        "overrides": args.overrides, "algo_overrides": args.per_algo, "quick": args.quick, "jobs": jobs,
        "threads_per_job": threads, "eval_per_prompt": per_prompt, "final_eval_per_prompt": final_per_prompt,
        "wall_seconds": time.perf_counter() - started,
        "command": "python benchmarks/compare_algorithms.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "base": base, "summary": summary, "runs": runs,
    }
    model = "" if args.model == "tiny" else f"-{args.model}"
    stem = f"compare-{reward}{model}" + ("-quick" if args.quick else "") + (f"-{args.name}" if args.name else "")
    (args.output / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    plot(runs, summary, reward, args.output / f"{stem}.png", base)
    print(f"\n{reward}: {len(runs)} runs in {result['wall_seconds']:.0f}s\n{table(summary)}\n")
    if reward == "modes-exact":
        print(f"{exact_table(summary)}\n\n{log_z_table(summary)}\n")
    return result


if __name__ == "__main__":
    main()
