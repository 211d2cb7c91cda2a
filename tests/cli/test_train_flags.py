"""`dag train` as a newcomer meets it: its flags named in messages, the sampler flags sample and eval have, and
the built-in models' defaults (offline, no accumulation warning). Through the installed `dag` in a pipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dagcli.config import Config
from helpers.cli import run_cli

TOML = "[train]\nbatch_size = 0\n"

# (arguments, the exact line on stderr); {dir} is the folder the command runs in
BAD_TRAIN_INPUT = {
    "flag": (["--train-batch-size", "0"], "error: --train-batch-size 0: must be positive"),
    "flag of sampling": (["--batch-size", "0"], "error: --batch-size 0: must be positive"),
    "two flags": (["--epochs", "0", "--steps", "0"],
                  "error: --steps 0: must be positive; --epochs 0: must be positive"),
    "flag and a key it meets": (["--algorithm", "grpo", "--batch-size", "4"],
                                "error: --batch-size 4 does not divide into groups of grpo.group_size = 8; use a "
                                "multiple of 8 (e.g. 8) or another group size"),
    "--set is named by key": (["--set", "train.batch_size=0"],
                              "error: invalid configuration: train.batch_size = 0: must be positive"),
    "a preset is named by key": (["--config", "{dir}/bad.toml"],
                                 "error: invalid configuration: train.batch_size = 0: must be positive"),
    "the flag wins over --set": (["--set", "train.batch_size=3", "--train-batch-size", "0"],
                                 "error: --train-batch-size 0: must be positive"),
    "config is a folder": (["--config", "{dir}"],
                           "error: --config '{dir}' is a directory; expected a TOML file (see examples/)"),
    "config is missing": (["--config", "{dir}/nope.toml"],
                          "error: --config '{dir}/nope.toml' not found; expected a TOML file (see examples/)"),
    "eta 0": (["--eta", "0"], "error: --eta 0: training needs a stochastic sampler, eta > 0"),
    "eta above DDIM's": (["--eta", "1.5"], "error: --eta 1.5: this model's sampler needs 0 < eta <= 1"),
    "guidance": (["--guidance", "-1"], "error: --guidance -1: must not be negative"),
    "dtype": (["--dtype", "fp8"], "error: --dtype fp8: valid options: fp32, bf16, fp16"),
    "micro-batch": (["--train-batch-size", "7"],
                    "error: --train-batch-size 7 does not divide the 1600 transitions trained per epoch "
                    "(16 trajectories x 4 sampler calls x 25 steps); valid options: 1, 2, 4, 5, 8, 10, 16, 20, 25, "
                    "32, 40, 50, 64"),
}


def dag_command() -> list[str]:
    """The installed `dag` script next to this interpreter, else `python -m dagcli`."""
    script = Path(sys.executable).parent / "dag"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dagcli"]


def offline_env(home: Path) -> dict[str, str]:
    """No network and an empty Hugging Face cache: only what ships with the package can load."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf"), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every bad case through the real script, at once, each in its own empty folder."""
    procs = {}
    for name, (args, _) in BAD_TRAIN_INPUT.items():
        folder = tmp_path_factory.mktemp("bad")
        (folder / "bad.toml").write_text(TOML)
        argv = [a.format(dir=folder) for a in args]
        procs[name] = (subprocess.Popen([*dag_command(), "train", *argv], cwd=folder, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=offline_env(folder)), folder)
    runs = {}
    for name, (proc, folder) in procs.items():
        out, err = proc.communicate(timeout=300)
        runs[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), folder)
    return runs


@pytest.mark.parametrize("case", list(BAD_TRAIN_INPUT))
def test_bad_train_input_names_what_the_user_typed_once(bad_runs, case):
    run, folder = bad_runs[case]
    expected = BAD_TRAIN_INPUT[case][1].format(dir=folder)
    assert (run.returncode, run.stdout, run.stderr) == (2, "", expected + "\n")
    assert sorted(p.name for p in folder.iterdir()) == ["bad.toml"]  # nothing written


def test_train_takes_the_sampler_flags_of_sample_and_eval(monkeypatch, capsys):
    from dagcli import api

    seen = []
    monkeypatch.setattr(api, "run_plan", lambda plan, **kwargs: seen.append(plan.config))
    code, _, err = run_cli(["train", "--eta", "0.5", "--guidance", "2", "--dtype", "bf16"], capsys)
    assert code == 0, err
    assert (seen[0].sampling.eta, seen[0].sampling.guidance, seen[0].model.dtype) == (0.5, 2.0, "bf16")
    code, _, err = run_cli(["train", "--set", "sampling.eta=0.3", "--set", 'model.dtype="fp16"'], capsys)
    assert code == 0, err
    assert (seen[1].sampling.eta, seen[1].model.dtype) == (0.3, "fp16")  # unset flags leave the keys alone


def _help_rows(capsys, monkeypatch, command: str) -> dict[str, str]:
    """Flag -> its help text, from `dag COMMAND --help` in a wide terminal."""
    import re

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich help, as a terminal shows it (a pipe gets plain text)
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    rows = {}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", out).splitlines():
        m = re.match(r"^│ (--[\w-]+)\s+(?:-\w\s+)?(?:<\w+>\s+)?(.*?)\s*│$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_sampler_flags_share_one_definition(capsys, monkeypatch):
    train, sample, evaluate = (_help_rows(capsys, monkeypatch, c) for c in ("train", "sample", "eval"))
    for flag in ("--steps", "--guidance", "--dtype"):
        assert sample[flag] == evaluate[flag], flag
    assert train["--steps"] == sample["--steps"] and train["--guidance"] == sample["--guidance"]
    assert sample["--eta"] == evaluate["--eta"]
    assert "(0, 1]" in train["--eta"] and "SD3: 0.7, FLUX: 0.9" in train["--eta"]  # training needs noise


def test_builtin_models_default_to_an_offline_reward_and_no_accumulation():
    from dagcli.builtin import PRETRAINED_DIRS
    from dagcli.builtin.random_models import RANDOM_MODELS
    from dagcli.config import fill_model_defaults, replace

    assert Config().reward.spec is None and Config().train.gradient_accumulation_steps is None
    for name in [*PRETRAINED_DIRS, *RANDOM_MODELS, ""]:  # "": the default model
        cfg, said = fill_model_defaults(replace(Config(), "model", name=name))
        assert (cfg.reward.spec, cfg.train.gradient_accumulation_steps) == ("compressibility", 1), name
        assert "reward 'compressibility'" in said and "gradient_accumulation_steps 1" in said
    sd, _ = fill_model_defaults(replace(Config(), "model", name="stable-diffusion-v1-5/stable-diffusion-v1-5"))
    assert (sd.reward.spec, sd.train.gradient_accumulation_steps) == ("aesthetic", 200)
    given, _ = fill_model_defaults(Config(reward=replace(Config(), "reward", spec="clip").reward))
    assert given.reward.spec == "clip"


def test_bare_dag_train_runs_offline(tmp_path):
    """No flag at all, no network, an empty cache: the built-in model trains; two Ctrl-Cs stop it at once."""
    env = {**offline_env(tmp_path), "DAGCLI_FAULT": "optimizer-step:1:INT,optimizer-step:2:INT"}
    run = subprocess.run([*dag_command(), "train"], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 130, run.stderr
    assert "dag train dag-db on tiny · reward compressibility" in run.stderr
    assert "warning: " not in run.stderr.replace("warning: stopping after this epoch", "")
    assert "Traceback" not in run.stderr and (tmp_path / "runs" / "dag" / "config.toml").is_file()


def test_small_runs_of_the_builtin_model_do_not_warn_about_accumulation(tmp_path):
    args = ["train", "--batch-size", "2", "--steps", "4", "--epochs", "1", "--device", "cpu"]
    run = subprocess.run([*dag_command(), *args, "-o", "run"], cwd=tmp_path, capture_output=True, text=True,
                         env=offline_env(tmp_path), timeout=600)
    assert run.returncode == 0, run.stderr
    assert "4 micro-batches, 4 optimiser step(s)/epoch" in run.stderr and "warning" not in run.stderr
    # an accumulation larger than the epoch: one optimiser step per epoch, nothing to warn about either
    run = subprocess.run([*dag_command(), *args, "-o", "big", "--set", "train.gradient_accumulation_steps=200"],
                         cwd=tmp_path, capture_output=True, text=True, env=offline_env(tmp_path), timeout=600)
    assert run.returncode == 0 and "1 optimiser step(s)/epoch" in run.stderr and "warning" not in run.stderr
    # ... while an uneven last step still is
    run = subprocess.run([*dag_command(), *args, "-o", "odd", "--set", "train.gradient_accumulation_steps=3"],
                         cwd=tmp_path, capture_output=True, text=True, env=offline_env(tmp_path), timeout=600)
    assert run.returncode == 0
    assert ("warning: 4 micro-batches per epoch are not a multiple of 3 micro-batches per optimiser step; the last "
            "optimiser step of each epoch accumulates fewer") in run.stderr
