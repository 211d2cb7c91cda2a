"""Loading reward weights: local folders first, then the Hugging Face cache, then the hub (`dagcli.hub`).

Every failure becomes one `DagError` line naming the model id or file and the option of the running
command that provides a local copy (`reward_option`). Remote code is never run (`trust_remote_code`
stays off) and weight files are read with safetensors or `torch.load(..., weights_only=True)` only.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from dagcli.errors import DagError
from dagcli.hub import cached_or_download, first_line, quiet_loading

T = TypeVar("T")
HF_FILE_PREFIX = "hf://"  # `hf://owner/repo/path/in/repo.pth` names a file of a hub repository
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def reward_option(reward: str, key: str) -> str:
    """How the running `dag` command sets option `key` of `reward` to a local PATH (for error messages)."""
    flags = _command_flags()
    for param in ("reward_option", "option"):  # dag eval --reward-option, dag rewards --option
        if param in flags:
            return f"{flags[param]} {reward}.{key}=PATH"
    if "set_" in flags:  # dag train: reward options are a TOML table of the config
        return f"--set reward.options.{reward}.{key}=PATH"
    return f"the {reward} option {key}=PATH"


def _command_flags() -> dict[str, str]:
    """Parameter name -> long flag of the command being run (empty outside the command line)."""
    for module in ("typer._click.globals", "click"):  # typer >= 0.29 vendors click
        try:
            ctx = importlib.import_module(module).get_current_context(silent=True)
        except ImportError:
            continue
        if ctx is not None:
            return {p.name: max(p.opts, key=len) for p in ctx.command.params if p.opts}
    return {}


def _looks_like_path(name: str) -> bool:
    """Names that can only mean a local path (not a hub id)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or not _REPO_ID.match(name)


def load_pretrained(load: Callable[..., T], model_id: str | Path, what: str, fix: str | None = None) -> T:
    """`load(model_id, local_files_only=...)` from a local folder, else the HF cache, else the hub.

    `load` is a `from_pretrained`-style function; `what` names the thing for messages ("CLIP model") and
    `fix` is the option that passes a local folder instead (see `reward_option`).
    """
    name = str(model_id)
    folder = Path(name).expanduser()
    if folder.is_dir():
        quiet_loading()
        try:
            return load(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DagError(f"cannot load {what} from folder {str(folder)!r}: {first_line(e)}") from e
    if _looks_like_path(name):
        raise DagError(f"{what} folder {name!r} does not exist")
    return cached_or_download(lambda local: load(name, local_files_only=local), what, name, fix)


def resolve_file(spec: str | Path, what: str, fix: str | None = None) -> Path:
    """A local file path, or `hf://owner/repo/file` fetched through the HF cache (download if allowed)."""
    text = str(spec)
    if not text.startswith(HF_FILE_PREFIX):
        path = Path(text).expanduser()
        if not path.is_file():
            raise DagError(f"{what} file {text!r} does not exist")
        return path
    parts = text[len(HF_FILE_PREFIX) :].split("/")
    if len(parts) < 3 or not all(parts):
        raise DagError(f"{what} {text!r} must look like hf://owner/repo/file.safetensors")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    return Path(
        cached_or_download(
            lambda local: hf_hub_download(repo_id, filename, local_files_only=local), what, text, fix
        )
    )


def load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a `.pth`/`.pt`/`.bin` state dict (weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many types (pickle, zip, safetensors, runtime)
        raise DagError(f"cannot read {what} file {str(path)!r}: {first_line(e)}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DagError(f"{what} file {str(path)!r} is not a plain state dict of tensors")
    return state
