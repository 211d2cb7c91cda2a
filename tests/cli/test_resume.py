"""A resumed run keeps its own settings; the model supplies the defaults a user leaves out; time-based checkpoints."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from dagcli.algorithms import ALGORITHMS
from dagcli.config import fill_model_defaults, load_config
from helpers import unit_algorithms
from helpers.cli import run_cli, write_tiny_config


@pytest.fixture
def tiny_config(tmp_path, tiny_pipeline_dir):
    return write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle", "a blue square"],
                             dag={"beta": 1.0, "beta_ramp_epochs": 2}, output={"checkpoint_every": 1})


@pytest.mark.parametrize("algorithm", [*ALGORITHMS, *unit_algorithms.INFOS])
def test_resume_equals_uninterrupted(algorithm, tmp_path, tiny_pipeline_dir, capsys, monkeypatch):
    """Every algorithm, and a user of each loss unit: 1 epoch + a resume to 3 equals 3 epochs straight."""
    unit_algorithms.register(monkeypatch)
    cfg = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle", "a blue square", "a green triangle"],
                            sampling={"batch_size": 4}, train={"algorithm": algorithm}, grpo={"group_size": 2},
                            nft={"group_size": 2}, dag={"beta": 1.0, "beta_ramp_epochs": 2}, lora={"init": "true"},
                            output={"checkpoint_every": 1, "keep_last": 2})
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(["train", "--config", cfg, "--epochs", "3", "-o", a], capsys)[0] == 0
    assert run_cli(["train", "--config", cfg, "--epochs", "1", "-o", b], capsys)[0] == 0
    assert run_cli(["train", "--config", cfg, "--epochs", "3", "-o", b, "--resume"], capsys)[0] == 0
    names = ["pytorch_lora_weights.safetensors"] + (["flow.safetensors"] if ALGORITHMS[algorithm].section == "dag"
                                                    else []) + (["log_z.safetensors"] if algorithm == "rtb" else []) + (
        ["algorithm_state.safetensors"] if algorithm == "nft" else [])  # its sampling policy's LoRA
    assert {p.name for p in (a / "checkpoints" / "step-000003").glob("*.safetensors")} == set(names)
    for name in names:
        wa = load_file(a / "checkpoints" / "step-000003" / name)
        wb = load_file(b / "checkpoints" / "step-000003" / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    lora = load_file(a / "checkpoints" / "step-000003" / names[0])
    assert any(v.abs().max() > 0 for k, v in lora.items() if ".lora.up." in k)  # it trained (up = B, zero at init)
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step-000002", "step-000003"]  # keep_last


def test_resume_takes_the_runs_own_settings(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", "--config", tiny_config, "--epochs", "1", "-o", run], capsys)[0] == 0
    saved = (run / "config.toml").read_text()
    # no --config: the run's reward, model and prompts, not the global defaults (aesthetic, a hub model)
    code, _, err = run_cli(["train", "-o", run, "--resume", "--epochs", "2"], capsys)
    assert code == 0, err
    assert "train.epochs 1 -> 2" in " ".join(err.split())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert "reward/compressibility_mean" in lines[-1]
    resumed = load_config(run / "config.toml")
    assert resumed.train.epochs == 2 and resumed.reward.spec == "compressibility"
    assert re.sub(r"(?m)^epochs = 1$", "epochs = 2", saved) == (run / "config.toml").read_text()  # train.epochs


@pytest.mark.parametrize("flag, key, old, new", [  # a flag is named as typed, a key given with --set as the key
    (["--reward", "colorfulness"], "--reward colorfulness", "'compressibility'", None),
    (["--set", "train.learning_rate=1e-4"], "train.learning_rate", "0.03", "0.0001"),
    (["--set", "lora.rank=8"], "lora.rank", "4", "8"),
    (["--algorithm", "ddpo"], "--algorithm ddpo", "'dag-db'", None),
])
def test_resume_refuses_changes_to_what_is_trained(tiny_config, tmp_path, capsys, flag, key, old, new):
    run = tmp_path / "run"
    assert run_cli(["train", "--config", tiny_config, "--epochs", "1", "-o", run], capsys)[0] == 0
    before = (run / "config.toml").read_bytes()
    code, _, err = run_cli(["train", "-o", run, "--resume", "--epochs", "2", *flag], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (f"{key} = {new}" if new else key) + f" differs from the run's {old}" in err
    assert (run / "config.toml").read_bytes() == before  # never silently rewritten
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_accepts_the_same_preset_and_watching_flags(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", "--config", tiny_config, "--epochs", "1", "-o", run], capsys)[0] == 0
    code, _, err = run_cli(["train", "--config", tiny_config, "-o", run, "--resume", "--epochs", "2",
                            "--set", "output.keep_last=1", "--set", "output.checkpoint_minutes=5"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]


def test_model_defaults_fill_what_is_unset(tiny_pipeline_dir):
    tiny, _ = fill_model_defaults(load_config(None, ['model.name="tiny"']))
    assert (tiny.sampling.prompts, tiny.sampling.steps, tiny.sampling.guidance, tiny.sampling.resolution) == \
        ("shapes", 25, 3.0, 32)
    assert tiny.sampling.eta == 1.0  # DDIM's η of the Stable Diffusion family: tiny is an SD pipeline
    sd, said = fill_model_defaults(load_config(None, [f'model.name="{tiny_pipeline_dir}"']))
    assert (sd.sampling.prompts, sd.sampling.steps, sd.sampling.guidance, sd.sampling.resolution) == \
        ("simple_animals", 50, 5.0, None)
    assert "Stable Diffusion reference" in said
    given, said = fill_model_defaults(load_config(None, ['model.name="tiny"', "sampling.steps=7",
                                                         'sampling.prompts="x.txt"']))
    assert (given.sampling.steps, given.sampling.prompts, given.sampling.guidance) == (7, "x.txt", 3.0)
    assert not re.search(r"\bsteps\b", said) and "guidance 3" in said
    assert fill_model_defaults(load_config(None, []))[0].model.name == "tiny"  # the built-in default model


def test_train_on_the_builtin_model_says_which_defaults_it_used(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--reward", "compressibility", "--epochs", "1", "--batch-size", "2",
                            "--set", "sampling.batches_per_epoch=1", "--train-batch-size", "10",
                            "--set", "train.gradient_accumulation_steps=1", "--set", "sampling.steps=5",
                            "--device", "cpu", "-o", run], capsys)
    assert code == 0, err
    said = " ".join(err.split())  # however the terminal wraps it
    assert "from the defaults of model 'tiny': prompts 'shapes', guidance 3, eta 1, resolution 32" in said
    cfg = load_config(run / "config.toml")
    assert (cfg.sampling.prompts, cfg.sampling.steps, cfg.model.name) == ("shapes", 5, "tiny")


def test_checkpoints_by_time_as_well_as_by_epoch(tiny_config, tmp_path, capsys):
    every_epoch, only_last = tmp_path / "a", tmp_path / "b"
    common = ["train", "--config", tiny_config, "--epochs", "3", "--set", "output.checkpoint_every=100"]
    assert run_cli([*common, "--set", "output.checkpoint_minutes=1e-9", "-o", every_epoch], capsys)[0] == 0
    assert run_cli([*common, "--set", "output.checkpoint_minutes=0", "-o", only_last], capsys)[0] == 0
    names = lambda run: sorted(p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    assert names(every_epoch) == ["step-000001", "step-000002", "step-000003"]
    assert names(only_last) == ["step-000003"]


def test_timestep_fraction_keeps_the_optimiser_steps_per_epoch(tiny_config, tmp_path, capsys):
    """3 trajectories x 4 steps in micro-batches of 3, 2 per optimiser step: 2 steps an epoch at fraction 1 (4
    micro-batches), and still 2 at fraction 0.5 (2 micro-batches, 1 per step), as the reference code does."""
    steps = {}
    for fraction in (1.0, 0.5):
        run = tmp_path / f"f{fraction}"
        code, _, err = run_cli(["train", "--config", tiny_config, "--epochs", "1", "-o", run,
                                "--train-batch-size", "3", "--set", f"train.timestep_fraction={fraction}"], capsys)
        assert code == 0, err
        steps[fraction] = json.loads((run / "metrics.jsonl").read_text())["optimizer_steps"]
    assert steps == {1.0: 2, 0.5: 2}
