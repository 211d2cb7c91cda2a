"""`train.lr_schedule` / `train.lr_warmup_epochs`: the multiple by hand, every group's rate in a run, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dagcli.config import load_config
from dagcli.errors import DagError
from dagcli.optim import lr_factor
from helpers.cli import run_cli, write_tiny_config

PROMPTS = ["a red circle", "a blue square"]


@pytest.mark.parametrize("schedule, progress, warmup, want", [
    ("constant", 0.7, 0.0, 1.0),
    ("cosine", 0.0, 0.0, 1.0),
    ("cosine", 0.5, 0.0, 0.5),
    ("cosine", 0.25, 0.0, (1 + math.sqrt(0.5)) / 2),
    ("cosine", 1.0, 0.0, 0.0),
    ("linear", 0.25, 0.0, 0.75),
    ("linear", 1.0, 0.0, 0.0),
    ("constant", 0.05, 0.2, 0.25),  # the warm-up rises from 0 to 1 over its share of the run
    ("cosine", 0.1, 0.2, 0.5),
    ("cosine", 0.6, 0.2, 0.5),  # half-way through what is left after the warm-up
    ("linear", 0.8, 0.2, 0.25),
    ("constant", 0.5, 0.2, 1.0),
])
def test_the_multiple_by_hand(schedule, progress, warmup, want):
    assert lr_factor(schedule, progress, warmup) == pytest.approx(want, abs=1e-12)


def test_an_unknown_schedule_is_refused():
    with pytest.raises(DagError, match="valid options: constant, cosine, linear"):
        lr_factor("exponential", 0.5, 0.0)


def _config(tmp_path, tiny_pipeline_dir, name, **train):
    folder = tmp_path / name
    folder.mkdir()
    cfg = write_tiny_config(folder, tiny_pipeline_dir, PROMPTS, dag={"beta": 1.0}, lora={"init": "true"},
                            output={"checkpoint_every": 1, "dir": str(folder / "run")},
                            train={"epochs": 3, **train})
    return load_config(cfg)


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.raw_denoiser.named_parameters() if v.requires_grad}


def test_every_group_follows_the_schedule_at_each_step(tmp_path, tiny_pipeline_dir):
    """3 trajectories × 4 steps = 12 transitions, micro-batches of 4, 2 per step: 2 optimiser steps an epoch, at
    the midpoints 1/4 and 3/4 of the epoch; the LoRA's and the flow network's rates both take the multiple."""
    from dagcli.trainer import Trainer

    cfg = _config(tmp_path, tiny_pipeline_dir, "cos", lr_schedule="cosine", lr_warmup_epochs=0.5)
    trainer = Trainer(cfg, PROMPTS)
    seen = []
    real = trainer._optimizer_step

    def record(*args):
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
        return real(*args)

    trainer._optimizer_step = record
    trainer.train(until_epoch=2)
    base = (3e-2, 1e-2)  # write_tiny_config's LoRA and flow rates
    warm = 0.5 / 3
    want = []
    for p in (0.25 / 3, 0.75 / 3, 1.25 / 3, 1.75 / 3):
        f = p / warm if p < warm else 0.5 * (1 + math.cos(math.pi * (p - warm) / (1 - warm)))
        want.append([b * f for b in base])
    assert len(seen) == len(want)
    for got, expected in zip(seen, want, strict=True):
        assert got == pytest.approx(expected, rel=1e-12)
    logged = [json.loads(x)["learning_rate"] for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([w[0] for w in want[1::2]], rel=1e-12)  # each epoch's last step


def test_a_resumed_run_steps_as_an_unbroken_one(tmp_path, tiny_pipeline_dir):
    """3 epochs straight equal 1 epoch, a new process resuming the checkpoint, then 2 more, with a cosine
    schedule; and the schedule changes what is learned (the same run at a constant rate ends elsewhere)."""
    from dagcli.trainer import Trainer

    straight = Trainer(_config(tmp_path, tiny_pipeline_dir, "a", lr_schedule="cosine"), PROMPTS)
    straight.train()
    broken = Trainer(_config(tmp_path, tiny_pipeline_dir, "b", lr_schedule="cosine"), PROMPTS)
    broken.train(until_epoch=1)
    resumed = Trainer(broken.config, PROMPTS)
    resumed.resume(broken.run_dir / "checkpoints" / "step-000001")
    resumed.train()
    constant = Trainer(_config(tmp_path, tiny_pipeline_dir, "c"), PROMPTS)
    constant.train()
    a, b, c = _lora(straight), _lora(resumed), _lora(constant)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4


def test_a_bad_schedule_is_one_line(tmp_path, tiny_pipeline_dir, capsys):
    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, PROMPTS)
    code, _, err = run_cli(["train", "--config", cfg, "--set", "train.lr_schedule=cosin", "-o", tmp_path / "r"],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "train.lr_schedule" in err and "cosine" in err
    code, _, err = run_cli(["train", "--config", cfg, "--set", "train.lr_warmup_epochs=-1", "-o", tmp_path / "r"],
                           capsys)
    assert code == 2 and "train.lr_warmup_epochs" in err and "must not be negative" in err


def test_extending_a_scheduled_run_says_the_schedule_follows_the_new_length(tmp_path, tiny_pipeline_dir, capsys):
    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, PROMPTS, train={"lr_schedule": "linear"})
    run = tmp_path / "r"
    assert run_cli(["train", "--config", cfg, "--epochs", "1", "-o", run], capsys)[0] == 0
    code, _, err = run_cli(["train", "-o", run, "--resume", "--epochs", "2"], capsys)
    assert code == 0, err
    assert ("train.lr_schedule 'linear' follows train.epochs: from the checkpoint on, the learning rate is that "
            "of a 2-epoch run at the same epoch") in " ".join(err.split())
