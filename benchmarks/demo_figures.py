"""Regenerate the README's demo figures: `make demo`'s table, reward curve and sample grids, or the tiny-flow demo's
table.

    python benchmarks/demo_figures.py                 # train + evaluate as `make demo` does (1 torch thread)
    python benchmarks/demo_figures.py --threads 2     # the numbers depend on the thread count (float rounding)
    python benchmarks/demo_figures.py --reuse         # only re-read runs/demo (after `make demo`)
    python benchmarks/demo_figures.py --model tiny-flow --threads 1   # the same on the rectified-flow model

Runs the demo's two commands (train, then eval), then writes `benchmarks/results/demo.json`,
`docs/demo-reward-curve.png`, `docs/demo-samples.png` and the table between the `demo-table` markers of
README.md (with the thread count and the wall time); for `--model tiny-flow`, `benchmarks/results/demo_flow.json`
and the table between the `demo-flow-table` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_THREADS = 1  # torch threads of `make demo` (Makefile), hence of the README's table


@dataclass(frozen=True)
class Demo:
    """One README demo: its config, run folder, evaluation settings and where its numbers go."""

    config: str
    run: str  # relative to the repository root
    eval_steps: int
    eval_guidance: float
    markers: tuple[str, str]  # README markers around its table
    results: str  # file name under benchmarks/results
    figures: bool  # also draw the reward curve and the sample grids (`make demo` only)
    flag: str = ""  # how the command line names it

    @property
    def train_args(self) -> list[str]:
        return ["train", "--config", self.config, "--output", self.run]

    @property
    def eval_args(self) -> list[str]:
        return ["eval", "--prompts", "examples/prompts/demo.txt", "--ckpt", self.run, "--reward",
                "compressibility,clip", "--num-per-prompt", "8", "--steps", str(self.eval_steps), "--guidance",
                f"{self.eval_guidance:g}", "--output", f"{self.run}/eval"]


DEMOS = {
    # the commands of `make demo` (Makefile)
    "tiny": Demo("examples/demo-compressibility.toml", "runs/demo", 10, 3.0,
                 ("<!-- demo-table:start -->", "<!-- demo-table:end -->"), "demo.json", figures=True),
    "tiny-flow": Demo("examples/demo-flow-compressibility.toml", "runs/demo-flow", 10, 3.0,
                      ("<!-- demo-flow-table:start -->", "<!-- demo-flow-table:end -->"), "demo_flow.json",
                      figures=False, flag=" --model tiny-flow"),
}


def run_demo(demo: Demo, threads: int) -> float:
    """The demo's train and eval commands (with the `dag` of this Python) with `threads` torch threads; returns the
    wall time in seconds."""
    import shutil

    shutil.rmtree(ROOT / demo.run, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    for args in (demo.train_args, demo.eval_args):
        subprocess.run([sys.executable, "-m", "dagcli", *args], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - t0


def rows(report: dict) -> list[dict]:
    """Base and trained model: compressibility mean ± std, tiny-CLIP score, diversity, fidelity."""
    out = []
    for model in report["models"]:
        o = model["overall"]
        out.append({"label": model["label"], "compressibility": o["rewards"]["compressibility"],
                    "clip": o["rewards"]["clip"]["mean"], "diversity": o["diversity"], "fidelity": o["fidelity"]})
    return out


def table(results: dict, demo: Demo) -> str:
    trajectories = results["trajectories"]
    lines = ["| | compressibility (−kB) | tiny-CLIP score | diversity | prompt fidelity |", "|---|---|---|---|---|"]
    for i, r in enumerate(results["rows"]):
        name = "base model" if i == 0 else f"after {trajectories} trajectories"
        comp = f"{r['compressibility']['mean']:.3f} ± {r['compressibility']['std']:.3f}".replace("-", "−")
        comp = f"**{comp}**" if i else comp
        lines.append(f"| {name} | {comp} | {r['clip']:.3f} | {r['diversity']:.3f} | {r['fidelity']:.2f} |")
    seconds = results["seconds"]
    when = f"{seconds // 60:.0f} min {seconds % 60:.0f} s" if seconds else "time not measured (--reuse)"
    lines.append("")
    lines.append(f"Measured by `python benchmarks/demo_figures.py{demo.flag} --threads {results['threads']}` "
                 f"({results['threads']} torch thread(s); train and evaluate: {when}).")
    return "\n".join(lines)


def reward_curve(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [m["trajectories_seen"] for m in metrics]
    mean = [m["reward_mean"] for m in metrics]
    std = [m["reward_std"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(x, mean, marker="o", lw=1.5)
    ax.fill_between(x, [m - s for m, s in zip(mean, std, strict=True)],
                    [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2)
    ax.set_xlabel("trajectories seen")
    ax.set_ylabel("compressibility (−kB)")
    ax.set_title("make demo: reward per epoch (mean ± std)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def samples_figure(samples: Path, path: Path) -> None:
    """The training run's sample grids (fixed prompts and seeds) at the first and last saved epochs."""
    from PIL import Image

    from dagcli.images import labelled_rows

    grids = sorted(samples.glob("epoch-*.png"))
    first, last = grids[0], grids[-1]
    rows_ = [(f"epoch {int(g.stem.split('-')[1])}", [Image.open(g).convert("RGB")]) for g in (first, last)]
    labelled_rows(rows_, label_width=90).save(path)


def update_readme(text: str, markers: tuple[str, str]) -> None:
    start, end = markers
    readme = ROOT / "README.md"
    s = readme.read_text()
    if start not in s or end not in s:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    head, rest = s.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(DEMOS), default="tiny",
                   help="tiny: `make demo`; tiny-flow: the same job on the rectified-flow model")
    p.add_argument("--threads", type=int, default=DEMO_THREADS,
                   help=f"torch threads (the numbers depend on it; `make demo` uses {DEMO_THREADS})")
    p.add_argument("--reuse", action="store_true",
                   help="read the run folder as it is instead of running the demo (keeps the recorded wall time)")
    args = p.parse_args(argv)
    demo, run = DEMOS[args.model], ROOT / DEMOS[args.model].run
    previous = ROOT / "benchmarks" / "results" / demo.results
    seconds = run_demo(demo, args.threads) if not args.reuse else (
        json.loads(previous.read_text()).get("seconds", 0.0) if previous.is_file() else 0.0)
    report = json.loads((run / "eval" / "report.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    results = {"command": f"python benchmarks/demo_figures.py{demo.flag} --threads {args.threads}",
               "threads": args.threads, "seconds": round(seconds, 1), "rows": rows(report),
               "trajectories": metrics[-1]["trajectories_seen"],
               "reward_per_epoch": [m["reward_mean"] for m in metrics]}
    previous.write_text(json.dumps(results, indent=1) + "\n")
    if demo.figures:
        reward_curve(metrics, ROOT / "docs" / "demo-reward-curve.png")
        samples_figure(run / "samples", ROOT / "docs" / "demo-samples.png")
    update_readme(table(results, demo), demo.markers)
    print(table(results, demo))
    return results


if __name__ == "__main__":
    main()
