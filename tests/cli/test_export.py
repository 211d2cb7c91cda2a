"""`dag export` on a run trained on the tiny model: each format loads back in plain diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers.cli import run_cli, write_tiny_config

PROMPT = "a red circle"
KOHYA_TO_PEFT = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B"}
ALPHA = 2.0  # not the rank: the exports must carry the LoRA scale alpha / rank = 0.5




def render(pipe) -> np.ndarray:
    """One deterministic image (η = 0, fixed seed) as floats in [0, 1]."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=3.0, eta=0.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def from_kohya(state: dict) -> tuple[dict, dict]:
    """Kohya keys back to `module_name.lora_A` / `.lora_B` (module dots as underscores) and alphas."""
    weights, alphas = {}, {}
    for key, value in state.items():
        module, _, suffix = key.partition(".")
        name = module.removeprefix("lora_unet_")
        if suffix == "alpha":
            alphas[name] = float(value)
        else:
            weights[f"{name}.{KOHYA_TO_PEFT[suffix]}"] = value
    return weights, alphas


def base_pipe(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pipeline_dir):
    """A 1-epoch run (rank 4, alpha 2, high learning rate) -> its run directory."""
    from dagcli import api

    root = tmp_path_factory.mktemp("export-run")
    cfg = write_tiny_config(root, tiny_pipeline_dir, ["a red circle", "a blue square"],
                            train={"epochs": 1, "learning_rate": 5e-2, "gradient_accumulation_steps": 200},
                            lora={"rank": 4, "alpha": ALPHA}, output={"dir": str(root / "run")})
    api.train(cfg)
    return root / "run"


@pytest.fixture(scope="module")
def images(trained, tiny_pipeline_dir):
    """Reference images: the base model, and base + the checkpoint's LoRA loaded by diffusers itself."""
    pipe = base_pipe(tiny_pipeline_dir)
    base = render(pipe)
    pipe.load_lora_weights(trained / "checkpoints" / "step-000001")
    tuned = render(pipe)
    assert np.abs(base - tuned).max() > 2 / 255  # the LoRA is not trivial
    return base, tuned


def test_diffusers_folder_loads(trained, images, tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "lora"
    code, _, err = run_cli(["export", trained, "--format", "diffusers", "-o", out], capsys)
    assert code == 0, err
    pipe = base_pipe(tiny_pipeline_dir)
    pipe.load_lora_weights(out)
    np.testing.assert_array_equal(render(pipe), images[1])


def test_kohya_file_keys_alpha_and_weights(trained, tmp_path, capsys):
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft

    out = tmp_path / "lora.safetensors"
    code, _, err = run_cli(["export", trained, "--step", "1", "--format", "kohya", "-o", out], capsys)
    assert code == 0, err
    state = load_file(out)
    suffixes = {k.split(".", 1)[1] for k in state}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert all(k.startswith("lora_unet_down_blocks_") or k.startswith("lora_unet_up_blocks_")
               or k.startswith("lora_unet_mid_block_") for k in state)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert all(state[k].ndim == 0 and float(state[k]) == ALPHA for k in state if k.endswith(".alpha"))
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["ss_network_alpha"] == "2" and f.metadata()["ss_network_dim"] == "4"
    # independent inverse: kohya names back to module names, compared with the checkpoint's own weights
    original = load_file(trained / "checkpoints" / "step-000001" / "pytorch_lora_weights.safetensors")
    peft = {k.removeprefix("unet.").replace(".", "_").replace("_lora_A_weight", ".lora_A")
            .replace("_lora_B_weight", ".lora_B"): v for k, v in convert_all_state_dict_to_peft(original).items()}
    weights, alphas = from_kohya(state)
    assert weights.keys() == peft.keys() and len(alphas) == len(weights) // 2
    for k in peft:
        torch.testing.assert_close(weights[k], peft[k], rtol=0, atol=0)


def test_kohya_file_loads_in_diffusers(trained, images, tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    assert run_cli(["export", trained, "--format", "kohya", "-o", out], capsys)[0] == 0
    pipe = base_pipe(tiny_pipeline_dir)
    pipe.load_lora_weights(out)  # diffusers' own kohya -> diffusers conversion
    assert np.abs(render(pipe) - images[1]).max() <= 1 / 255


def test_merged_pipeline_matches_base_plus_lora(trained, images, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged"
    code, _, err = run_cli(["export", trained, "--format", "merged", "-o", out], capsys)
    assert code == 0, err
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())
    image = render(pipe)
    assert np.abs(image - images[1]).max() <= 1 / 255
    assert np.abs(image - images[0]).max() > 2 / 255


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--format", "onnx", "-o", "{tmp}/x"], "unknown export format 'onnx'; valid options: diffusers, kohya, merged"),
        (["--format", "kohya", "-o", "{tmp}/x"], "must end in .safetensors"),
        (["--step", "9", "--format", "diffusers", "-o", "{tmp}/x"], "no checkpoint at step 9; valid options: 1"),
        (["--format", "diffusers"], "--output is required"),
        (["-o", "{tmp}/x"], "--format is required; valid options: diffusers, kohya, merged"),
        (["--format", "merged", "-o", "/proc/nope/x"], "'/proc/nope/x' cannot be written"),
        (["--format", "merged", "--model", "no such model", "-o", "{tmp}/x"], "unknown model 'no such model'"),
    ],
)
def test_bad_export_input(trained, tmp_path, capsys, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = run_cli(["export", trained, *args], capsys)
    assert code == 2, err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_run(tmp_path, capsys):
    code, _, err = run_cli(["export", tmp_path / "nope", "--format", "kohya", "-o", tmp_path / "x.safetensors"],
                           capsys)
    assert code == 2 and "not found" in err


def test_a_base_tail_lora_warns_on_export_and_the_documented_callback_reproduces_it(tiny_pipeline_dir, tmp_path,
                                                                                      capsys):
    """A LoRA trained with a base-model tail (`rtb.tail_steps`) exports with a warning naming the steps, and plain
    diffusers with docs/training.md's callback (the LoRA off after step k − 1) draws what `dag sample` draws, unlike
    the LoRA on every step."""
    from PIL import Image

    from dagcli import api

    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle", "a blue square"],
                            train={"algorithm": "rtb", "epochs": 2, "learning_rate": 0.3},
                            rtb={"log_z": "vargrad", "group_size": 3, "beta": 1.0, "tail_steps": 2},
                            lora={"rank": 4, "alpha": ALPHA}, output={"dir": str(tmp_path / "run")})
    api.train(cfg)
    out = tmp_path / "lora"
    code, _, err = run_cli(["export", tmp_path / "run", "--format", "diffusers", "-o", out], capsys)
    assert code == 0, err
    assert "the first 2 of 4 steps" in err and "callback" in err
    code, _, err = run_cli(["sample", "--ckpt", tmp_path / "run", "-p", PROMPT, "-n", "1", "--steps", "4",
                            "--eta", "0", "--guidance", "3", "--seed", "0", "-o", tmp_path / "s"], capsys)
    assert code == 0, err
    ours = np.asarray(Image.open(next((tmp_path / "s").glob("000-*-s0.png"))), dtype=np.float64) / 255

    pipe = base_pipe(tiny_pipeline_dir)
    pipe.load_lora_weights(out)
    everywhere = render(pipe)

    def lora_off_after(pipe, i, t, kwargs, k=2):  # the docs' callback: steps 0 .. k − 1 with the LoRA
        if i == k - 1:
            pipe.disable_lora()
        return kwargs

    pipe.set_progress_bar_config(disable=True)
    tailed = pipe(PROMPT, num_inference_steps=4, guidance_scale=3.0, eta=0.0, generator=torch.Generator().manual_seed(0),
                  output_type="np", callback_on_step_end=lora_off_after).images[0]
    assert np.abs(tailed - everywhere).max() > 2 / 255  # the tail matters
    assert np.abs(tailed - ours).max() <= 1.5 / 255  # up to the PNG's rounding
