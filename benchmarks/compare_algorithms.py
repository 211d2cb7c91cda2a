"""DAG-DB vs DAG-KL vs DDPO on the same model, reward, prompts and sampling budget, over several seeds.

    python benchmarks/compare_algorithms.py --quick                 # < 10 minutes on 2 CPU cores
    python benchmarks/compare_algorithms.py --reward clip --seeds 0 1 2 --epochs 30

For every (reward, algorithm, seed) it trains in this process and records the reward of each epoch against
the trajectories seen so far; at the end it samples held-out seeds for the training prompts and measures
reward, diversity (mean pairwise cosine distance of CLIP image embeddings within a prompt) and prompt
fidelity (the image's best-matching caption among the prompts is its own), with `dag eval`'s metrics.
Writes `benchmarks/results/compare-<reward>.json`, a PNG plot beside it, and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dagcli.config import load_config, replace  # noqa: E402
from dagcli.evaluate import fidelity, pairwise_cosine_distance  # noqa: E402
from dagcli.sampling import generators_for, sample_batch  # noqa: E402

ALGORITHMS = ("dag-db", "dag-kl", "ddpo")
PRESETS = {"compressibility": "examples/demo-compressibility.toml", "clip": "examples/demo-clip.toml"}


def run_one(preset: Path, algorithm: str, seed: int, epochs: int, out_dir: Path, eval_per_prompt: int,
            overrides: list[str]) -> dict:
    """Train one configuration and evaluate it; returns its curve and final metrics."""
    from dagcli.commands.train import preflight
    from dagcli.trainer import Trainer

    cfg = load_config(preset, [f"train.algorithm=\"{algorithm}\"", f"train.seed={seed}", f"train.epochs={epochs}",
                               "output.checkpoint_every=100000", *overrides])
    cfg = replace(cfg, "output", dir=str(out_dir / f"{algorithm}-s{seed}"))
    if algorithm == "dag-kl" and cfg.train.batch_size < 2:
        cfg = replace(cfg, "train", batch_size=2)
    prompts, _ = preflight(cfg, resume=False, resume_from=None)
    trainer = Trainer(cfg, prompts)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [{"trajectories": m["trajectories_seen"], "reward": m["reward_mean"]} for m in lines]
    final = evaluate(trainer, sorted(set(prompts)), eval_per_prompt, seed)
    return {"algorithm": algorithm, "seed": seed, "curve": curve, "train_seconds": seconds, **final}


@torch.no_grad()
def evaluate(trainer, prompts: list[str], per_prompt: int, seed: int) -> dict:
    """Reward, diversity and fidelity of fresh samples (seeds disjoint from training) of the trained LoRA."""
    from dagcli.evaluate import default_embed_model
    from dagcli.rewards.clip import load_clip

    c = trainer.config
    unet = trainer.raw_unet
    unet.eval()
    rows = [p for p in prompts for _ in range(per_prompt)]
    seeds = [10_000_000 + 1000 * seed + i for i in range(len(rows))]
    images, rewards = [], []
    for i in range(0, len(rows), c.sampling.batch_size):
        traj = sample_batch(trainer.model, rows[i : i + c.sampling.batch_size],
                            generators_for(seeds[i : i + c.sampling.batch_size]), encoder=trainer.encoder,
                            num_steps=c.sampling.steps, guidance=c.sampling.guidance, eta=c.sampling.eta, unet=unet)
        images.append(traj.images)
        rewards.append(trainer.score(traj.images, traj.prompts)[0])
    images_t, rewards_t = torch.cat(images), torch.cat(rewards)
    encoder = load_clip(default_embed_model(trainer.model.name), device=trainer.model.device)
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


def trajectories_to_reach(curve: list[dict], level: float) -> int | None:
    """Trajectories seen when the reward first reaches `level` (None if never)."""
    for point in curve:
        if point["reward"] >= level:
            return point["trajectories"]
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
        tail = run["curve"][-3:]
        return sum(p["reward"] for p in tail) / len(tail)

    ddpo = [final_reward(r) for r in runs if r["algorithm"] == "ddpo"]
    level = sum(ddpo) / len(ddpo) if ddpo else None
    out = {"level": level, "algorithms": {}}
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
    algos = list(summary["algorithms"])
    div = [summary["algorithms"][a]["diversity"]["mean"] or 0 for a in algos]
    err = [summary["algorithms"][a]["diversity"]["std"] or 0 for a in algos]
    bx.bar(algos, div, yerr=err, color=[colours[a] for a in algos])
    bx.set_title("diversity after training (pairwise CLIP distance)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(summary: dict) -> str:
    def fmt(d, digits=3):
        return "–" if d["mean"] is None else f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"

    lines = ["| algorithm | initial reward | final reward | trajectories to DDPO's final level | eval reward | "
             "diversity | fidelity |", "|---|---|---|---|---|---|---|"]
    for algo, s in summary["algorithms"].items():
        reach = s["trajectories_to_ddpo_level"]
        reach_txt = "never" if reach["mean"] is None else f"{reach['mean']:.0f} ± {reach['std']:.0f}"
        reach_txt += f" ({s['runs_reaching_level']}/{s['runs']} runs)"
        lines.append(f"| {algo} | {fmt(s['initial_reward'])} | {fmt(s['final_reward'])} | {reach_txt} | "
                     f"{fmt(s['eval_reward'])} | {fmt(s['diversity'])} | {fmt(s['fidelity'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", action="append", choices=sorted(PRESETS), help="reward(s) to compare")
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    p.add_argument("--eval-per-prompt", type=int, default=8)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value for all runs")
    p.add_argument("--quick", action="store_true", help="compressibility only, fewer epochs: < 10 min on 2 cores")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--runs-dir", type=Path, default=Path("/tmp/dagcli-compare"))
    args = p.parse_args()
    rewards = args.reward or (["compressibility"] if args.quick else ["compressibility", "clip"])
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    args.output.mkdir(parents=True, exist_ok=True)
    for reward in rewards:
        preset = ROOT / PRESETS[reward]
        epochs = args.epochs or (load_config(preset).train.epochs // (2 if args.quick else 1))
        runs = []
        started = time.perf_counter()
        for seed in args.seeds:
            for algo in args.algorithms:
                out_dir = args.runs_dir / reward / f"{int(time.time())}"
                run = run_one(preset, algo, seed, epochs, out_dir, args.eval_per_prompt, args.overrides)
                runs.append(run)
                print(f"{reward} {algo} seed {seed}: reward {run['curve'][0]['reward']:.4f} -> "
                      f"{run['curve'][-1]['reward']:.4f}, diversity {run['diversity']:.4f}, "
                      f"fidelity {run['fidelity']}, {run['train_seconds']:.0f}s", flush=True)
        summary = summarize(runs)
        result = {
            "reward": reward, "preset": PRESETS[reward], "epochs": epochs, "seeds": args.seeds,
            "overrides": args.overrides, "quick": args.quick, "wall_seconds": time.perf_counter() - started,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
            "summary": summary, "runs": runs,
        }
        suffix = "-quick" if args.quick else ""
        (args.output / f"compare-{reward}{suffix}.json").write_text(json.dumps(result, indent=1))
        plot(runs, summary, reward, args.output / f"compare-{reward}{suffix}.png")
        print(f"\n{reward}: {len(runs)} runs in {result['wall_seconds']:.0f}s\n{table(summary)}\n")


if __name__ == "__main__":
    main()
