"""`make demo` runs what benchmarks/demo_figures.py measured for the README: the same commands, the same threads."""

from __future__ import annotations

import re
import shlex
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import demo_figures  # noqa: E402


def demo_recipe() -> tuple[list[str], list[list[str]]]:
    """The `demo` target of the Makefile: its `export` lines, and each `dag` command's arguments."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    exports = re.findall(r"^demo: export (\w+) := (\S+)$", text, flags=re.M)
    recipe = text.split("\ndemo: $(STAMP)\n", 1)[1].split("\n\n", 1)[0]
    commands = [shlex.split(line)[1:] for line in recipe.splitlines() if line.strip().startswith("$(BIN)/dag ")]
    return exports, commands


def test_make_demo_runs_the_measured_commands_with_the_measured_thread_count():
    exports, commands = demo_recipe()
    demo = demo_figures.DEMOS["tiny"]
    assert commands == [demo.train_args, demo.eval_args]
    assert dict(exports) == {"OMP_NUM_THREADS": str(demo_figures.DEMO_THREADS),
                             "MKL_NUM_THREADS": str(demo_figures.DEMO_THREADS)}
    readme = (ROOT / "README.md").read_text()
    assert f"`python benchmarks/demo_figures.py --threads {demo_figures.DEMO_THREADS}`" in readme
