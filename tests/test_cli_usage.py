"""First contact with `dag`: usage errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import run_cli
from dagcli import cli

# (arguments, text the message must contain): each a usage error of click, not of dagcli
USAGE_ERRORS = {
    "unknown option": (["train", "--epoch", "1"], ["--epoch", "--epochs"]),
    "not an integer": (["train", "--epochs", "abc"], ["--epochs", "'abc'"]),
    "unknown command": (["smaple"], ["'smaple'", "Did you mean 'sample'?"]),
    "missing argument": (["export"], ["Missing argument 'run'"]),
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


def test_help_and_usage_errors_do_not_import_torch():
    """`dag --help` and a mistyped flag answer in well under a second: no command module imports torch."""
    code = "import sys; from dagcli import cli; cli._register_commands(); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr


def test_device_and_dtype_names_match_the_models_module():
    from dagcli.commands import common
    from dagcli.models import DEVICES, DTYPES

    assert common.DEVICES == DEVICES and common.DTYPES == tuple(DTYPES)
