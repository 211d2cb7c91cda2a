"""Throughput of `dag serve-reward` for the tiny CLIP reward: images/s through HTTP at batch 1 and 32, against the
same reward called in-process, all in one run.

    python benchmarks/serve_reward.py                        # CPU, about a minute
    python benchmarks/serve_reward.py --images 128 --repeats 5 --output benchmarks/results/serve-reward-cpu.json

It starts `dag serve-reward clip --model tiny --port 0` on 127.0.0.1 (the server's own process and threads), then
scores the same images through `--reward http://127.0.0.1:PORT?batch_size=B` for each B, alternating the
variants (in-process, then each batch size, repeated) and reporting medians, so a noisy shared machine shifts them
alike. Images are the tiny model's size (32 x 32) unless `--size` says otherwise. Results go to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


def dag_command() -> list[str]:
    script = Path(sys.executable).parent / "dag"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dagcli"]


def start_server(batch_size: int, threads: int) -> tuple[subprocess.Popen, str]:
    """`dag serve-reward clip --model tiny` on a free loopback port -> (process, URL)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parent / "src")}
    proc = subprocess.Popen([*dag_command(), "serve-reward", "clip", "--model", "tiny", "--port", "0", "--device",
                             "cpu", "--batch-size", str(batch_size)], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"dag serve-reward did not start: {line!r}")
    return proc, "http://" + line.split("http://", 1)[1].split()[0]


def images_per_second(reward, images: torch.Tensor, prompts: list[str]) -> float:
    start = time.perf_counter()
    reward(images, prompts)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images scored per measurement")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batches", default="1,32", help="client batch sizes (images per request)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per variant (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the client and of the server")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "serve-reward-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dagcli.rewards import build_reward

    sizes = [int(b) for b in args.batches.split(",")]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), generator=g).float() / 255
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    proc, url = start_server(max(sizes), args.threads)
    try:
        local = build_reward("clip", base_model="tiny")
        remote = {b: build_reward(f"{url}?batch_size={b}&timeout=300") for b in sizes}
        for reward in (local, *remote.values()):  # warm-up: first calls load and compile lazily
            reward(images[:2], prompts[:2])
        gap = float((remote[sizes[0]](images, prompts).scores - local(images, prompts).scores).abs().max())
        runs: dict[str, list[float]] = {"in-process": [], **{f"http batch {b}": [] for b in sizes}}
        for _ in range(args.repeats):
            runs["in-process"].append(images_per_second(local, images, prompts))
            for b in sizes:
                runs[f"http batch {b}"].append(images_per_second(remote[b], images, prompts))
    finally:
        proc.kill()
        proc.wait()
    medians = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "what": "dag serve-reward clip --model tiny (built-in tiny CLIP), scored from the same process through "
                "--reward http://127.0.0.1:PORT?batch_size=B",
        "images": args.images, "size": args.size, "repeats": args.repeats, "threads": args.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "images_per_second": medians, "runs": runs, "max_abs_score_difference_http_vs_in_process": gap,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for name, value in medians.items():
        print(f"{name:>16}: {value:8.1f} images/s")
    print(f"max |http - in-process| score: {gap:.2e}; written to {args.output}")


if __name__ == "__main__":
    main()
