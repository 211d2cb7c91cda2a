"""`dag train` end to end on a tiny model: metrics, checkpoints, exact resume, diffusers-loadable export."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dagcli.config import load_config
from helpers.cli import run_cli, write_tiny_config
from helpers.reward_models import uint8_by_numpy


@pytest.fixture
def tiny_config(tmp_path, tiny_pipeline_dir):
    return write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle", "a blue square"],
                             dag={"beta": 1.0, "beta_ramp_epochs": 2},
                             output={"checkpoint_every": 1, "keep_last": 2})


def test_two_epochs_write_metrics_and_checkpoints(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", tiny_config, "--epochs", "2", "-o", run], capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert lines[-1]["trajectories_seen"] == 6
    for key in ("reward_mean", "reward/compressibility_mean", "db_loss", "proximity", "grad_norm_lora",
                "grad_norm_flow", "approx_kl", "time_sampling", "time_training", "beta", "per_prompt_reward"):
        assert key in lines[-1]
    assert lines[0]["beta"] == 0.5 and lines[1]["beta"] == 1.0  # ramp over 2 epochs, first epoch > 0
    step = run / "checkpoints" / "step-000002"
    assert {p.name for p in step.iterdir()} >= {"pytorch_lora_weights.safetensors", "flow.safetensors",
                                                 "optimizer.pt", "meta.json"}
    meta = json.loads((step / "meta.json").read_text())
    assert meta["state"]["epoch"] == 2 and meta["config"]["train"]["algorithm"] == "dag-db"
    assert load_config(run / "config.toml").train.epochs == 2


def test_export_loads_in_plain_diffusers_and_matches_dag_sample(tiny_config, tiny_pipeline_dir, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    assert run_cli(["train", "--config", tiny_config, "--epochs", "1", "-o", run], capsys)[0] == 0
    out = tmp_path / "samples"
    code, _, err = run_cli(["sample", "--ckpt", run, "-p", "a red circle", "-n", "1", "--eta", "0",
                            "--steps", "5", "--guidance", "3", "-o", out], capsys)
    assert code == 0, err
    ours = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(next(out.glob("000-*.png")))).astype(int)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    base = pipe("a red circle", num_inference_steps=5, guidance_scale=3.0, eta=0.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    pipe.load_lora_weights(run / "checkpoints" / "step-000001")
    tuned = pipe("a red circle", num_inference_steps=5, guidance_scale=3.0, eta=0.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    tuned = (tuned * 255).round().astype(int)
    assert np.abs(tuned - ours).max() <= 1
    assert np.abs((base * 255).round().astype(int) - tuned).max() > 0  # the LoRA changed something


@pytest.mark.parametrize("algorithm", ["dag-kl", "ddpo"])
def test_other_algorithms_run(tiny_config, tmp_path, capsys, algorithm):
    run = tmp_path / algorithm
    code, _, err = run_cli(["train", "--config", tiny_config, "--epochs", "1", "--algorithm", algorithm,
                            "-o", run], capsys)
    assert code == 0, err
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "policy_loss" in m
    assert (run / "checkpoints" / "step-000001" / "flow.safetensors").exists() == (algorithm == "dag-kl")


def test_gradients_reach_only_lora_and_flow(tiny_config, tmp_path):
    from dagcli import api
    from dagcli.config import replace
    from dagcli.trainer import Trainer

    cfg = replace(load_config(tiny_config), "output", dir=str(tmp_path / "g"))
    plan = api.plan_config(cfg)
    trainer = Trainer(plan.config, list(plan.prompts))
    batch, _ = trainer.collect(0)
    pairs = torch.tensor([[0, 0], [1, 2], [2, 3], [0, 3]])
    loss, _ = trainer.micro_batch_loss(batch, pairs, epoch=1)
    loss.mean().backward()
    unet = trainer.raw_denoiser
    lora = [n for n, p in unet.named_parameters() if p.grad is not None]
    assert lora and all("lora" in n for n in lora)
    assert all(p.grad is None for p in trainer.model.pipe.vae.parameters())
    assert all(p.grad is None for p in trainer.model.pipe.text_encoder.parameters())
    assert all(p.grad is not None for p in trainer.raw_modules()["flow"].parameters() if p.requires_grad)
    assert not batch.rewards.requires_grad and not batch.fl_rewards.requires_grad


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--reward", "nope"], "unknown reward 'nope'"),
        (["--algorithm", "ppo"], "--algorithm ppo: valid options: dag-db, dag-kl, dag-rdb, ddpo, grpo, rtb"),
        (["--algorithm", "dag-kl", "--train-batch-size", "1"], "dag-kl needs at least 2"),
        (["--set", "train.nope=1"], "unknown key train.nope"),
        (["--prompts", "missing.txt"], "missing.txt"),
        (["--resume"], "no checkpoints to resume"),
        (["--steps", "0"], "--steps 0: must be positive"),
    ],
)
def test_bad_train_input(tiny_config, tmp_path, capsys, extra, needle):
    code, _, err = run_cli(["train", "--config", tiny_config, "-o", tmp_path / "bad", *extra], capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_report_to_sends_numeric_scalars_per_epoch(monkeypatch, tmp_path):
    from dagcli import metrics

    calls = []

    class Recorder:
        def add_scalar(self, name, value, step):
            calls.append((name, value, step))

        def flush(self):
            calls.append("flush")

    monkeypatch.setattr(metrics, "open_tracker", lambda kind, run_dir, config: Recorder())
    log = metrics.MetricsLog(tmp_path, "tensorboard", {}, reporter=None)
    log.track({"epoch": 3, "reward_mean": -1.5, "per_prompt_reward": {"a": 1.0},
                                               "beta": 2})
    assert calls == [("reward_mean", -1.5, 3), ("beta", 2.0, 3), "flush"]


def test_overlapped_rewards_equal_sequential(tiny_config, tmp_path):
    """Scoring each sampler call in a worker thread gives the same rewards, forward-looking rewards and first
    training step as scoring the whole epoch after sampling."""
    from dagcli.config import replace
    from dagcli.trainer import Trainer

    base = replace(load_config(tiny_config), "sampling", batches_per_epoch=3)
    out = {}
    for overlap in (False, True):
        cfg = replace(replace(base, "sampling", overlap_rewards=overlap), "output", dir=str(tmp_path / str(overlap)))
        trainer = Trainer(cfg, ["a red circle", "a blue square"])
        batch, _ = trainer.collect(0)
        logs = trainer.train_epoch(0, batch)
        out[overlap] = (batch, logs)
    (a, la), (b, lb) = out[False], out[True]
    assert a.traj.prompts == b.traj.prompts and a.rewards.shape == (9,)
    torch.testing.assert_close(a.rewards, b.rewards, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.fl_rewards, b.fl_rewards, rtol=0, atol=1e-6)
    assert a.components.keys() == b.components.keys() == {"compressibility"}
    torch.testing.assert_close(a.components["compressibility"], b.components["compressibility"], rtol=0, atol=1e-6)
    # each overlapped score belongs to its own image, in order: minus its JPEG size in kB (PIL, quality 95)
    torch.testing.assert_close(b.rewards, torch.tensor([-jpeg_kb(x) for x in uint8_by_numpy(b.traj.images)]),
                               rtol=0, atol=1e-6)
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)


def jpeg_kb(array: np.ndarray) -> float:
    """The size in kB of a uint8 HWC image saved by PIL as JPEG at quality 95."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_flow_warmup_leaves_lora_untouched_then_trains_it(tiny_config, tmp_path):
    from dagcli.config import replace
    from dagcli.trainer import Trainer

    cfg = replace(replace(load_config(tiny_config), "dag", flow_warmup_epochs=1), "output", dir=str(tmp_path / "w"))
    trainer = Trainer(cfg, ["a red circle", "a blue square"])

    def snapshot(module):
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    lora0, flow0 = snapshot(trainer.denoiser), snapshot(trainer.algorithm.modules["flow"])
    batch, _ = trainer.collect(0)
    logs = trainer.train_epoch(0, batch)
    lora1, flow1 = snapshot(trainer.denoiser), snapshot(trainer.algorithm.modules["flow"])
    assert logs["flow_warmup"] == 1 and "grad_norm_lora" not in logs
    assert all(torch.equal(lora0[n], lora1[n]) for n in lora0)
    assert any(not torch.equal(flow0[n], flow1[n]) for n in flow0)
    batch, _ = trainer.collect(1)
    logs = trainer.train_epoch(1, batch)
    assert logs["flow_warmup"] == 0
    assert any(not torch.equal(lora1[n], p) for n, p in snapshot(trainer.denoiser).items())
