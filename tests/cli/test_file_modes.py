"""Every file a run and its exports write has the mode of any new file (0666 less the umask), weights too."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from helpers.cli import run_cli, write_tiny_config


def usual_mode(folder: Path) -> int:
    """The permission bits of a file that plain `open` creates now, under the current umask."""
    probe = folder / "probe.txt"
    probe.write_text("x")
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    return mode


def modes(root: Path) -> dict[str, int]:
    """Relative path -> permission bits of every file under `root` (or of `root` itself, a file)."""
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in files}


@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one comes back after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_run_and_exports_have_the_usual_file_mode(mask, umask, tmp_path, tiny_pipeline_dir, capsys):
    from dagcli import api

    umask(mask)
    expected = usual_mode(tmp_path)
    assert expected == 0o666 & ~mask
    config = write_tiny_config(tmp_path, tiny_pipeline_dir, ["a red circle"], train={"epochs": 1},
                               output={"dir": str(tmp_path / "run")})
    api.train(config)
    outputs = {"kohya": tmp_path / "lora.safetensors", "diffusers": tmp_path / "lora", "merged": tmp_path / "merged"}
    for fmt, out in outputs.items():
        code, _, err = run_cli(["export", tmp_path / "run", "--format", fmt, "-o", out], capsys)
        assert code == 0, err
    written = modes(tmp_path / "run")
    for out in outputs.values():
        written.update(modes(out))
    assert any(name.endswith(".safetensors") for name in written)
    assert {name: oct(m) for name, m in written.items() if m != expected} == {}
