"""The cost of a dag-rdb transition against a DAG-DB one, as a ratio measured in the same process: one trainer on
the built-in tiny model, one sampled batch, the two losses (+ backward) timed interleaved on the same micro-batch.
dag-rdb adds one forward of the frozen base model (the LoRA off) per trained transition, with no backward.

    python benchmarks/relative_cost.py [--repeats 25] [--steps 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ALGORITHMS = ("dag-db", "dag-rdb")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=25, help="timed repeats per algorithm (the first 5 warm up)")
    p.add_argument("--steps", type=int, default=10, help="sampler steps of the trajectories")
    a = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from cli_helpers import write_tiny_config
    from dagcli.algorithms import build_algorithm
    from dagcli.commands.train import preflight
    from dagcli.config import load_config, replace
    from dagcli.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_config(tmp, "tiny", ["a red circle", "a blue square"], train={"batch_size": 4},
                                 sampling={"batch_size": 4, "steps": a.steps})
        cfg, prompts, _ = preflight(replace(load_config(path), "output", dir=f"{tmp}/run"), False, None)
        trainer = Trainer(cfg, prompts)
        batch, _ = trainer.collect(0)
        pairs = batch.pairs[:4]
        algorithms = {n: build_algorithm(n, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, algorithm=n)),
                                         trainer.context) for n in ALGORITHMS}
        for alg in algorithms.values():
            alg.modules = trainer.algorithm.modules
        times: dict[str, list[float]] = {n: [] for n in ALGORITHMS}
        for r in range(a.repeats):
            for name, alg in algorithms.items():
                trainer.algorithm = alg
                start = time.perf_counter()
                loss, _ = trainer.micro_batch_loss(batch, pairs, epoch=1)
                loss.mean().backward()
                if r >= 5:
                    times[name].append((time.perf_counter() - start) / len(pairs))
                trainer.optimizer.zero_grad(set_to_none=True)
    seconds = {n: statistics.median(v) for n, v in times.items()}
    result = {"seconds_per_transition": seconds, "ratio_rdb_vs_db": seconds["dag-rdb"] / seconds["dag-db"]}
    print(f"dag-db {seconds['dag-db'] * 1e3:.1f} ms, dag-rdb {seconds['dag-rdb'] * 1e3:.1f} ms per transition; "
          f"ratio dag-rdb / dag-db {result['ratio_rdb_vs_db']:.2f}")
    return result


if __name__ == "__main__":
    main()
