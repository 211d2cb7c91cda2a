"""Ctrl-C at any moment: one line, exit code 130, no traceback, and the last complete checkpoint intact.

Each case runs the installed `dag` in a pipe; the SIGINTs come from the fault points (`DAGCLI_FAULT=NAME:N:INT`,
the process signals itself at that exact moment), so nothing depends on timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dagcli.checkpoint import list_checkpoints, verify_file
from helpers.cli import write_tiny_config

PLUGIN = '''
import os
import signal


class _Reward:
    slow = False

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, images, prompts, metadata=None):
        with open(os.environ["REWARD_CALLS"], "a") as f:
            f.write("call\\n")
        return self.fn(images, prompts)


def counted():
    return _Reward(lambda images, prompts: -images.mean(dim=(1, 2, 3)))


def swallows_ctrl_c():
    """Ctrl-C twice during its first call, and swallows the KeyboardInterrupt (as code in a finaliser would)."""
    calls = []

    def fn(images, prompts):
        calls.append(1)
        if len(calls) == 1:
            for _ in range(2):
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                except KeyboardInterrupt:
                    pass
        return -images.mean(dim=(1, 2, 3))
    return _Reward(fn)
'''


def dag_command() -> list[str]:
    """The installed `dag` script next to this interpreter, else `python -m dagcli`."""
    script = Path(sys.executable).parent / "dag"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dagcli"]


def run_dag(args: list, cwd: Path, fault: str = "", **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                   "DAGCLI_FAULT": fault, "REWARD_CALLS": str(cwd / "reward-calls.txt"), **env}
    return subprocess.run([*dag_command(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=environment, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pipeline_dir) -> Path:
    """A tiny training preset: 3 trajectories of 4 steps, 3 micro-batches and 2 optimiser steps per epoch, a
    checkpoint every epoch; and the reward plugins."""
    d = tmp_path_factory.mktemp("interrupts")
    write_tiny_config(d, tiny_pipeline_dir, ["a red circle", "a blue square"],
                      train={"epochs": 5}, output={"checkpoint_every": 1, "keep_last": 5})
    (d / "plug.py").write_text(PLUGIN)
    return d


def interrupted_line(run: subprocess.CompletedProcess) -> str:
    """The one line that says the command was interrupted; nothing else looks like an error."""
    assert run.returncode == 130, run.stderr
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith(("interrupted", "error"))]
    assert len(lines) == 1, run.stderr
    return lines[0]


def steps(run_dir: Path) -> list[int]:
    return [s for s, _ in list_checkpoints(run_dir)]


def assert_complete(run_dir: Path) -> None:
    """Every checkpoint left is whole: each file its meta.json lists matches its checksum; no temporary folder."""
    for _, folder in list_checkpoints(run_dir):
        meta = json.loads((folder / "meta.json").read_text())
        assert {"pytorch_lora_weights.safetensors", "flow.safetensors", "optimizer.pt"} <= set(meta["sha256"])
        for name in meta["sha256"]:
            verify_file(folder, name, meta)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        [f"step-{s:06d}" for s in steps(run_dir)]  # nothing half deleted either


COMMANDS = {  # (folder, model) -> arguments
    "train": lambda d, model: ["train", "--config", d / "tiny.toml", "-o", d / "out-train"],
    "sample": lambda d, model: ["sample", "-p", "a red circle", "--model", model, "-o", d / "out-sample"],
    "eval": lambda d, model: ["eval", "-p", "a red circle", "--model", model, "-r", "compressibility",
                              "--embed-model", "none", "-o", d / "out-eval"],
}


@pytest.mark.parametrize("point", ["start:1", "model-load:1", "sampler-step:2"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_ctrl_c_at_start_up_or_while_sampling_exits_130_with_one_line(setup, tiny_pipeline_dir, command, point):
    """While importing, loading the model and sampling; every command leaves its output folder unwritten."""
    run = run_dag(COMMANDS[command](setup, tiny_pipeline_dir), setup, f"{point}:INT")
    line = interrupted_line(run)
    if command == "train" and point == "sampler-step:2":  # the first Ctrl-C of training waits for the epoch
        assert line.startswith("interrupted: stopped after epoch 1; the last checkpoint is ")
        return
    assert line == "interrupted" and run.stdout == ""
    assert not (setup / f"out-{command}").exists()


def test_first_ctrl_c_in_training_saves_the_epoch_and_exits_130(setup, tmp_path):
    run = run_dag(["train", "--config", setup / "tiny.toml", "-o", tmp_path / "run"], tmp_path,
                  "optimizer-step:3:INT")  # epoch 2's first optimiser step
    folder = tmp_path / "run" / "checkpoints" / "step-000002"
    assert interrupted_line(run) == (f"interrupted: stopped after epoch 2; the last checkpoint is {folder} "
                                     "(epoch 2); resume with --resume")
    assert "warning: stopping after this epoch with a checkpoint" in run.stderr
    assert steps(tmp_path / "run") == [1, 2]
    assert_complete(tmp_path / "run")
    resumed = run_dag(["train", "--config", setup / "tiny.toml", "-o", tmp_path / "run", "--resume", "--epochs", "3"],
                      tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {folder} (epoch 2)" in resumed.stderr and steps(tmp_path / "run") == [1, 2, 3]


@pytest.mark.parametrize("second, kept", [
    ("optimizer-step:4", [1]),  # in the middle of epoch 2: at once
    ("checkpoint-write:2", [1]),  # while epoch 2's checkpoint is written: it is dropped, epoch 1's stays
    ("checkpoint-rename:2", [2]),  # while it is renamed into place: that finishes first (and prunes the old one)
])
def test_second_ctrl_c_stops_at_once_and_keeps_the_last_complete_checkpoint(setup, tmp_path, second, kept):
    run = run_dag(["train", "--config", setup / "tiny.toml", "-o", tmp_path / "run", "--set", "output.keep_last=1"],
                  tmp_path, f"optimizer-step:3:INT,{second}:INT")
    folder = tmp_path / "run" / "checkpoints" / f"step-{kept[-1]:06d}"
    assert interrupted_line(run) == (f"interrupted: stopped at once; the last checkpoint is {folder} "
                                     f"(epoch {kept[-1]}); resume with --resume")
    assert steps(tmp_path / "run") == kept
    assert_complete(tmp_path / "run")


def test_a_swallowed_keyboard_interrupt_still_stops_the_run(setup, tmp_path):
    """The reward swallows both Ctrl-Cs' KeyboardInterrupt: the run still stops at once, in epoch 1."""
    run = run_dag(["train", "--config", setup / "tiny.toml", "-o", tmp_path / "run", "--reward",
                   f"{setup / 'plug.py'}:swallows_ctrl_c"], tmp_path)
    assert interrupted_line(run) == "interrupted: stopped at once; no checkpoint was saved yet"
    assert steps(tmp_path / "run") == []


def test_ctrl_c_stops_the_background_reward_worker(setup, tmp_path):
    """With rewards scored in a worker thread, the queued sampler calls are dropped and the worker stops."""
    run = run_dag(["train", "--config", setup / "tiny.toml", "-o", tmp_path / "run", "--reward",
                   f"{setup / 'plug.py'}:counted", "--set", "sampling.overlap_rewards=true",
                   "--set", "sampling.batches_per_epoch=8", "--set", "sampling.batch_size=1",
                   "--train-batch-size", "4"], tmp_path, "reward:1:INT,reward:2:INT")
    assert interrupted_line(run) == "interrupted: stopped at once; no checkpoint was saved yet"
    calls = (tmp_path / "reward-calls.txt").read_text().splitlines()
    # the second Ctrl-C came at the second of about 40 calls (8 sampler calls, each its images and 3 x0 states)
    assert 2 <= len(calls) < 20
