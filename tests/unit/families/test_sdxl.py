"""Stable Diffusion XL on the tiny random SDXL (`--model tiny-random-sdxl`): the sampler against diffusers'
`StableDiffusionXLPipeline` and a float64 closed form, training with every algorithm, and every export loaded
back in plain diffusers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dagcli.cli import main
from helpers.cli import run_cli, write_tiny_config

MODEL = "tiny-random-sdxl"
PROMPTS = ["a red circle", "a small blue square on a yellow background"]
ALPHA = 2.0  # not the rank: the exports must carry the LoRA scale alpha / rank = 0.5
ALL_KINDS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
             "conv2", "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]


def plain_pipe(scheduler: str = "ddim"):
    """The tiny SDXL as plain diffusers builds it, with a DDIM scheduler made from its shipped config."""
    from diffusers import DDIMScheduler

    from dagcli.builtin.random_models import build_tiny_random_sdxl

    pipe = build_tiny_random_sdxl(0)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: str = PROMPTS[0], **kw) -> np.ndarray:
    """Deterministic images (η = 0, seed 0) as uint8 values (int)."""
    settings = {"num_inference_steps": 4, "guidance_scale": 3.0, "eta": 0.0, **kw}
    images = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="np", **settings).images
    return (images * 255).round().astype(int)


@pytest.fixture(scope="module")
def sdxl():
    from dagcli.models import load_model

    return load_model(MODEL, device="cpu")


# --- the family ---------------------------------------------------------------------------------------------


def test_family_sizes_scheduler_and_defaults(sdxl, tmp_path):
    from diffusers import DDIMScheduler

    from dagcli.builtin.random_models import build_tiny_random_sdxl
    from dagcli.families.sdxl import SDXLFamily
    from dagcli.models import load_model, model_defaults

    family = sdxl.family
    assert isinstance(family, SDXLFamily) and family.name == "sdxl"
    assert family.native_resolution == 8 * 4 == sdxl.resolution  # UNet sample size x VAE factor
    assert isinstance(sdxl.pipe.scheduler, DDIMScheduler) and not sdxl.pipe.scheduler.config.clip_sample
    assert family.flow_config(32, 32).cross_attention_dim == 64  # the UNet's: both encoders' 32 side by side
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    one_by_one = family.decode(z)  # the pipeline's VAE decodes one image at a time, another decoder the batch
    assert one_by_one.shape == (3, 3, 32, 32)
    torch.testing.assert_close(one_by_one, family.decode(z, vae=sdxl.pipe.vae), rtol=0, atol=1e-5)
    defaults = model_defaults(MODEL)
    assert (defaults.steps, defaults.guidance, defaults.eta) == (50, 5.0, 1.0)
    assert "Stable Diffusion XL" in defaults.source
    # a saved folder loads through the user path as SDXL; in fp16 the VAE decodes in fp32 (it overflows in fp16)
    build_tiny_random_sdxl(0).save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(str(tmp_path), device="cpu", dtype="fp16")
    assert isinstance(loaded.family, SDXLFamily)
    assert loaded.pipe.unet.dtype == torch.float16 and loaded.pipe.vae.dtype == torch.float32


def test_conditioning_has_both_encoders_and_pooled(sdxl):
    pipe = sdxl.pipe
    cond = sdxl.family.encode(PROMPTS)
    parts = [pipe.encode_prompt([p], device="cpu", do_classifier_free_guidance=False) for p in PROMPTS]  # one per call
    embeds, pooled = torch.cat([e for e, _, _, _ in parts]), torch.cat([q for _, _, q, _ in parts])
    assert cond.tensors["embeds"].shape == (2, 16, 64) and cond.tensors["pooled"].shape == (2, 32)
    torch.testing.assert_close(cond.tensors["embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.tensors["pooled"], pooled, rtol=0, atol=0)
    warned = []
    assert sdxl.family.warn_truncated(["a red circle " * 10, "a cat"], warned.append) == 1 and len(warned) == 1


@pytest.mark.parametrize("force_zeros, size", [(True, (32, 32)), (False, (32, 32)), (True, (48, 32))])
def test_eta0_images_match_diffusers_pipeline(force_zeros, size):
    """Both kinds of unconditional branch, and the time ids of a non-square, non-native size."""
    from dagcli.models import load_model
    from dagcli.sampling import sample_batch, to_pil

    model, pipe = load_model(MODEL, device="cpu"), plain_pipe()
    for p in (model.pipe, pipe):
        p.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    height, width = size
    traj = sample_batch(model, PROMPTS, torch.Generator().manual_seed(3), steps=6, guidance=5.0, eta=0.0,
                        height=height, width=width)
    ours = np.stack([np.asarray(im) for im in to_pil(traj.images)]).astype(int)
    ref = pipe(PROMPTS, num_inference_steps=6, guidance_scale=5.0, eta=0.0, height=height, width=width,
               generator=torch.Generator().manual_seed(3), output_type="np").images
    ref = (ref * 255).round().astype(int)
    assert ours.shape == ref.shape == (2, height, width, 3)
    assert np.abs(ours - ref).max() <= 1
    assert ours.std() > 10  # not a blank image


def gaussian_logpdf64(x, mean, var):
    """Closed-form log N(x; mean, var) summed per row, float64, written independently of dagcli."""
    x, mean = x.double(), mean.double()
    return (-0.5 * (x - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)).flatten(1).sum(1)


def test_logprobs_match_float64_closed_form(sdxl):
    steps = 4
    traj = sample_batch_eta1(sdxl, steps, reduction="sum")
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SDXL's scaled_linear
    abar = torch.cumprod(1 - betas, 0)
    ratio = 1000 // steps
    for i in range(steps):
        t = (steps - 1 - i) * ratio + 1  # "leading" spacing, steps_offset 1
        a_t, a_s = abar[t], abar[t - ratio] if t - ratio >= 0 else abar[0]
        x, eps = traj.latents[:, i].double(), traj.out_guided[:, i].double()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        mean = a_s.sqrt() * x0 + (1 - a_s - var).sqrt() * eps
        expected = gaussian_logpdf64(traj.latents[:, i + 1], mean, float(var))
        torch.testing.assert_close(traj.log_probs[:, i].double(), expected, rtol=1e-5, atol=1e-3)


def sample_batch_eta1(model, steps: int, reduction: str = "mean"):
    from dagcli.sampling import sample_batch

    return sample_batch(model, PROMPTS + ["a green triangle"], torch.Generator().manual_seed(0), steps=steps,
                        guidance=4.0, eta=1.0, reduction=reduction, decode=False)


def test_rescoring_gives_on_policy_ratio_exactly_one(sdxl):
    family, steps = sdxl.family, 4
    traj = sample_batch_eta1(sdxl, steps)
    schedule = family.schedule(steps, 32, 32)
    denoise = family.denoiser_fn(family.denoiser, schedule, traj.cond, 4.0)  # the model again, from the states
    for i in range(steps):
        j = torch.full((traj.batch_size,), i, dtype=torch.long)
        out, _ = denoise(traj.latents[:, i], j)
        rescored = family.step(schedule, j, traj.latents[:, i], out, 1.0, prev=traj.latents[:, i + 1])
        assert torch.equal(rescored.log_prob, traj.log_probs[:, i])
        assert torch.equal(torch.exp(rescored.log_prob - traj.log_probs[:, i]), torch.ones(traj.batch_size))


# --- training, sampling and evaluation of runs --------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch DAG-DB run on tiny-random-sdxl (rank 4, alpha 2, a high learning rate) -> its run directory."""
    root = tmp_path_factory.mktemp("sdxl-run")
    cfg = write_tiny_config(root, MODEL, PROMPTS[:1] + ["a blue square"],
                            train={"epochs": 1, "learning_rate": 5e-2, "gradient_accumulation_steps": 200},
                            lora={"rank": 4, "alpha": ALPHA}, output={"dir": str(root / "run")})
    try:
        main(["train", "--config", str(cfg)])
    except SystemExit as e:
        assert e.code == 0
    return root / "run"


def test_dag_db_run_records_the_sdxl_family_and_flow(run):
    from safetensors import safe_open

    step = run / "checkpoints" / "step-000001"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["family"] == "sdxl" and meta["base_model"] == MODEL
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(metrics["db_loss"]) and metrics["grad_norm_flow"] > 0 and metrics["grad_norm_lora"] > 0
    with safe_open(str(step / "flow.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["cross_attention_dim"] == 64  # the UNet's


@pytest.mark.parametrize("algorithm", ["dag-kl", "ddpo"])
def test_other_algorithms_train(tmp_path, capsys, algorithm):
    cfg = write_tiny_config(tmp_path, MODEL, ["a red circle", "a blue square"], train={"epochs": 1})
    code, _, err = run_cli(["train", "--config", cfg, "--algorithm", algorithm, "-o", tmp_path / "run"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(metrics["policy_loss"]) and metrics["grad_norm_lora"] > 0


@pytest.fixture(scope="module")
def images(run):
    """Plain diffusers images (its own scheduler): the base model, and base + the run's LoRA."""
    pipe = plain_pipe(scheduler="shipped")
    base = render(pipe)
    pipe.load_lora_weights(run / "checkpoints" / "step-000001")
    tuned = render(pipe)
    assert np.abs(base - tuned).max() > 2  # the LoRA is not trivial
    return base, tuned


def test_dag_sample_of_a_run_matches_diffusers_with_its_lora(run, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "samples"
    code, _, err = run_cli(["sample", "--ckpt", run, "-p", PROMPTS[0], "-n", "1", "--eta", "0", "--steps", "4",
                            "--guidance", "3", "-o", out], capsys)
    assert code == 0, err
    ours = np.asarray(Image.open(next(out.glob("000-*.png")))).astype(int)
    pipe = plain_pipe()
    pipe.load_lora_weights(run / "checkpoints" / "step-000001")
    assert np.abs(render(pipe)[0] - ours).max() <= 1


def test_dag_eval_of_a_run(run, tmp_path, capsys):
    from dagcli.builtin import TINY_CLIP_DIR

    out = tmp_path / "eval"
    code, _, err = run_cli(["eval", "--ckpt", run, "-p", "a red circle", "-p", "a blue square", "-r",
                            "compressibility", "-n", "2", "--steps", "3", "--device", "cpu", "--embed-model",
                            TINY_CLIP_DIR, "-o", out], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["base", "run@step-000001"]
    assert len(list((out / "images").rglob("*.png"))) >= 2 * 2 * 2


# --- exports ------------------------------------------------------------------------------------------------


def test_diffusers_export_loads_in_plain_diffusers(run, images, tmp_path, capsys):
    out = tmp_path / "lora"
    code, _, err = run_cli(["export", run, "--format", "diffusers", "-o", out], capsys)
    assert code == 0, err
    pipe = plain_pipe(scheduler="shipped")
    pipe.load_lora_weights(out)
    np.testing.assert_array_equal(render(pipe), images[1])


def test_kohya_export_has_sdxl_names_and_loads_in_plain_diffusers(run, images, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    code, _, err = run_cli(["export", run, "--format", "kohya", "-o", out], capsys)
    assert code == 0, err
    state = load_file(out)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in state
    assert "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_k.alpha" in state
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in state)
    assert all(float(v) == ALPHA for k, v in state.items() if k.endswith(".alpha"))
    pipe = plain_pipe(scheduler="shipped")
    pipe.load_lora_weights(str(out))  # diffusers' own kohya (sgm) converter
    assert np.abs(render(pipe) - images[1]).max() <= 1


def test_merged_export_loads_with_from_pretrained(run, images, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "merged"
    code, _, err = run_cli(["export", run, "--format", "merged", "-o", out], capsys)
    assert code == 0, err
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())
    image = render(pipe)
    assert np.abs(image - images[1]).max() <= 1 and np.abs(image - images[0]).max() > 2


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    """A LoRA folder on every kind of UNet layer kohya can name (attention, feed-forward, resnet convolutions and
    time projections, down/upsamplers, conv_in/out, time and added embeddings), random non-zero weights."""
    from peft import LoraConfig

    from dagcli.checkpoint import write_lora
    from dagcli.models import load_model

    loaded = load_model(MODEL, device="cpu")
    unet = loaded.pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=ALPHA, target_modules=ALL_KINDS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = tmp_path_factory.mktemp("every-kind")
    write_lora(folder, loaded.family, unet, 4, ALPHA, ALL_KINDS)
    meta = {"base_model": MODEL, "family": "sdxl", "lora": {"rank": 4, "alpha": ALPHA, "target_modules": ALL_KINDS}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_kohya_names_of_every_layer_kind(every_kind, tmp_path, capsys):
    """kohya's SDXL names (sd-scripts' LDM UNet), written out by hand for one module of each kind."""
    out = tmp_path / "all.safetensors"
    assert run_cli(["export", every_kind, "--format", "kohya", "-o", out], capsys)[0] == 0
    modules = {k.split(".")[0].removeprefix("lora_unet_") for k in load_file(out)}
    expected = {
        "input_blocks_0_0", "time_embed_0", "time_embed_2", "label_emb_0_0", "label_emb_0_2", "out_2",
        "input_blocks_1_0_in_layers_2", "input_blocks_2_0_emb_layers_1", "input_blocks_1_0_out_layers_3",
        "input_blocks_3_0_op", "input_blocks_4_0_skip_connection", "input_blocks_5_1_proj_in",
        "input_blocks_5_1_transformer_blocks_1_ff_net_0_proj", "input_blocks_4_1_transformer_blocks_0_ff_net_2",
        "middle_block_0_in_layers_2", "middle_block_1_proj_out", "middle_block_2_emb_layers_1",
        "output_blocks_0_0_skip_connection", "output_blocks_2_1_transformer_blocks_1_attn2_to_v",
        "output_blocks_2_2_conv", "output_blocks_5_0_out_layers_3",
    }
    assert expected <= modules
    assert not any(m.startswith(("down_blocks", "up_blocks", "mid_block", "conv_in", "time_embedding")) for m in modules)


def test_kohya_keys_read_back_by_diffusers_converter(every_kind, tmp_path, capsys):
    """diffusers' converter maps our kohya file back to the very tensors of the diffusers-format LoRA, and the
    pipeline loading either one draws the same image (every layer kind counted)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import (
        convert_all_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    out = tmp_path / "all.safetensors"
    assert run_cli(["export", every_kind, "--format", "kohya", "-o", out], capsys)[0] == 0
    pipe = plain_pipe(scheduler="shipped")
    back, alphas = StableDiffusionXLPipeline.lora_state_dict(str(out), unet_config=pipe.unet.config)
    back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in back.items()})
    ours = convert_all_state_dict_to_peft(load_file(every_kind / "pytorch_lora_weights.safetensors"))
    ours = {k.removeprefix("unet."): v for k, v in ours.items()}
    assert back.keys() == ours.keys() and len(ours) == 2 * len(alphas)
    assert all(torch.equal(back[k], ours[k]) for k in ours) and set(alphas.values()) == {ALPHA}

    base = render(pipe)
    pipe.load_lora_weights(str(out))
    from_kohya = render(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(every_kind)
    loaded = {k.replace(".default_0", ""): v for k, v in pipe.unet.state_dict().items() if ".lora_" in k}
    assert loaded.keys() == ours.keys() and all(torch.equal(loaded[k], ours[k]) for k in ours)  # every layer
    from_diffusers = render(pipe)
    assert np.abs(from_diffusers - base).max() > 2
    assert np.abs(from_kohya - from_diffusers).max() <= 1


def test_kohya_refuses_a_module_outside_sdxl_layout():
    from dagcli.errors import DagError
    from dagcli.families.sdxl import SDXLFamily

    lora = {"unet.down_blocks.1.resnets.2.conv1.lora.down.weight": torch.zeros(4, 8, 3, 3),
            "unet.down_blocks.1.resnets.2.conv1.lora.up.weight": torch.zeros(8, 4, 1, 1)}
    with pytest.raises(DagError, match="'down_blocks.1.resnets.2.conv1' has no name in kohya's SDXL layout"):
        SDXLFamily.kohya_weights(lora, 4.0)


def test_ddim_keeps_latents_unclipped_when_the_shipped_config_is_silent():
    from diffusers import EulerDiscreteScheduler

    from dagcli.families.sd import ddim_scheduler

    bare = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert "clip_sample" not in bare.config and not ddim_scheduler(bare).config.clip_sample
    asked = EulerDiscreteScheduler.from_config({**bare.config, "clip_sample": True})
    assert ddim_scheduler(asked).config.clip_sample
