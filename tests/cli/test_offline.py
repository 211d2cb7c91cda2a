"""Hub weights with no network: a fast one-line error naming the option that fixes it, nothing on disk."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from dagcli import hub
from dagcli.checks import check_writable_dir
from dagcli.errors import DagError
from dagcli.models import load_model
from helpers.cli import run_cli

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once


@pytest.fixture()
def no_hub(monkeypatch, tmp_path):
    """An unreachable hub and an empty cache for the Hugging Face libraries; downloads not forbidden."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    hub._probe.cache_clear()
    yield
    hub._probe.cache_clear()


def dag_offline(*args, cwd: Path, hf_home: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`dag ARGS` in a subprocess with no reachable hub and an empty HF_HOME; (result, seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=CLOSED, HF_HOME=str(hf_home))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dagcli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - start


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--reward", "aesthetic"], ["aesthetic MLP", "--set reward.options.aesthetic.mlp_path=PATH"]),
        (["--model", "someone/missing-model"], ["model 'someone/missing-model'", "--model PATH"]),
    ],
)
def test_train_without_network_fails_in_one_line_and_leaves_nothing(tmp_path, args, needles):
    run = tmp_path / "runs" / "new-run"
    done, seconds = dag_offline("train", *args, "--epochs", "1", "-o", run, cwd=tmp_path, hf_home=tmp_path / "hf")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # no retry warnings, no progress, no traceback
    for needle in [*needles, "cannot be reached", CLOSED, "HF_HOME", "HF_HUB_OFFLINE=1"]:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()  # neither the run folder nor its parent
    assert seconds < 120  # imports included; the retries it replaces took 29-52 s on top


def test_an_unreachable_hub_is_known_within_seconds(no_hub):
    from diffusers import StableDiffusionPipeline  # noqa: F401  (imports are not what is timed)

    start = time.perf_counter()
    with pytest.raises(DagError) as info:
        load_model("someone/missing-model", device="cpu")
    assert time.perf_counter() - start < 5  # huggingface_hub's own retries wait 1+2+4+8+8 s
    message = str(info.value)
    assert "--model PATH" in message and f"the hub ({CLOSED}) cannot be reached" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "command, needle",
    [
        (["rewards", "-r", "aesthetic", "--score", "{images}"], "--reward-option aesthetic.mlp_path=PATH"),
        (["rewards", "-r", "clip", "--reward-option", "clip.model_id=someone/clip", "--score", "{images}"],
         "--reward-option clip.model_id=PATH"),
        (["eval", "--images", "{images}", "-r", "pickscore", "--embed-model", "none", "-o", "{tmp}/out"],
         "--reward-option pickscore.model_id=PATH"),
    ],
)
def test_reward_errors_name_the_option_of_the_command_at_hand(no_hub, tmp_path, capsys, command, needle):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    args = [a.replace("{images}", str(images)).replace("{tmp}", str(tmp_path)) for a in command]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_offline_mode_is_named_and_nothing_is_probed(monkeypatch, no_hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "hub_unreachable", lambda: pytest.fail("offline, the hub is not asked"))
    with pytest.raises(DagError) as info:
        load_model("someone/missing-model", device="cpu")
    assert "HF_HUB_OFFLINE=1 forbids downloads" in str(info.value) and "--model PATH" in str(info.value)


def test_probe_honours_the_endpoint_and_is_asked_once(monkeypatch, no_hub):
    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_unreachable() is None
    calls = []
    real = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    assert "refused" in hub.hub_unreachable().lower()
    assert "refused" in hub.hub_unreachable().lower()
    assert calls == [(("127.0.0.1", 9),)]


def test_probe_goes_through_the_proxy_that_applies(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert hub._connect_target("https://huggingface.co") == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert hub._connect_target("https://huggingface.co") == ("huggingface.co", 443)


def test_check_writable_dir_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "run"
    check_writable_dir(target)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(DagError, match="is a file, not a folder"):
        check_writable_dir(tmp_path / "file" / "run")
    check_writable_dir(tmp_path)  # an existing folder: a probe file comes and goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
