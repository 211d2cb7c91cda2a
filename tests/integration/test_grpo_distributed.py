"""GRPO with two training processes on CPU (torchrun, gloo): groups stay within a process, the base-model reference
(LoRA switched off on the unwrapped network) works under DDP, and both processes end with the same LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers.cli import train_two_processes, write_tiny_config

HERE = Path(__file__).parent


def test_two_processes_train_grpo_in_step(tmp_path, tiny_pipeline_dir):
    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle", "a blue square", "a green triangle"],
                            sampling={"batch_size": 4}, train={"epochs": 2, "algorithm": "grpo"},
                            grpo={"group_size": 2}, output={"dir": str(tmp_path / "run")})
    ranks = train_two_processes(cfg, tmp_path / "dumps")
    a, b = ranks[0]["lora"], ranks[1]["lora"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    for rank in ranks:
        for epoch in rank["record"]:
            p = epoch["prompts"]  # rank 1 dropped its first trajectory (a NaN reward) in epoch 0
            pairs = [p[i : i + 2] for i in range(len(p) % 2, len(p), 2)]
            assert all(x == y for x, y in pairs)  # whole groups of one prompt in each process
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["trajectories_seen"] for m in lines] == [7, 15] and all("kl_loss" in m for m in lines)
