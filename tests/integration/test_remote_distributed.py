"""Two training processes (torchrun, gloo on CPU) sharing one reward server: each rank has its own client, a run
finishes, and a server that dies mid-run stops both ranks with one line each, neither waiting on the other."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import ROOT
from helpers.cli import write_tiny_config
from helpers.remote import metrics, standin


def train_two(tmp_path: Path, model_dir: Path, spec: str, epochs: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`torchrun --nproc_per_node 2 -m dagcli train` of the tiny model (DDPO) -> the run, each rank's stderr."""
    cfg = write_tiny_config(tmp_path, model_dir, ["a red circle", "a blue square"],
                            train={"epochs": epochs, "algorithm": "ddpo"}, reward={"spec": spec},
                            output={"dir": str(tmp_path / "run"), "checkpoint_every": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log-dir",
           str(logs), "--redirects", "3", "-m", "dagcli", "train", "--config", str(cfg), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    ranks = [sorted(logs.rglob(f"attempt_0/{r}/stderr.log")) for r in range(2)]
    return proc, [found[0].read_text() if found else "" for found in ranks]


def test_two_processes_train_against_one_server(tmp_path, tiny_pipeline_dir):
    with standin("ok") as server:
        proc, ranks = train_two(tmp_path, tiny_pipeline_dir, server.url, epochs=1)
    assert proc.returncode == 0, proc.stderr[-3000:] + "".join(ranks)
    [line] = metrics(tmp_path / "run")
    assert line["trajectories_seen"] == 6 and line["reward_mean"] == 1.0  # 3 per rank, each scored by the server


def test_server_killed_mid_run_stops_both_ranks_cleanly(tmp_path, tiny_pipeline_dir):
    with standin("die", 2) as server:  # epoch 1: one request per rank; then it dies
        proc, ranks = train_two(tmp_path, tiny_pipeline_dir, f"{server.url}?timeout=5&retries=1&backoff=0.05",
                                epochs=3)
    assert proc.returncode != 0
    for rank, err in enumerate(ranks):
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, f"rank {rank}: {err[-3000:]}"
        assert "stopping in epoch 2" in errors[0] and "--resume" in errors[0], errors[0]
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step-000001"]
