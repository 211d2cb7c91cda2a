"""`dag train / sample / eval / export` on the tiny SD3 and FLUX pipelines: every algorithm trains, a run resumes
exactly, and each export loads in plain diffusers (or, for SD3's kohya file, in ComfyUI's key convention) and acts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dagcli.builtin.random_flow import build_tiny_random_flux, build_tiny_random_sd3
from helpers import ROOT
from helpers.cli import run_cli, write_tiny_config

BUILD = {"sd3": build_tiny_random_sd3, "flux": build_tiny_random_flux}
PROMPTS = ["a red circle", "a blue square"]
ALPHA = 2.0  # not the rank: exports must carry the LoRA scale alpha / rank = 0.5


def config(folder, kind: str, **sections):
    return write_tiny_config(folder, f"tiny-random-{kind}", PROMPTS, dag={"beta": 1.0, "beta_ramp_epochs": 2},
                             **sections)


def render(pipe) -> np.ndarray:
    """One deterministic image (the ODE, seed 0) as integers 0..255, as a PNG of `dag sample` holds it."""
    from dagcli.families import family_for

    pipe.set_progress_bar_config(disable=True)
    tokens = family_for(pipe, torch.device("cpu")).t5_tokens  # SD3 without T5: diffusers' 256 zero tokens
    image = pipe(PROMPTS[0], num_inference_steps=4, guidance_scale=3.0, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0), max_sequence_length=tokens).images[0]
    return (image * 255).round().astype(int)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def trained(request, tmp_path_factory):
    """(kind, run directory, images: base and base + the LoRA as diffusers loads it) of a 1-epoch DAG-DB run."""
    from dagcli import api

    kind = request.param
    root = tmp_path_factory.mktemp(f"flow-{kind}")
    cfg = config(root, kind, train={"epochs": 1, "learning_rate": 1e-1, "gradient_accumulation_steps": 200},
                 lora={"rank": 4, "alpha": ALPHA}, output={"dir": str(root / "run")})
    api.train(cfg)
    pipe = BUILD[kind](0)
    base = render(pipe)
    pipe.load_lora_weights(root / "run" / "checkpoints" / "step-000001")
    tuned = render(pipe)
    assert np.abs(base - tuned).max() >= 2  # the LoRA acts
    return kind, root / "run", base, tuned


def test_dag_db_run_records_finite_flow_metrics(trained):
    kind, run, _, _ = trained
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("db_loss", "log_pf", "log_pb", "flow", "grad_norm_lora", "grad_norm_flow"):
        assert np.isfinite(metrics[key]), key
    assert metrics["approx_kl"] < 1e-3  # rescoring reproduces the sampling log-probs
    meta = json.loads((run / "checkpoints" / "step-000001" / "meta.json").read_text())
    assert meta["family"] == kind and meta["config"]["sampling"]["eta"] == 0.7 * (kind == "sd3") + 0.9 * (kind == "flux")


@pytest.mark.parametrize("algorithm", ["dag-kl", "ddpo"])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_other_algorithms_train(kind, algorithm, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", config(tmp_path, kind), "--algorithm", algorithm, "--epochs", "1",
                            "-o", run], capsys)
    assert code == 0, err
    metrics = json.loads((run / "metrics.jsonl").read_text())
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm_lora"] > 0
    assert (run / "checkpoints" / "step-000001" / "pytorch_lora_weights.safetensors").is_file()


def test_flux_resume_equals_uninterrupted(tmp_path, capsys):
    cfg = config(tmp_path, "flux")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["train", "--config", cfg, "--epochs", "2", "-o", a], capsys)[0] == 0
    assert run_cli(["train", "--config", cfg, "--epochs", "1", "-o", b], capsys)[0] == 0
    assert run_cli(["train", "--config", cfg, "--epochs", "2", "-o", b, "--resume"], capsys)[0] == 0
    for name in ("pytorch_lora_weights.safetensors", "flow.safetensors"):
        wa, wb = (load_file(r / "checkpoints" / "step-000002" / name) for r in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dag_sample_with_the_checkpoint_equals_diffusers_with_its_lora(trained, tmp_path, capsys):
    _, run, _, tuned = trained
    out = tmp_path / "samples"
    code, _, err = run_cli(["sample", "--ckpt", run, "-p", PROMPTS[0], "-n", "1", "--steps", "4", "--guidance", "3",
                            "--eta", "0", "-o", out], capsys)
    assert code == 0, err
    ours = np.asarray(Image.open(next(out.glob("000-*.png")))).astype(int)
    assert np.abs(ours - tuned).max() <= 1


def test_dag_eval_compares_base_and_checkpoint(trained, tmp_path, capsys):
    _, run, _, _ = trained
    out = tmp_path / "eval"
    code, _, err = run_cli(["eval", "--ckpt", run, "--prompts", run.parent / "prompts.txt", "--reward",
                            "compressibility", "-n", "1", "--steps", "2", "-o", out], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    kind = trained[0]
    assert report["settings"]["eta"] == 0.0 and report["settings"]["guidance"] == {"sd3": 4.5, "flux": 3.5}[kind]
    base, tuned = report["models"]
    assert base["label"] == "base" and tuned["source"]["kind"] != "base"
    files = [out / m["per_prompt"][0]["files"][0] for m in (base, tuned)]
    assert not np.array_equal(*(np.asarray(Image.open(f)) for f in files))  # the checkpoint's LoRA is applied


def test_diffusers_export_loads_and_acts(trained, tmp_path, capsys):
    kind, run, base, tuned = trained
    out = tmp_path / "lora"
    assert run_cli(["export", run, "--format", "diffusers", "-o", out], capsys)[0] == 0
    pipe = BUILD[kind](0)
    pipe.load_lora_weights(out)
    assert np.array_equal(render(pipe), tuned)


def test_merged_export_loads_with_the_plain_pipeline_class(trained, tmp_path, capsys):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    kind, run, _, tuned = trained
    out = tmp_path / "merged"
    assert run_cli(["export", run, "--format", "merged", "-o", out], capsys)[0] == 0
    # a pipeline saved without T5 records it as absent; plain diffusers then wants it passed as None
    cls, extra = ((StableDiffusion3Pipeline, {"text_encoder_3": None, "tokenizer_3": None}) if kind == "sd3"
                  else (FluxPipeline, {}))
    assert np.abs(render(cls.from_pretrained(out, **extra)) - tuned).max() <= 1
    from dagcli.models import load_model  # dagcli loads it as it is

    loaded = load_model(str(out), device="cpu")
    assert type(loaded.pipe) is cls and loaded.family.name == kind


def comfy_apply(transformer, state: dict) -> None:
    """Add a `lora_transformer_*` file to the weights the way ComfyUI's loader does: module names with dots as
    underscores, W += (alpha / rank) · up @ down."""
    modules = {"lora_transformer_" + n.replace(".", "_"): m for n, m in transformer.named_modules()}
    names = {k.split(".")[0] for k in state}
    for name in names:
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        scale = float(state[f"{name}.alpha"]) / down.shape[0]
        with torch.no_grad():
            modules[name].weight += scale * up @ down


def test_kohya_export_uses_comfyuis_transformer_keys_and_acts(trained, tmp_path, capsys):
    kind, run, base, tuned = trained
    out = tmp_path / "lora.safetensors"
    code, _, err = run_cli(["export", run, "--format", "kohya", "-o", out], capsys)
    assert code == 0, err
    state = load_file(out)
    assert all(k.startswith("lora_transformer_") for k in state)
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {ALPHA}
    pipe = BUILD[kind](0)
    comfy_apply(pipe.transformer, state)
    assert np.abs(render(pipe) - tuned).max() <= 1
    if kind == "flux":  # diffusers reads this convention back for FLUX
        pipe = BUILD[kind](0)
        pipe.load_lora_weights(out)
        assert np.abs(render(pipe) - tuned).max() <= 1


def test_kohya_conversion_rejects_keys_of_another_model():
    from dagcli.errors import DagError
    from dagcli.families.flow import transformer_kohya_weights

    with pytest.raises(DagError, match="only transformer LoRAs"):
        transformer_kohya_weights({"unet.down_blocks.0.to_q.lora.down.weight": torch.zeros(2, 2)}, 1.0)


# --- defaults and the noise level ----------------------------------------------------------------------------


def test_flow_families_take_flow_grpos_training_defaults_and_the_ode_for_sampling():
    from dagcli.models import model_defaults

    sd3, flux = model_defaults("tiny-random-sd3"), model_defaults("tiny-random-flux")
    assert (sd3.steps, sd3.guidance, sd3.eta, sd3.sample_steps, sd3.sample_eta) == (10, 4.5, 0.7, 40, 0.0)
    assert (flux.steps, flux.guidance, flux.eta, flux.sample_steps, flux.sample_eta) == (6, 3.5, 0.9, 28, 0.0)
    assert "Flow-GRPO" in sd3.source and sd3.max_eta is None
    sd = model_defaults("tiny-random")
    assert sd.sample_steps == sd.steps == 50 and sd.max_eta == 1.0


def test_eta_above_one_is_legal_for_flows_only(tmp_path, capsys):
    from dagcli.config import fill_model_defaults, load_config
    from dagcli.errors import DagError

    flux = load_config(config(tmp_path, "flux", sampling={"eta": 1.5}))
    assert fill_model_defaults(flux)[0].sampling.eta == 1.5
    sd = load_config(write_tiny_config(tmp_path, "tiny-random", PROMPTS, sampling={"eta": 1.5}))
    with pytest.raises(DagError, match="sampling.eta = 1.5"):
        fill_model_defaults(sd)
    code, _, err = run_cli(["sample", "--model", "tiny-random-flux", "-p", "x", "-n", "1", "--steps", "2",
                            "--eta", "1.5", "-o", tmp_path / "s"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["sample", "--model", "tiny-random-flux", "-p", "x", "--eta", "-0.5"], capsys)
    assert code == 2 and "--eta must be >= 0" in err


@pytest.mark.parametrize("preset", ["sd35-medium-24gb", "sd35-medium-48gb", "sd35-medium-80gb", "flux-dev-48gb",
                                    "flux-dev-80gb"])
def test_example_presets_validate_and_their_lora_targets_exist(preset):

    from dagcli.config import load_config

    cfg = load_config(ROOT / "examples" / "configs" / f"{preset}.toml")  # validates
    kind = "sd3" if preset.startswith("sd35") else "flux"
    assert cfg.model.name == {"sd3": "stabilityai/stable-diffusion-3.5-medium",
                              "flux": "black-forest-labs/FLUX.1-dev"}[kind]
    names = [n for n, _ in BUILD[kind](0).transformer.named_modules()]
    for target in cfg.lora.target_modules:
        assert any(n.endswith("." + target) for n in names), target
