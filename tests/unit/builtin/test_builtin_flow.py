"""The built-in rectified-flow model `tiny-flow`: the shipped SD3 folder, its defaults, dagcli's sampler against
the plain pipeline, one DAG-DB epoch on it, and its training script."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_builtin import _one_torch_thread  # noqa: F401 (autouse: one torch thread, as there)

from dagcli.builtin import TINY_FLOW_DIR, TINY_FLOW_NAME, TINY_SD_DIR
from helpers import ROOT
from helpers.cli import run_cli, write_tiny_config

MAX_FOLDER_BYTES = 15 * 1024 * 1024  # safetensors of the tiny-flow folder, shared VAE / text encoders included
PROMPT = "a red triangle on a gray background"


@pytest.fixture(scope="module")
def plain_pipe():
    """The shipped folder loaded by diffusers alone, offline (T5 recorded as absent, passed as None)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(TINY_FLOW_DIR, text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_is_an_sd3_pipeline_without_t5_within_budget(plain_pipe) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    assert isinstance(plain_pipe.transformer, SD3Transformer2DModel)
    assert isinstance(plain_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert plain_pipe.text_encoder_3 is None and plain_pipe.vae.config.shift_factor != 0
    weights = [p for p in TINY_FLOW_DIR.rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    assert sum(p.stat().st_size for p in weights) <= MAX_FOLDER_BYTES
    assert not any(p.suffix in {".bin", ".pt", ".pth", ".ckpt"} for p in TINY_FLOW_DIR.rglob("*"))


def test_shares_the_tiny_models_vae_and_text_towers(plain_pipe) -> None:
    from diffusers import StableDiffusionPipeline

    tiny = StableDiffusionPipeline.from_pretrained(TINY_SD_DIR)
    for name, value in tiny.vae.state_dict().items():
        assert torch.equal(value, plain_pipe.vae.state_dict()[name]), name
    for name, value in tiny.text_encoder.state_dict().items():
        assert torch.equal(value, plain_pipe.text_encoder_2.text_model.state_dict()[name]), name


def test_model_defaults_come_from_its_dagcli_json() -> None:
    from dagcli.models import known_family, model_defaults

    saved = json.loads((TINY_FLOW_DIR / "dagcli.json").read_text())
    d = model_defaults(TINY_FLOW_NAME)
    assert (d.steps, d.guidance, d.eta, d.sample_eta, d.resolution) == (
        saved["default_steps"], saved["default_guidance"], saved["default_eta"], saved["default_sample_eta"], 32)
    assert (d.prompts, d.eval_prompts, d.source) == ("shapes", "shapes-heldout", "model 'tiny-flow'")
    assert known_family(TINY_FLOW_NAME).name == "sd3" and d.max_eta is None


def test_shipped_folder_comes_from_the_scripts_default_configuration(plain_pipe) -> None:
    from dataclasses import asdict

    from train_flow import FlowConfig

    saved = json.loads((TINY_FLOW_DIR / "dagcli.json").read_text())
    assert saved["train_config"] == json.loads(json.dumps(asdict(FlowConfig())))
    assert plain_pipe.scheduler.config.shift == FlowConfig().shift
    assert plain_pipe.transformer.config.num_layers == FlowConfig().layers


def test_dagcli_ode_images_equal_the_plain_pipelines(plain_pipe, tmp_path, capsys) -> None:
    code, _, err = run_cli(["sample", "--model", TINY_FLOW_NAME, "-p", PROMPT, "-n", "2", "--steps", "4",
                            "--guidance", "3", "--eta", "0", "--seed", "7", "-o", tmp_path], capsys)
    assert code == 0, err
    ours = [np.asarray(Image.open(p)).astype(int) for p in sorted(tmp_path.glob("000-*.png"))]
    assert len(ours) == 2
    for seed, image in zip((7, 8), ours, strict=True):
        ref = plain_pipe(PROMPT, num_inference_steps=4, guidance_scale=3.0, output_type="np",
                         generator=torch.Generator().manual_seed(seed)).images[0]
        assert np.abs(image - (ref * 255).round().astype(int)).max() <= 1


def test_repeated_token_attention_equals_the_pipelines_256_zero_tokens(plain_pipe) -> None:
    from train_flow import encode_captions

    from dagcli.families import repeated_tokens

    transformer = plain_pipe.transformer
    short_embeds, short_pooled = encode_captions(plain_pipe, [PROMPT, ""])  # one T5 zero token
    embeds, _, pooled, _ = plain_pipe.encode_prompt([PROMPT, ""], None, None, do_classifier_free_guidance=False)
    assert embeds.shape[1] == short_embeds.shape[1] + 255 and torch.equal(pooled, short_pooled)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([250.0, 900.0])
    with torch.no_grad():
        full = transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                           return_dict=False)[0]
        processors = transformer.attn_processors
        repeated_tokens.install(transformer)  # the training script's and dagcli's sampler's attention
        try:
            short = transformer(hidden_states=x, timestep=t, encoder_hidden_states=short_embeds,
                                pooled_projections=short_pooled, return_dict=False,
                                joint_attention_kwargs={repeated_tokens.KWARG: 256})[0]
        finally:
            transformer.set_attn_processor(processors)
    # float32 rounding: 1.8e-5 at most on velocities up to 9.5; counting the zero token 255 or 257 times: 3e-3
    assert torch.allclose(short, full, rtol=1e-5, atol=5e-5)


def test_dag_db_trains_one_epoch_on_tiny_flow(tmp_path) -> None:
    from dagcli import api

    cfg = write_tiny_config(tmp_path, TINY_FLOW_NAME, [PROMPT, "a blue circle"], train={"epochs": 1},
                            lora={"rank": 2, "alpha": 2.0}, output={"dir": str(tmp_path / "run")})
    api.train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("db_loss", "log_pf", "log_pb", "reward_mean"):
        assert np.isfinite(metrics[key]), key
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "meta.json").read_text())
    assert meta["family"] == "sd3" and meta["config"]["sampling"]["eta"] == 0.7


def test_quick_training_script_writes_a_loadable_folder(tmp_path) -> None:
    import train_flow
    from diffusers import StableDiffusion3Pipeline

    train_flow.main(["--quick", "--seed", "1", "--output", str(tmp_path)])
    out = tmp_path / TINY_FLOW_DIR.name
    meta = json.loads((out / "dagcli.json").read_text())
    assert meta["train_config"]["steps"] == train_flow.QUICK.steps and meta["torch_threads"] == 1
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a blue square", num_inference_steps=2).images[0].size == (32, 32)
    assert pipe.transformer.config.num_layers == train_flow.QUICK.layers
    for config in out.glob("*/config.json"):  # no trace of the folders the frozen parts were read from
        assert "_name_or_path" not in json.loads(config.read_text()), config


def test_flow_demo_preset_is_make_demos_on_tiny_flow() -> None:
    import tomllib

    from dagcli.config import load_config

    examples = ROOT / "examples"
    flow, tiny = (tomllib.loads((examples / f"demo-{n}compressibility.toml").read_text()) for n in ("flow-", ""))
    assert flow["model"]["name"] == TINY_FLOW_NAME and flow["sampling"]["eta"] == 0.7
    assert flow["output"]["dir"] == "runs/demo-flow"
    for section in ("model", "sampling", "output"):
        flow[section] = {k: v for k, v in flow[section].items() if k not in {"name", "eta", "dir"}}
        tiny[section] = {k: v for k, v in tiny[section].items() if k not in {"name", "eta", "dir"}}
    assert flow == tiny
    assert load_config(examples / "demo-flow-compressibility.toml").train.algorithm == "dag-db"


def test_quality_sets_each_sde_beside_the_ode_at_its_own_steps(monkeypatch) -> None:
    import quality

    assert quality._step_eta_pairs(" 10:0.35, 20:0.7,") == [(10, 0.35), (20, 0.7)]
    assert quality._step_eta_pairs("") == []
    for bad in ("abc", "10:x", "0:0.5", "20", "10:0"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            quality._step_eta_pairs(bad)
    calls = []

    def fake_evaluate(model, clip, prompts, n, run, seed):  # colour+shape encodes the setting: steps/100 + eta/10
        calls.append((run.steps, run.eta))
        mean = {"clip_colour": 0.9, "clip_both": run.steps / 100 + run.eta / 10}
        return {"steps": run.steps, "eta": run.eta, "mean": mean}, {}

    monkeypatch.setattr(quality, "evaluate_flow", fake_evaluate)
    ode = {"steps": 10, "eta": 0.0, "mean": {"clip_colour": 0.95, "clip_both": 0.86}}
    sde = {"steps": 10, "eta": 0.7, "mean": {"clip_colour": 0.94, "clip_both": 0.80}}
    gaps = quality.sde_gaps(None, None, ["p"], 8, (ode, sde), [(10, 0.35), (20, 0.7), (20, 0.5)], 3.0, 2.0, 0)
    assert calls == [(10, 0.35), (20, 0.0), (20, 0.7), (20, 0.5)]  # the ODE at 20 steps once, at 10 never
    assert [(g["steps"], g["eta"], g["ode"]["clip_both"]) for g in gaps] == [
        (10, 0.7, 0.86), (10, 0.35, 0.86), (20, 0.7, 0.2), (20, 0.5, 0.2)]
    lines = quality._flow_sde_gaps(gaps)
    # 0.80 - 0.86 = -6.0 points; 0.135 - 0.86 = -72.5; 0.27 - 0.20 = +7.0; 0.25 - 0.20 = +5.0
    assert [line.rsplit("|", 2)[1].strip() for line in lines[-4:]] == ["-6.0", "-72.5", "+7.0", "+5.0"]
    assert lines[-4].startswith("| 10 | 0.7 | 95.0% | 94.0% | 86.0% | 80.0% |")
    assert quality._flow_sde_gaps(gaps[:1]) == []
