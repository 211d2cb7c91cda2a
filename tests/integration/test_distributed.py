"""Two training processes on CPU (gloo, started by torchrun): own data per rank, one shared model, one writer.

The run (tests/helpers/dist_train.py) injects a NaN reward on rank 1 and a NaN loss on rank 0, so the ranks hold
different numbers of trajectories and one skips a micro-batch; they must still stay in step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers.cli import train_two_processes, write_tiny_config

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_pipeline_dir):
    """Train 2 epochs with 2 processes -> (run dir, [rank 0 dump, rank 1 dump])."""
    root = tmp_path_factory.mktemp("dist")
    cfg = write_tiny_config(root, tiny_pipeline_dir, ["a red circle", "a blue square", "a green triangle"],
                            train={"epochs": 2}, output={"dir": str(root / "run")})
    ranks = train_two_processes(cfg, root / "dumps")
    return root / "run", ranks


def test_each_rank_draws_its_own_noise(two_ranks):
    _, ranks = two_ranks
    assert [r["world"] for r in ranks] == [2, 2]
    for epoch in range(2):
        a, b = (r["record"][epoch] for r in ranks)
        assert a["epoch"] == b["epoch"] == epoch
        assert not torch.allclose(a["noise"][:2], b["noise"][:2])  # rank 1 dropped its first trajectory
    assert not torch.allclose(ranks[0]["record"][0]["noise"], ranks[0]["record"][1]["noise"])  # and per epoch


def test_weights_identical_across_ranks_after_training(two_ranks):
    run, ranks = two_ranks
    for part in ("lora", "flow"):
        a, b = ranks[0][part], ranks[1][part]
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert any(v.abs().max() > 0 for k, v in ranks[0]["lora"].items() if "lora_B" in k)  # it did train
    from safetensors.torch import load_file

    saved = load_file(run / "checkpoints" / "step-000002" / "flow.safetensors")
    for k, v in ranks[1]["flow"].items():
        torch.testing.assert_close(saved[k], v.float(), rtol=0, atol=0)


def test_one_metrics_line_per_epoch_over_all_ranks(two_ranks):
    run, ranks = two_ranks
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert [m["trajectories_seen"] for m in lines] == [5, 11]  # 3 + 2 (a NaN reward dropped), then 3 + 3
    assert lines[0]["nonfinite_rewards"] == 1 and lines[0]["skipped_micro_batches"] == 1
    assert [m["optimizer_steps"] for m in lines] == [1, 3]  # 8 transitions per rank, then 12; accumulation 2
    for epoch, m in enumerate(lines):
        rewards = torch.cat([r["record"][epoch]["rewards"] for r in ranks])
        assert m["reward_mean"] == pytest.approx(float(rewards.mean()), abs=1e-6)
        prompts = {p for r in ranks for p in r["record"][epoch]["prompts"]}
        assert set(m["per_prompt_reward"]) == prompts
    files = {p.name for p in run.iterdir()}
    assert files == {"config.toml", "metrics.jsonl", "checkpoints"}


def test_single_process_cpu_launch_is_detected():
    from dagcli.__main__ import single_cpu_launch

    launched = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert single_cpu_launch(launched)
    assert not single_cpu_launch({**launched, "WORLD_SIZE": "2"})
    assert not single_cpu_launch({"ACCELERATE_USE_CPU": "True"})
