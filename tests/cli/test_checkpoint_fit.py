"""A checkpoint is used only with a model its LoRA belongs to, at a size the model takes; a finished run says so.

The CLI cases run the installed `dag` in a pipe, as a user would, against two short runs trained once per module:
one on the built-in rectified-flow model (`tiny-flow`, an SD3 pipeline) at 16 px, one on a random tiny Stable
Diffusion pipeline folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dagcli.cli import main
from helpers.cli import write_tiny_config

PROMPTS = ["a red circle", "a blue square"]
FLOW_SIZE = 16  # not tiny-flow's native 32 px


def dag(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`dag ARGS` through the installed script, output in a pipe."""
    script = Path(sys.executable).parent / "dag"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "dagcli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints; fails unless it is one `error:` line with exit code 2."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


def train_here(*args) -> None:
    """`dag train ARGS` in this process (training is the slow part: no interpreter start)."""
    try:
        main(["train", *map(str, args)])
    except SystemExit as e:
        assert e.code == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline_dir):
    """{"flow": a 1-epoch tiny-flow run at 16 px, "sd": a 1-epoch run on "sd_model", a copy of the random tiny
    SD folder, "config": that run's preset}."""
    root = tmp_path_factory.mktemp("fit")
    flow = root / "flow"
    train_here("-m", "tiny-flow", "--reward", "compressibility", "--epochs", "1", "--steps", "2",
               "--batch-size", "2", "--train-batch-size", "2", "--set", "sampling.batches_per_epoch=1",
               "--set", f"sampling.resolution={FLOW_SIZE}", "--set", "train.gradient_accumulation_steps=1", "-o", flow)
    sd_model = root / "sd-model"
    shutil.copytree(tiny_pipeline_dir, sd_model)
    config = write_tiny_config(root, sd_model, PROMPTS, train={"epochs": 1})
    sd = root / "sd"
    train_here("--config", config, "-o", sd)
    return {"flow": flow, "sd": sd, "sd_model": sd_model, "config": config}


# --- a LoRA that does not belong to --model ----------------------------------------------------------------

REFUSED = {
    "sample": lambda r, out: ["sample", "--ckpt", r["flow"], "--model", "tiny", "-p", "x", "-n", "1", "-o", out],
    "eval": lambda r, out: ["eval", "--ckpt", r["flow"], "--model", "tiny", "-p", "x", "-n", "1",
                            "--reward", "compressibility", "-o", out],
    "export merged": lambda r, out: ["export", r["flow"], "--model", "tiny", "--format", "merged", "-o", out],
    "export kohya": lambda r, out: ["export", r["flow"], "--model", "tiny", "--format", "kohya",
                                    "-o", out / "lora.safetensors"],
    "export diffusers": lambda r, out: ["export", r["flow"], "--model", "tiny", "--format", "diffusers", "-o", out],
    # same family (Stable Diffusion), other shapes: the random tiny pipeline's layers are 32 wide, tiny's 48
    "sample, same family": lambda r, out: ["sample", "--ckpt", r["sd"], "--model", "tiny", "-p", "x", "-n", "1",
                                           "-o", out],
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_checkpoint_of_another_model_is_refused_in_one_line(runs, tmp_path, case):
    out = tmp_path / "out"
    line = error_line(dag(*REFUSED[case](runs, out)))
    trained_on = "'tiny-flow'" if "same family" not in case else repr(str(runs["sd_model"]))
    assert f"was trained on {trained_on}, not on 'tiny'" in line
    if "same family" in case:
        assert "maps 32 -> 32 features, the model's layer 48 -> 48" in line
    else:
        assert "its LoRA is for the sd3 family, the model is of the sd family" in line
    assert not out.exists()  # nothing written


def test_resume_refuses_a_checkpoint_that_no_longer_fits_its_model_folder(runs, tmp_path):
    """The run's model folder was replaced by another model of the same family (the built-in tiny pipeline)."""
    from dagcli.builtin import TINY_SD_DIR

    run, model = tmp_path / "run", tmp_path / "model"
    shutil.copytree(runs["sd"], run)
    shutil.copytree(TINY_SD_DIR, model)
    for file in (run / "config.toml", run / "checkpoints" / "step-000001" / "meta.json"):  # the run moved here
        file.write_text(file.read_text().replace(str(runs["sd_model"]), str(model)))
    before = (run / "metrics.jsonl").read_text()
    line = error_line(dag("train", "--resume", "-o", run))
    assert f"no longer fits {str(model)!r}, the model it was trained on (changed since)" in line
    assert "maps 32 -> 32 features, the model's layer 48 -> 48" in line
    assert (run / "metrics.jsonl").read_text() == before and len(list((run / "checkpoints").iterdir())) == 1


def test_a_bare_lora_folder_is_checked_by_its_keys_and_shapes(runs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs["flow"] / "checkpoints" / "step-000001" / "pytorch_lora_weights.safetensors", bare)
    line = error_line(dag("sample", "--ckpt", bare, "--model", "tiny-random-sd3", "-p", "x", "-o", tmp_path / "o"))
    assert f"LoRA {str(bare)!r} does not belong to 'tiny-random-sd3'" in line and "96 -> 96" in line
    line = error_line(dag("sample", "--ckpt", bare, "--model", "tiny", "-p", "x", "-o", tmp_path / "o"))
    assert "its weights are for 'transformer'" in line and "'unet'" in line


def test_a_lora_that_fails_to_load_is_one_line_without_library_output(runs, tmp_path, monkeypatch, capfd):
    """Past the fit check (switched off here), diffusers' own failure: its 60-odd lines are not shown."""
    from dagcli import checkpoint
    from dagcli.errors import DagError
    from dagcli.models import load_model

    loaded = load_model("tiny-random-sd3", device="cpu")
    monkeypatch.setattr(checkpoint, "check_lora_fits", lambda *a, **k: None)
    capfd.readouterr()
    with pytest.raises(DagError) as info:
        checkpoint.attach_lora(loaded.pipe, runs["flow"] / "checkpoints" / "step-000001", "tiny-random-sd3")
    out = capfd.readouterr()
    assert "could not load LoRA" in str(info.value) and "\n" not in str(info.value)
    assert out.out == "" and out.err == ""


def test_the_fit_check_compares_with_the_model_itself():
    """Layer by layer against a denoiser: a LoRA fits the model it was made for, not a wider one."""
    from dagcli.checkpoint import _lora_problem
    from dagcli.families.sd import SDFamily

    lora = {"unet.proj": {"down": (2, 6), "up": (5, 2)}}
    assert _lora_problem(lora, "sd", SDFamily, _net(6, 5)) is None
    assert "maps 6 -> 5 features, the model's layer 6 -> 7" in _lora_problem(lora, "sd", SDFamily, _net(6, 7))
    assert "1 of its 2 LoRA modules have no layer in the model, e.g. unet.other" in _lora_problem(
        {**lora, "unet.other": {"down": (2, 6), "up": (5, 2)}}, None, SDFamily, _net(6, 5))
    assert "for the sdxl family, the model is of the sd family" in _lora_problem(lora, "sdxl", SDFamily, _net(6, 5))
    text_encoder = {"text_encoder.q_proj": {"down": (2, 3), "up": (3, 2)}}  # another trainer's: diffusers loads it
    assert _lora_problem({**lora, **text_encoder}, None, SDFamily, _net(6, 5)) is None
    assert "its weights are for 'text_encoder'" in _lora_problem(text_encoder, None, SDFamily, _net(6, 5))


def _net(n_in: int, n_out: int):
    """A denoiser with one linear layer `proj`."""
    import torch

    net = torch.nn.Module()
    net.proj = torch.nn.Linear(n_in, n_out)
    return net


# --- image sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, largest, multiple", [
    (["sample", "-m", "tiny-flow", "--height", "64", "--width", "64", "-p", "x"], 32, 4),
    (["sample", "-m", "tiny-random-sd3", "--height", "256", "--width", "256", "-p", "x"], 128, 8),
    (["train", "-m", "tiny-flow", "--reward", "compressibility", "--set", "sampling.resolution=48"], 32, 4),
])
def test_a_size_larger_than_the_model_takes_is_one_line(tmp_path, args, largest, multiple):
    """The largest side is pos_embed_max_size × patch size × VAE scale factor: 8 × 1 × 4 for tiny-flow,
    16 × 2 × 4 for tiny-random-sd3 (their configs)."""
    out = tmp_path / "out"
    line = error_line(dag(*args, "-o", out))
    assert f"largest image side is {largest} px (valid: a multiple of {multiple} up to {largest})" in line
    assert not out.exists()  # train writes no config.toml


def test_the_largest_size_is_the_transformers_position_table():
    from dagcli.models import load_model

    for name in ("tiny-flow", "tiny-random-sd3"):
        loaded = load_model(name, device="cpu")
        config, pipe = loaded.pipe.transformer.config, loaded.pipe
        assert loaded.family.max_resolution == config.pos_embed_max_size * config.patch_size * pipe.vae_scale_factor
    assert load_model("tiny-random", device="cpu").family.max_resolution is None


# --- dag eval checks everything before it generates ---------------------------------------------------------


@pytest.mark.parametrize("extra, needle", [
    (["--reward-option", "compressibility.no_such_option=1"], "no_such_option"),
    (["--embed-model", "no/such-clip"], "no/such-clip"),
])
def test_eval_checks_rewards_and_embedding_model_before_generating(runs, tmp_path, extra, needle):
    out = tmp_path / "out"
    line = error_line(dag("eval", "--ckpt", runs["flow"], "-p", "a red circle", "-n", "1", "--steps", "1",
                          "--reward", "compressibility", *extra, "-o", out))
    assert needle in line
    assert not out.exists()  # no images/base/ left behind


# --- sizes of dag sample --ckpt and what samples.jsonl records ---------------------------------------------


def test_sample_with_a_checkpoint_uses_the_runs_size_and_records_it(runs, tmp_path):
    from PIL import Image

    for ckpt, size in ((runs["flow"], FLOW_SIZE), (None, 32)):  # the run's 16 px; without one tiny-flow's 32
        out = tmp_path / f"s{size}"
        proc = dag("sample", *(["--ckpt", ckpt] if ckpt else ["-m", "tiny-flow"]), "-p", "a red circle", "-n", "1",
                   "--steps", "2", "-o", out)
        assert proc.returncode == 0, proc.stderr
        record = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
        assert (record["settings"]["height"], record["settings"]["width"]) == (size, size)
        assert Image.open(out / record["file"]).size == (size, size)


# --- a finished run ----------------------------------------------------------------------------------------


def test_resume_of_a_finished_run_says_so_then_extends_with_more_epochs(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["sd"], run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = dag("train", "--resume", "-o", run)
    assert proc.returncode == 0, proc.stderr
    assert f"{run} is finished: 1 of 1 epochs done; to train it further, pass --resume --epochs N with N > 1" \
        in proc.stderr
    assert "dag train" not in proc.stderr  # no banner: the model was never loaded
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    proc = dag("train", "--resume", "--epochs", "2", "-o", run)
    assert proc.returncode == 0, proc.stderr
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and (run / "checkpoints" / "step-000002" / "meta.json").is_file()


# --- metrics.jsonl matches the checkpoint ------------------------------------------------------------------


def test_a_fresh_run_in_a_folder_without_checkpoints_starts_its_metrics_anew(runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')  # a run killed before its first save
    train_here("--config", runs["config"], "-o", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1] and "reward_mean" in lines[0]


def test_keep_epochs_keeps_the_first_n_and_drops_a_cut_line(tmp_path):
    from dagcli.metrics import MetricsLog
    from dagcli.progress import NullReporter

    lines = [json.dumps({"epoch": e, "x": e}) for e in (1, 2, 3, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 5, "x"')
    MetricsLog(tmp_path, "none", {}, NullReporter()).keep_epochs(2)
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"


def test_eval_with_a_checkpoint_generates_at_the_runs_size(runs, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    proc = dag("eval", "--ckpt", runs["flow"], "-p", "a red circle", "-n", "2", "--steps", "2",
               "--reward", "compressibility", "--embed-model", "none", "--no-lpips", "-o", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["settings"]["height"], report["settings"]["width"]) == (FLOW_SIZE, FLOW_SIZE)
    for model in report["models"]:  # the base model's images too: both sets at one size, compared pixel for pixel
        assert Image.open(out / model["per_prompt"][0]["files"][0]).size == (FLOW_SIZE, FLOW_SIZE)
