"""Mutation checks: each change below breaks the training arithmetic on purpose; the tests named beside it must
fail. Every mutation is applied by text substitution to a copy of `src/` in a temporary folder (the working tree
is never edited), the tests run against that copy with `pytest -x -q`, and a table says which were caught.

    make mutations                                   # all of them
    .venv/bin/python tests/helpers/mutations.py ddpo beta    # those whose name contains 'ddpo' or 'beta'
    .venv/bin/python tests/helpers/mutations.py --tests tests/   # every mutation against the whole suite

Not collected by pytest (no `test_` prefix). Exit code 0 when every mutation is caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

LOSSES = "dagcli/algorithms/losses.py"
DDPO = "dagcli/algorithms/ddpo.py"
DDIM = "dagcli/kernels/ddim.py"
DAG = "dagcli/algorithms/dag.py"
ROLLOUT = "dagcli/rollout.py"
CONFIG = "dagcli/config.py"
T_LOSSES = ("tests/unit/algorithms/test_losses.py",)
T_DDPO = ("tests/unit/algorithms/test_arithmetic.py", "-k", "ddpo")
T_TRANSITIONS = ("tests/unit/algorithms/test_arithmetic.py", "-k", "transition or beta or accumulation")
T_DDIM = ("tests/unit/kernels/test_diffusion.py", "-k", "by_hand")


@dataclass(frozen=True)
class Mutation:
    """Replace `old` (found exactly once) by `new` in `file` (relative to src/); `tests` must fail."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    # DDPO's per-prompt advantages
    Mutation("ddpo: advantages all zero", DDPO, "return adv.clamp(-clip, clip)", "return torch.zeros_like(adv)",
             T_DDPO),
    Mutation("ddpo: advantages not clipped", DDPO, "return adv.clamp(-clip, clip)", "return adv", T_DDPO),
    Mutation("ddpo: epsilon 1e-6 -> 1e-3 (buffer)", DDPO, "(buf.std() + 1e-6)", "(buf.std() + 1e-3)", T_DDPO),
    Mutation("ddpo: epsilon 1e-6 -> 1e-3 (batch)", DDPO, "(g_std + 1e-6)", "(g_std + 1e-3)", T_DDPO),
    Mutation("ddpo: buffer not capped", DDPO, "deque(buffers.get(p, []), maxlen=buffer_size)",
             "deque(buffers.get(p, []))", T_DDPO),
    Mutation("ddpo: min_count not capped by buffer_size", DDPO, "len(buf) >= min(min_count, buffer_size)",
             "len(buf) >= min_count", T_DDPO),
    Mutation("ddpo: biased batch std", DDPO, "rewards.std() if", "rewards.std(correction=0) if", T_DDPO),
    # DB, the forward-looking flow, proximity
    Mutation("db: sign of log_pb flipped", LOSSES, "log_f_s - log_pb.detach()", "log_f_s + log_pb.detach()",
             T_LOSSES),
    Mutation("forward-looking flow without beta", LOSSES, "flow_value + beta * fl_reward.detach()",
             "flow_value + fl_reward.detach()", T_LOSSES),
    Mutation("proximity: sum instead of mean", LOSSES, "** 2).flatten(1).mean(1)", "** 2).flatten(1).sum(1)",
             T_LOSSES),
    # DAG-KL and the surrogate
    Mutation("dag-kl: leave-one-out baseline includes the sample", LOSSES, "baseline = (v.sum() - v) / (n - 1)",
             "baseline = v.mean()", T_LOSSES),
    Mutation("dag-kl: leave-one-out std includes the sample", LOSSES, "var = (sq.sum() - sq) / (n - 1)",
             "var = sq.mean()", T_LOSSES),
    Mutation("dag-kl: advantages not clipped", LOSSES, "(var.sqrt() + 1e-8)).clamp(-clip, clip)",
             "(var.sqrt() + 1e-8))", T_LOSSES),
    Mutation("dag-kl: flow loss with log P_F not detached", LOSSES, "db_loss(log_f_t, log_pf.detach(),",
             "db_loss(log_f_t, log_pf,", T_LOSSES),
    Mutation("dag-kl: per-transition b with its sign flipped", LOSSES, "b = (log_f_s + log_pb - log_pf - log_f_t)",
             "b = (log_f_t + log_pf - log_f_s - log_pb)", T_LOSSES),
    Mutation("surrogate: min instead of max", LOSSES, "torch.maximum(unclipped, clipped)",
             "torch.minimum(unclipped, clipped)", T_LOSSES),
    Mutation("surrogate: ratio not clipped", LOSSES, "ratio.clamp(1.0 - clip_range, 1.0 + clip_range)", "ratio",
             T_LOSSES),
    # the DDIM step and the backward kernel
    Mutation("ddim: std without eta", DDIM, "std = (eta * variance.sqrt()).float()",
             "std = variance.sqrt().float()", T_DDIM),
    Mutation("ddim: mean ignores the std", DDIM, "(1 - a_s_b - std_b**2) ** 0.5 * eps", "(1 - a_s_b) ** 0.5 * eps",
             T_DDIM),
    Mutation("ddim: last step uses alphas_cumprod[0]", DDIM,
             "torch.where(t >= 0, out, torch.full_like(out, self.final_alpha_cumprod))", "out", T_DDIM),
    Mutation("ddim: x0 not clipped", DDIM,
             "pred_x0 = pred_x0.clamp(-schedule.clip_sample, schedule.clip_sample)", "pred_x0 = pred_x0",
             T_DDIM),
    Mutation("backward kernel: mean without sqrt", DDIM, "bcast(ratio.sqrt().float(), x_s) * x_s",
             "bcast(ratio.float(), x_s) * x_s", T_DDIM),
    Mutation("backward kernel: variance as std", DDIM, "std = (1 - ratio).sqrt().float()",
             "std = (1 - ratio).float()", T_DDIM),
    # the β ramp, the transitions an epoch trains on, the micro-batches per optimiser step
    Mutation("beta ramp starts at 0", DAG, "min(1.0, (epoch + 1) / ramp_epochs)", "min(1.0, epoch / ramp_epochs)",
             T_TRANSITIONS),
    Mutation("timestep_fraction rounded instead of floored", CONFIG, "max(1, int(steps * fraction + 1e-9))",
             "max(1, round(steps * fraction))", T_TRANSITIONS),
    Mutation("accumulation not scaled by timestep_fraction", CONFIG,
             "round(accumulation * transitions_per_trajectory(steps, fraction) / steps)", "accumulation",
             T_TRANSITIONS),
    Mutation("always_last_step ignored", ROLLOUT, "chosen[-1] = steps - 1", "pass", T_TRANSITIONS),
)


def copy_src(dest: Path) -> Path:
    """A copy of src/ (no bytecode, no egg-info) under `dest`; returns the copy's src folder."""
    src = dest / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return src


def environment(src: Path) -> dict[str, str]:
    """Subprocess environment importing dagcli from `src` first; no bytecode, so an edit is always seen."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def check_import_path(src: Path) -> None:
    """Stop unless `import dagcli` in a subprocess resolves to the copy (not the installed working tree)."""
    out = subprocess.run([sys.executable, "-c", "import dagcli; print(dagcli.__file__)"], env=environment(src),
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(src.resolve()):
        sys.exit(f"dagcli is imported from {out}, not from the copy in {src}: cannot run mutations")


def run_tests(src: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """(pytest's exit code, its output) for `tests` against the copy in `src`."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.run(cmd, cwd=ROOT, env=environment(src), capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def first_failure(output: str) -> str:
    """The first failing test's id in pytest's output, else its last line."""
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return match.group(1) if match else output.strip().splitlines()[-1] if output.strip() else "(no output)"


def apply(src: Path, m: Mutation) -> str | None:
    """Write the mutated file into the copy; returns the original text, or None unless `old` occurs exactly once
    (the source changed: the mutation needs updating)."""
    path = src / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        return None
    path.write_text(text.replace(m.old, m.new))
    return text


def check(src: Path, m: Mutation, tests: tuple[str, ...]) -> tuple[str, str]:
    """(verdict, detail) of one mutation: caught, SURVIVED, NOT APPLIED or ERROR; the copy is restored after."""
    original = apply(src, m)
    if original is None:
        return "NOT APPLIED", f"{m.old!r} does not occur exactly once in src/{m.file}"
    try:
        code, output = run_tests(src, tests)
    finally:
        (src / m.file).write_text(original)
    if code == 1:
        return "caught", first_failure(output)
    if code == 0:
        return "SURVIVED", "all selected tests passed"
    return "ERROR", f"pytest exit code {code}: {first_failure(output)}"


def unmutated_failure(src: Path, test_sets: list[tuple[str, ...]]) -> str | None:
    """The first test that fails without any mutation (then no verdict means anything), or None."""
    for tests in test_sets:
        code, output = run_tests(src, tests)
        if code != 0:
            return f"{' '.join(tests)}: {first_failure(output)}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only mutations whose name contains one of these")
    parser.add_argument("--tests", nargs="+", help="pytest arguments to run for every mutation instead of its own")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or any(n in m.name for n in args.names)]
    if not chosen:
        parser.error(f"no mutation name contains any of {args.names}; names: {', '.join(m.name for m in MUTATIONS)}")
    tests_of = {m.name: tuple(args.tests) if args.tests else m.tests for m in chosen}
    with tempfile.TemporaryDirectory(prefix="dagcli-mutations-") as tmp:
        src = copy_src(Path(tmp))
        check_import_path(src)
        print(f"{len(chosen)} mutations; tests run against a copy of src/ in {tmp}", flush=True)
        failure = unmutated_failure(src, sorted(set(tests_of.values())))
        if failure:
            print(f"the unmutated source already fails {failure}")
            return 1
        width = max(len(m.name) for m in chosen)
        verdicts = []
        for m in chosen:
            t0 = time.perf_counter()
            verdict, detail = check(src, m, tests_of[m.name])
            verdicts.append(verdict)
            print(f"{verdict:<11}  {m.name:<{width}}  {time.perf_counter() - t0:5.1f}s  {detail}", flush=True)
    print(f"{verdicts.count('caught')}/{len(verdicts)} mutations caught")
    return 0 if verdicts.count("caught") == len(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
