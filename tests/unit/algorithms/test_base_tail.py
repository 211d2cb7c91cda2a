"""`rtb.tail_steps` and `dag.tail_steps`: the last k steps are the base model's, in training, in the checkpoint
and in `dag sample`, so that the trained objective's log ratio over the tail is exactly 0."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.cli import run_cli, write_tiny_config

PROMPTS = ["a red circle", "a blue square"]


def _config(tmp_path, tiny_pipeline_dir, algorithm: str):
    tail = {"rtb": {"tail_steps": 1, "log_z": "vargrad", "group_size": 3, "beta": 1.0}} if algorithm == "rtb" else \
        {"dag": {"tail_steps": 1, "beta": 1.0, "flow_warmup_epochs": 0}}
    return write_tiny_config(tmp_path, tiny_pipeline_dir, PROMPTS, train={"algorithm": algorithm, "epochs": 1},
                             output={"checkpoint_every": 1}, **tail)


@pytest.mark.parametrize("algorithm", ["rtb", "dag-rdb"])
def test_a_trained_lora_leaves_the_tail_to_the_base_model(algorithm, tmp_path, tiny_pipeline_dir):
    """After an epoch the LoRA has moved (its log ratio on the trained steps is not 0) yet every step of the tail
    of a fresh epoch's trajectories is the base model's step; and only trained steps are trained."""
    from dagcli.algorithms.base import transition_batch
    from dagcli.config import load_config, replace
    from dagcli.trainer import Trainer

    cfg = replace(load_config(_config(tmp_path, tiny_pipeline_dir, algorithm)), "output", dir=str(tmp_path / "r"))
    trainer = Trainer(cfg, PROMPTS)
    assert trainer.rollout.lora_steps == 3
    batch, _ = trainer.collect(0)
    assert len(batch.pairs) and int(batch.pairs[:, 1].max()) < 3  # the tail's transitions are not trained
    trainer.train_epoch(0, batch)
    batch, _ = trainer.collect(1)
    n = batch.traj.batch_size
    every = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    mb = transition_batch(batch, every, trainer.model.device)
    ratio = (batch.traj.log_probs[every[:, 0], every[:, 1]] - trainer.reference_step(mb).log_prob).reshape(n, 4)
    assert float(ratio[:, 3].abs().max()) < 1e-5  # the recorded tail step is the base model's (up to rounding)
    assert float(ratio[:, :3].abs().max()) > 1e-3  # the trained steps are the LoRA's


@pytest.mark.parametrize("algorithm", ["rtb", "dag-rdb"])
def test_the_checkpoint_records_the_tail_and_dag_sample_honours_it(algorithm, tmp_path, tiny_pipeline_dir, capsys):
    """meta.json says the LoRA samples 3 of 4 steps; `dag sample --ckpt` at 4 steps and at 8 switches it off
    for the last 1 and 2 (the same fraction of the chain), as its manifest records; a run without a tail says
    nothing and samples every step with it."""
    from dagcli.checkpoint import lora_steps_for, read_meta

    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", _config(tmp_path, tiny_pipeline_dir, algorithm), "-o", run], capsys)
    assert code == 0, err
    ckpt = run / "checkpoints" / "step-000001"
    assert read_meta(ckpt)["lora"]["steps"] == [3, 4]
    assert lora_steps_for(ckpt, 4) == 3 and lora_steps_for(ckpt, 8) == 6 and lora_steps_for(None, 8) is None
    for steps, expected in [(4, 3), (8, 6)]:
        out = tmp_path / f"s{steps}"
        code, _, err = run_cli(["sample", "--ckpt", run, "-p", "a red circle", "-n", "1", "--steps", str(steps),
                                "--model", str(tiny_pipeline_dir), "-o", out], capsys)
        assert code == 0, err
        record = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
        assert record["settings"]["lora_steps"] == expected


def test_a_run_without_a_tail_records_none(tmp_path, tiny_pipeline_dir, capsys):
    from dagcli.checkpoint import read_meta, trained_lora_steps

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, PROMPTS, train={"algorithm": "rtb", "epochs": 1},
                            rtb={"log_z": "vargrad", "group_size": 3, "beta": 1.0})
    run = tmp_path / "run"
    assert run_cli(["train", "--config", cfg, "-o", run], capsys)[0] == 0
    ckpt = run / "checkpoints" / "step-000001"
    assert "steps" not in read_meta(ckpt)["lora"] and trained_lora_steps(ckpt) is None
