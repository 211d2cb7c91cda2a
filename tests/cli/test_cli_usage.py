"""First contact with `dag`: usage errors, help output, `-o`, and the reward weight in a spec."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from dagcli import cli
from dagcli.builtin import TINY_NAME
from dagcli.config import Config
from helpers.cli import run_cli

COMMANDS = ["train", "sample", "eval", "export", "rewards"]

# (arguments, text the message must contain): each a usage error of click, not of dagcli
USAGE_ERRORS = {
    "unknown option": (["train", "--epoch", "1"], ["--epoch", "--epochs"]),
    "not an integer": (["train", "--epochs", "abc"], ["--epochs", "'abc'"]),
    "unknown command": (["smaple"], ["'smaple'", "Did you mean 'sample'?"]),
    "missing argument": (["export"], ["Missing argument 'RUN'"]),
    "not a number": (["sample", "--eta", "high"], ["--eta", "'high'"]),
}


def dag_command() -> list[str]:
    """The installed `dag` script next to this interpreter, else `python -m dagcli`."""
    script = Path(sys.executable).parent / "dag"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dagcli"]


@pytest.fixture(scope="module")
def script_runs() -> dict[str, subprocess.CompletedProcess]:
    """Every case run through the real script, all at once (each start imports torch)."""
    cases = {name: args for name, (args, _) in USAGE_ERRORS.items()}
    cases["bad choice"] = ["export", "some-run", "--format", "zip"]
    cases["bare"] = []
    cases["help"] = ["--help"]
    env = {**os.environ, "COLUMNS": "80"}
    procs = {
        name: subprocess.Popen([*dag_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
        for name, args in cases.items()
    }
    return {name: subprocess.CompletedProcess(p.args, *_wait(p)) for name, p in procs.items()}


def _wait(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error_is_one_message_and_exit_2(script_runs, case):
    run = script_runs[case]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    lines = run.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2, run.stderr
    for needle in USAGE_ERRORS[case][1]:
        assert needle in lines[0]


def test_bad_choice_names_the_value_and_the_choices(script_runs):
    run = script_runs["bad choice"]
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == "error: unknown export format 'zip'; valid options: diffusers, kohya, merged"


def test_bare_dag_shows_the_help(script_runs):
    bare, help_ = script_runs["bare"], script_runs["help"]
    assert bare.returncode == 0 == help_.returncode and bare.stderr == ""
    assert bare.stdout.rstrip() == help_.stdout.rstrip() and "Commands" in bare.stdout


def test_click_package_errors_are_usage_errors_too(monkeypatch, capsys):
    """Code that raises the click package's own exceptions (typer without a vendored click) is handled alike."""
    click = pytest.importorskip("click")
    app = cli.DagTyper(cls=cli.DagGroup)

    @app.command("boom")
    def boom() -> None:
        raise click.BadParameter("'7' is not one of 'a', 'b'", param_hint="'--pick'")

    @app.command("other")
    def other() -> None:  # a second command, so that `boom` stays a subcommand
        pass

    monkeypatch.setattr(cli, "app", app)
    code, _, err = run_cli(["boom"], capsys)
    assert code == 2 and err == "error: Invalid value for '--pick': '7' is not one of 'a', 'b'\n"


def test_bad_reward_weight_is_named_before_anything_loads(tmp_path, capsys):
    code, _, err = run_cli(["train", "--reward", "compressibility:abc", "-o", tmp_path / "run"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == ("error: reward weight 'abc' in 'compressibility:abc' is not a number; "
                           "use NAME:WEIGHT, e.g. compressibility:0.5")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- help


def help_text(capsys, monkeypatch, command: str, columns: int) -> str:
    """`dag COMMAND --help` as a terminal of `columns` columns shows it (rich; a pipe gets plain text)."""
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    code, out, err = run_cli([command, "--help"] if command else ["--help"], capsys)
    assert code == 0, err
    return re.sub(r"\x1b\[[0-9;]*m", "", out)  # the terminal's styles


def click_params(command: str):
    group = typer.main.get_command(cli.app)
    return group.commands[command].params if command else group.params


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_fits_80_columns_and_flags_show_no_type(command, capsys, monkeypatch):
    cli._register_commands()
    out = help_text(capsys, monkeypatch, command, 80)
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    assert "<bool>" not in out
    flags = [p.opts[0] for p in click_params(command) if getattr(p, "is_flag", False)] + ["--help"]
    for flag in flags:  # the flag's row: its name, then (after a possible --no-X) straight to the help text
        row = next(line for line in out.splitlines() if f"{flag} " in line)
        assert "<" not in row.split(flag, 1)[1][:30], row


def test_train_help_shows_every_effective_default(capsys, monkeypatch):
    out = help_text(capsys, monkeypatch, "train", 250)
    c = Config()
    expected = {
        "--algorithm": c.train.algorithm, "--epochs": c.train.epochs,
        "--batch-size": c.sampling.batch_size, "--train-batch-size": c.train.batch_size, "--seed": c.train.seed,
        "--output": c.output.dir, "--model": TINY_NAME, "--device": c.model.device, "--dtype": c.model.dtype,
        "--report-to": c.output.report_to,
    }
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"^│ --", line)}
    for flag, value in expected.items():
        assert f"[default: {value}]" in rows[flag], rows[flag]
    for flag in ["--steps", "--prompts", "--eta", "--guidance"]:
        assert "[default: the model's; Stable Diffusion: " in rows[flag]
    assert "[default: the model's; built-in models: compressibility, others: aesthetic]" in rows["--reward"]


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sampler_help_says_defaults_come_from_the_model(command, capsys, monkeypatch):
    out = help_text(capsys, monkeypatch, command, 250)
    assert "[default: the model's; Stable Diffusion: 50]" in out
    assert "[default: the model's; Stable Diffusion: 5]" in out
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in out


def test_short_o_is_output_in_every_command():
    cli._register_commands()
    group = typer.main.get_command(cli.app)
    with_o = {name: cmd for name, cmd in group.commands.items() if any("-o" in p.opts for p in cmd.params)}
    assert {"train", "sample", "eval", "export"} <= set(with_o)
    for name, cmd in with_o.items():
        assert [p.opts for p in cmd.params if "-o" in p.opts] == [["--output", "-o"]], name
    rewards = {opt for p in group.commands["rewards"].params for opt in p.opts}
    assert "-o" not in rewards and {"--reward-option", "--option"} <= rewards


def test_help_and_usage_errors_do_not_import_torch():
    """`dag --help` and a mistyped flag answer in well under a second: no command module imports torch."""
    code = "import sys; from dagcli import cli; cli._register_commands(); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr


def test_device_and_dtype_names_match_the_models_module():
    from dagcli.commands import common
    from dagcli.models import DEVICES, DTYPES

    assert common.DEVICES == DEVICES and common.DTYPES == tuple(DTYPES)
