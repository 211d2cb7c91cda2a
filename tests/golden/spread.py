"""How far the golden runs move on other kernels: the measurement behind `runs.TOLERANCE`.

`python tests/golden/spread.py [--runs NAME ...] [--variants NAME ...] [--output JSON]` repeats every golden run in a fresh
process under each kernel variant this machine can reach that stands in for another CPU (ATen's instruction
set, MKL's code path and reproducibility mode, oneDNN's instruction set or no oneDNN, two threads), and writes
the largest relative deviation per metric and weight file from `golden.json` to `tests/golden/spread.json`
(the same measure the tolerance check applies), with tables on stdout (`--table JSON` prints them again). The
recording platform shows 0. `--variants beta-r-1.001` instead measures how far DAG's β·r scaled by 1.001 moves
the runs on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import runs  # noqa: E402

SPREAD_FILE = HERE / "spread.json"

# name -> (environment, worker options); each stands in for a CPU that dispatches other kernels.
VARIANTS = {
    "recorded": ({}, []),
    "aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, []),
    "aten-avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, []),
    "mkl-compatible": ({"MKL_CBWR": "COMPATIBLE"}, []),
    "mkl-sse4_2": ({"MKL_CBWR": "SSE4_2"}, []),
    "mkl-avx2": ({"MKL_CBWR": "AVX2"}, []),
    "mkl-instructions-avx2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, []),
    "onednn-avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, []),
    "onednn-sse41": ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, []),
    "no-onednn": ({}, ["--no-mkldnn"]),
    "all-avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
                 []),
    "threads-2": ({}, ["--threads", "2"]),
}
# Not a platform: DAG's β·r scaled by 1.001 on this one, the change the comparison must still catch.
PERTURBED = {"beta-r-1.001": ({}, ["--beta-r-scale", "1.001"])}


def worker(name: str, threads: int, mkldnn: bool, beta_r_scale: float) -> None:
    """One golden run in this process; its result as JSON on the last line of stdout."""
    import torch

    torch.backends.mkldnn.enabled = mkldnn
    with tempfile.TemporaryDirectory() as tmp, runs.beta_r_scaled(beta_r_scale):
        result = runs.run_one(name, Path(tmp), threads=threads)
    print(json.dumps(result))


def measure(name: str, variant: str) -> dict:
    """Run `name` under `variant` in a subprocess; its deviations from the golden run (`runs.deviations`)."""
    env, options = (VARIANTS | PERTURBED)[variant]
    proc = subprocess.run([sys.executable, __file__, "--worker", name, *options], env=os.environ | env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{name} under {variant} failed:\n{proc.stderr[-2000:]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = json.loads(runs.GOLDEN_FILE.read_text())[name]
    return runs.deviations(name, got, want) | {"exact": not runs.exact_mismatches(name, got, want),
                                         "platform": got["platform"]}


def largest(results: dict) -> dict:
    """The largest deviation of each quantity over all variants and runs, on the recorded path and after it."""
    out = {"on_path": {}, "diverged": {}}
    for by_run in results.values():
        for r in by_run.values():
            quantities = [(epoch <= r["on_path"], f"epoch {epoch} {key}", dev)
                          for epoch, worst in enumerate(r["epochs"], start=1) for key, dev in worst.items()]
            done = r["on_path"] == len(r["epochs"])
            quantities += [(done, f"weights {part}", dev) for part, dev in r["weights"].items()]
            for path, key, dev in quantities:
                side = out["on_path" if path else "diverged"]
                side[key] = max(side.get(key, 0.0), dev)
    return out


def _cell(side: dict, key: str) -> str:
    return f"{side[key]:.1e}" if side.get(key) else ("0" if key in side else "–")


def table(results: dict) -> str:
    """Markdown: per variant the epochs on the recorded path (per run) and its largest deviations; then per
    quantity the largest deviation over all variants, on the recorded path and after the rewards moved."""
    names = sorted(next(iter(results.values())))
    lines = [f"| variant | epochs on the recorded path ({', '.join(names)}) | largest on the path | "
             "largest after the rewards moved | bit-exact |", "|---|---|---|---|---|"]
    for variant, by_run in results.items():
        side = largest({variant: by_run})
        worst = {k: max(side[k].values(), default=None) for k in side}
        lines.append(f"| {variant} | {' '.join(str(by_run[n]['on_path']) for n in names)} | "
                     + " | ".join("–" if worst[k] is None else f"{worst[k]:.1e}" for k in ("on_path", "diverged"))
                     + f" | {'yes' if all(r['exact'] for r in by_run.values()) else 'no'} |")
    overall = largest(results)
    lines += ["", "| quantity | largest on the path | largest after the rewards moved |", "|---|---|---|"]
    for key in sorted(set(overall["on_path"]) | set(overall["diverged"])):
        lines.append(f"| {key} | {_cell(overall['on_path'], key)} | {_cell(overall['diverged'], key)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=sorted(runs.RUNS), default=sorted(runs.RUNS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS | PERTURBED), default=list(VARIANTS))
    parser.add_argument("--output", type=Path, default=SPREAD_FILE)
    parser.add_argument("--table", type=Path, metavar="JSON", help="print the tables of a written result and stop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--no-mkldnn", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--beta-r-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads, not args.no_mkldnn, args.beta_r_scale)
        return
    if args.table:
        print(table(json.loads(args.table.read_text())["results"]))
        return
    results = {}
    for variant in args.variants:
        results[variant] = {}
        for name in args.runs:
            results[variant][name] = measure(name, variant)
            print(f"{variant} {name}: {results[variant][name]['on_path']} epoch(s) on the recorded path", flush=True)
    variants = {v: {"env": e, "options": o} for v, (e, o) in (VARIANTS | PERTURBED).items() if v in results}
    args.output.write_text(json.dumps({"variants": variants, "largest": largest(results), "results": results},
                                      indent=1, sort_keys=True) + "\n")
    print(table(results))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
