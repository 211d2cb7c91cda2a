"""DAG-DB vs DAG-KL vs DDPO on the same model, reward, prompts and sampling budget, over several seeds.

    python benchmarks/compare_algorithms.py --quick                 # < 10 minutes on 2 CPU cores
    python benchmarks/compare_algorithms.py                         # both rewards, 16 epochs, 3 seeds
    python benchmarks/compare_algorithms.py --reward clip --algo-set ddpo:train.learning_rate=3e-3

For every (reward, algorithm, seed) it trains in a worker process (`--jobs` at a time, one thread each on a
2-core machine) and records the reward of each epoch against the trajectories seen so far. Before training,
every `--eval-every` epochs and at the end it samples fixed held-out seeds for the training prompts and
measures reward, diversity (mean pairwise cosine distance of CLIP image embeddings within a prompt) and
prompt fidelity (the image's best-matching caption among the prompts is its own), with `dag eval`'s metrics,
so diversity can be compared at equal reward. Writes `benchmarks/results/compare-<reward>[-quick][-NAME].json`,
a PNG plot beside it, and prints a summary table."""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dagcli.config import load_config, replace  # noqa: E402
from dagcli.evaluate import default_embed_model, fidelity, pairwise_cosine_distance  # noqa: E402
from dagcli.rewards.clip import load_clip  # noqa: E402
from dagcli.sampling import generators_for, sample_batch  # noqa: E402

ALGORITHMS = ("dag-db", "dag-kl", "ddpo")
QUICK_EPOCHS = 6
PRESETS = {"compressibility": "examples/demo-compressibility.toml", "clip": "examples/demo-clip.toml"}


def run_one(preset: Path, algorithm: str, seed: int, epochs: int, out_dir: Path, eval_per_prompt: int,
            overrides: list[str], eval_every: int = 0, threads: int | None = None) -> dict:
    """Train one configuration, evaluating it every `eval_every` epochs (and before training and at the end);
    returns its reward curve, its evaluation points and the final metrics."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train_and_evaluate(preset, algorithm, seed, epochs, out_dir, eval_per_prompt, overrides, eval_every)
    finally:
        torch.set_num_threads(before)  # an in-process caller keeps its own thread count


def _train_and_evaluate(preset: Path, algorithm: str, seed: int, epochs: int, out_dir: Path, eval_per_prompt: int,
                        overrides: list[str], eval_every: int) -> dict:
    from dagcli.commands.train import preflight
    from dagcli.trainer import Trainer

    cfg = load_config(preset, [f"train.algorithm=\"{algorithm}\"", f"train.seed={seed}", f"train.epochs={epochs}",
                               "output.checkpoint_every=100000", "output.checkpoint_minutes=0", "output.sample_every=0", *overrides])
    cfg = replace(cfg, "output", dir=str(out_dir / f"{algorithm}-s{seed}"))
    if algorithm == "dag-kl" and cfg.train.batch_size < 2:
        cfg = replace(cfg, "train", batch_size=2)
    cfg, prompts, _ = preflight(cfg, resume=False, resume_from=None)
    prompts_eval = sorted(set(prompts))
    trainer = Trainer(cfg, prompts)
    embedder = load_clip(default_embed_model(trainer.model.name), device=trainer.model.device)  # once per run

    def evaluation(epoch: int) -> dict:
        return {"epoch": epoch, "trajectories": trainer.state.trajectories_seen,
                **evaluate(trainer, embedder, prompts_eval, eval_per_prompt, seed)}

    stops = sorted({*range(eval_every, epochs, eval_every), epochs}) if eval_every else [epochs]
    points = [evaluation(0)] if eval_every else []
    seconds = 0.0
    for stop in stops:
        t0 = time.perf_counter()
        trainer.train(until_epoch=stop)
        seconds += time.perf_counter() - t0
        points.append(evaluation(stop))
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [{"trajectories": m["trajectories_seen"], "reward": m["reward_mean"]} for m in lines]
    return {"algorithm": algorithm, "seed": seed, "overrides": overrides, "curve": curve, "evals": points,
            "train_seconds": seconds, **points[-1]}


def _run_task(task: dict) -> dict:
    """Process-pool entry point: one run, its configuration passed as keyword arguments."""
    return run_one(**task)


@torch.no_grad()
def evaluate(trainer, encoder, prompts: list[str], per_prompt: int, seed: int) -> dict:
    """Reward, diversity and fidelity of fresh samples (seeds disjoint from training) of the trained LoRA;
    `encoder` embeds images and prompts (a `dagcli.rewards.clip.ClipEncoder`)."""
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
                            height=trainer.resolution, width=trainer.resolution)
        images.append(traj.images)
        rewards.append(trainer.rollout.score(traj.images, traj.prompts)[0])
    images_t, rewards_t = torch.cat(images), torch.cat(rewards)
    emb = encoder.embed_images(images_t).double().cpu()
    text = encoder.embed_texts(prompts).double().cpu()
    targets = [prompts.index(p) for p in rows]
    diversity = [pairwise_cosine_distance(emb[j * per_prompt : (j + 1) * per_prompt]) for j in range(len(prompts))]
    return {
        "eval_reward": float(rewards_t.mean()),
        "eval_reward_std": float(rewards_t.std()),
        "diversity": float(sum(diversity) / len(diversity)),
        "fidelity": fidelity(emb, text, targets) if len(prompts) > 1 else None,
    }


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


def diversity_at(evals: list[dict], level: float) -> float | None:
    """Diversity where the evaluation reward first reaches `level`, interpolated linearly between the two
    evaluation points around it (None if it never does)."""
    for a, b in zip(evals, evals[1:], strict=False):
        if a["eval_reward"] >= level:
            return a["diversity"]
        if b["eval_reward"] >= level:
            w = (level - a["eval_reward"]) / (b["eval_reward"] - a["eval_reward"])
            return a["diversity"] + w * (b["diversity"] - a["diversity"])
    return None


def mean_std(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(vals) > 1 else 0.0, "n": len(vals)}


def summarize(runs: list[dict]) -> dict:
    """Per algorithm, mean ± std over seeds; the reward level is DDPO's final mean reward (last 3 epochs)."""
    def final_reward(run):
        return smoothed(run["curve"])[-1]["reward"]

    ddpo = [final_reward(r) for r in runs if r["algorithm"] == "ddpo"]
    level = sum(ddpo) / len(ddpo) if ddpo else None
    ddpo_eval = [r["eval_reward"] for r in runs if r["algorithm"] == "ddpo"]
    eval_level = sum(ddpo_eval) / len(ddpo_eval) if ddpo_eval else None
    out = {"level": level, "eval_level": eval_level, "algorithms": {}}
    for algo in ALGORITHMS:
        mine = [r for r in runs if r["algorithm"] == algo]
        if not mine:
            continue
        reach = [trajectories_to_reach(r["curve"], level) for r in mine] if level is not None else []
        out["algorithms"][algo] = {
            "final_reward": mean_std([final_reward(r) for r in mine]),
            "eval_reward": mean_std([r["eval_reward"] for r in mine]),
            "diversity": mean_std([r["diversity"] for r in mine]),
            "fidelity": mean_std([r["fidelity"] for r in mine]),
            "trajectories_to_ddpo_level": mean_std([x for x in reach if x is not None]),
            "diversity_at_ddpo_eval_level": mean_std(
                [diversity_at(r.get("evals", []), eval_level) for r in mine] if eval_level is not None else []),
            "train_seconds": mean_std([r["train_seconds"] for r in mine]),
            "runs_reaching_level": sum(x is not None for x in reach),
            "runs": len(mine),
            "initial_reward": mean_std([r["curve"][0]["reward"] for r in mine]),
        }
    return out


def plot(runs: list[dict], summary: dict, reward: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax, bx = fig.subplots(1, 2)
    colours = {"dag-db": "tab:blue", "dag-kl": "tab:green", "ddpo": "tab:red"}
    for algo in ALGORITHMS:
        curves = [r["curve"] for r in runs if r["algorithm"] == algo]
        if not curves:
            continue
        x = [p["trajectories"] for p in curves[0]]
        ys = torch.tensor([[p["reward"] for p in c] for c in curves])
        m = ys.mean(0)
        s = ys.std(0) if len(curves) > 1 else torch.zeros_like(m)
        ax.plot(x, m, label=algo, color=colours[algo])
        ax.fill_between(x, m - s, m + s, alpha=0.2, color=colours[algo])
    if summary["level"] is not None:
        ax.axhline(summary["level"], ls="--", color="grey", lw=1, label="DDPO final")
    ax.set_xlabel("trajectories seen")
    ax.set_ylabel(f"mean {reward} reward")
    ax.set_title("reward vs sampling budget (mean ± std over seeds)")
    ax.legend()
    for algo in ALGORITHMS:
        evals = [r["evals"] for r in runs if r["algorithm"] == algo and r.get("evals")]
        if not evals:
            continue
        k = min(len(e) for e in evals)
        rew = [sum(e[i]["eval_reward"] for e in evals) / len(evals) for i in range(k)]
        div = [sum(e[i]["diversity"] for e in evals) / len(evals) for i in range(k)]
        bx.plot(rew, div, marker="o", label=algo, color=colours[algo])
        bx.annotate(f"ep {evals[0][k - 1]['epoch']}", (rew[-1], div[-1]), fontsize=7)
    if summary.get("eval_level") is not None:
        bx.axvline(summary["eval_level"], ls="--", color="grey", lw=1, label="DDPO final")
    bx.set_xlabel(f"eval {reward} reward (fresh seeds)")
    bx.set_ylabel("diversity (pairwise CLIP distance)")
    bx.set_title("diversity vs reward along training (mean over seeds)")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(summary: dict) -> str:
    def fmt(d, digits=3):
        return "–" if d["mean"] is None else f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"

    def at_level(s):
        d = s.get("diversity_at_ddpo_eval_level", {"mean": None, "n": 0})
        return "never reached" if d["mean"] is None else f"{fmt(d)} ({d['n']}/{s['runs']} runs)"

    lines = ["| algorithm | initial reward | final reward | trajectories to DDPO's final level | eval reward | "
             "diversity | diversity at DDPO's eval reward | fidelity | train s/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for algo, s in summary["algorithms"].items():
        reach = s["trajectories_to_ddpo_level"]
        reach_txt = "never" if reach["mean"] is None else f"{reach['mean']:.0f} ± {reach['std']:.0f}"
        reach_txt += f" ({s['runs_reaching_level']}/{s['runs']} runs)"
        lines.append(f"| {algo} | {fmt(s['initial_reward'])} | {fmt(s['final_reward'])} | {reach_txt} | "
                     f"{fmt(s['eval_reward'])} | {fmt(s['diversity'])} | "
                     f"{at_level(s)} | {fmt(s['fidelity'])} | "
                     f"{fmt(s.get('train_seconds', {'mean': None}), 0)} |")
    return "\n".join(lines)


def merge(files: list[Path], output: Path, name: str) -> dict:
    """Summarise the runs of several result files (one reward) as one comparison; writes JSON and PNG."""
    results = [json.loads(f.read_text()) for f in files]
    rewards = {r["reward"] for r in results}
    if len(rewards) != 1:
        raise ValueError(f"the files hold different rewards ({', '.join(sorted(rewards))}); merge one reward")
    reward = rewards.pop()
    runs = [run for r in results for run in r["runs"]]
    summary = summarize(runs)
    result = {**results[0], "merged_from": [str(f) for f in files], "summary": summary, "runs": runs,
              "wall_seconds": sum(r["wall_seconds"] for r in results)}
    # one file and no name: its summary and plot are rewritten in place (after a change to the summary)
    path = files[0] if len(files) == 1 and not name else output / f"compare-{reward}-{name or 'merged'}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    plot(runs, summary, reward, path.with_suffix(".png"))
    print(f"{reward}: {len(runs)} runs from {len(files)} files\n{table(summary)}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", action="append", choices=sorted(PRESETS), help="reward(s) to compare")
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    p.add_argument("--eval-per-prompt", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N epochs (0: at the end only; default 4, 3 with --quick)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value for all runs")
    p.add_argument("--algo-set", action="append", default=[], metavar="ALGO:section.key=value",
                   help="an override for one algorithm only, e.g. ddpo:train.learning_rate=3e-4")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel, one process each (default: the number of CPU cores, at most 2)")
    p.add_argument("--quick", action="store_true",
                   help=f"compressibility only, {QUICK_EPOCHS} epochs, 2 runs at a time: < 10 min on 2 cores")
    p.add_argument("--name", default="", help="suffix of the result files, e.g. 'ddpo-lr3e-4'")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="no training: summarise the runs of earlier result files of one reward together (one file and no "
                        "--name: rewrite its summary in place)")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--runs-dir", type=Path, default=Path("/tmp/dagcli-compare"))
    args = p.parse_args()
    rewards = args.reward or (["compressibility"] if args.quick else ["compressibility", "clip"])
    per_algo: dict[str, list[str]] = {a: [] for a in ALGORITHMS}
    for item in args.algo_set:
        algo, _, override = item.partition(":")
        if algo not in per_algo or "=" not in override:
            p.error(f"--algo-set {item!r}: expected ALGO:section.key=value with ALGO one of {', '.join(ALGORITHMS)}")
        per_algo[algo].append(override)
    cores = os.cpu_count() or 1
    jobs = max(1, args.jobs or min(2, cores))
    threads = max(1, cores // jobs)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.merge:
        try:
            merge(args.merge, args.output, args.name)
        except (OSError, ValueError, KeyError) as e:  # unreadable, not JSON, or not a comparison result
            print(f"--merge: {type(e).__name__}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    for reward in rewards:
        preset = ROOT / PRESETS[reward]
        epochs = args.epochs or (QUICK_EPOCHS if args.quick else load_config(preset).train.epochs)
        eval_every = args.eval_every if args.eval_every is not None else (3 if args.quick else 4)
        stamp = int(time.time())
        tasks = [dict(preset=preset, algorithm=algo, seed=seed, epochs=epochs,
                      out_dir=args.runs_dir / reward / f"{stamp}", eval_per_prompt=args.eval_per_prompt,
                      overrides=[*args.overrides, *per_algo[algo]], eval_every=eval_every, threads=threads)
                 for seed in args.seeds for algo in args.algorithms]
        started = time.perf_counter()
        runs = []
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for run in pool.map(_run_task, tasks):
                runs.append(run)
                print(f"{reward} {run['algorithm']} seed {run['seed']}: reward {run['curve'][0]['reward']:.4f} -> "
                      f"{run['curve'][-1]['reward']:.4f}, diversity {run['diversity']:.4f}, "
                      f"fidelity {run['fidelity']}, {run['train_seconds']:.0f}s", flush=True)
        summary = summarize(runs)
        result = {
            "reward": reward, "preset": PRESETS[reward], "epochs": epochs, "seeds": args.seeds,
            "overrides": args.overrides, "algo_overrides": per_algo, "quick": args.quick,
            "jobs": jobs, "threads_per_job": threads, "wall_seconds": time.perf_counter() - started,
            "command": "python benchmarks/compare_algorithms.py " + " ".join(sys.argv[1:]),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch": torch.__version__, "cpu_count": cores},
            "summary": summary, "runs": runs,
        }
        suffix = ("-quick" if args.quick else "") + (f"-{args.name}" if args.name else "")
        (args.output / f"compare-{reward}{suffix}.json").write_text(json.dumps(result, indent=1, default=str))
        plot(runs, summary, reward, args.output / f"compare-{reward}{suffix}.png")
        print(f"\n{reward}: {len(runs)} runs in {result['wall_seconds']:.0f}s\n{table(summary)}\n")

if __name__ == "__main__":
    main()
