"""Loading reward weights: local folders first, then the Hugging Face cache, then the hub.

Every failure becomes one `DagError` line naming the model id or file and how to provide it. Remote code
is never run (`trust_remote_code` stays off) and weight files are read with safetensors or
`torch.load(..., weights_only=True)` only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from dagcli.errors import DagError

T = TypeVar("T")
HF_FILE_PREFIX = "hf://"  # `hf://owner/repo/path/in/repo.pth` names a file of a hub repository
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """True when the environment forbids hub downloads (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def missing_weights_message(what: str, model_id: str, local: str = "folder") -> str:
    """How to provide weights that could not be found or downloaded (`local`: "folder" or "file")."""
    if hub_offline():
        tail = "HF_HUB_OFFLINE=1 is set, so nothing is downloaded"
    else:
        tail = "set HF_HUB_OFFLINE=1 to skip download attempts"
    return (
        f"{what} {model_id!r} is not available: pass a local {local} path instead, or download it once with "
        f"network access, or point HF_HOME at a Hugging Face cache that holds it ({tail})"
    )


def _looks_like_path(name: str) -> bool:
    """Names that can only mean a local path (not a hub id)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or not _REPO_ID.match(name)


def load_pretrained(load: Callable[..., T], model_id: str | Path, what: str) -> T:
    """`load(model_id, local_files_only=...)` from a local folder, else the HF cache, else the hub.

    `load` is a `from_pretrained`-style function; `what` names the thing for messages ("CLIP model").
    """
    name = str(model_id)
    folder = Path(name).expanduser()
    if folder.is_dir():
        try:
            return load(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DagError(f"cannot load {what} from folder {str(folder)!r}: {_first_line(e)}") from e
    if _looks_like_path(name):
        raise DagError(f"{what} folder {name!r} does not exist")
    try:
        return load(name, local_files_only=True)
    except (OSError, ValueError) as cached_error:
        if hub_offline():
            raise DagError(missing_weights_message(what, name)) from cached_error
    try:
        return load(name)
    except (OSError, ValueError) as e:
        raise DagError(f"{missing_weights_message(what, name)}; {_first_line(e)}") from e


def resolve_file(spec: str | Path, what: str) -> Path:
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

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except OSError as cached_error:
        if hub_offline():
            raise DagError(missing_weights_message(what, text, "file")) from cached_error
    try:
        return Path(hf_hub_download(repo_id, filename))
    except OSError as e:
        raise DagError(f"{missing_weights_message(what, text, 'file')}; {_first_line(e)}") from e


def load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file, or of a `.pth`/`.pt`/`.bin` state dict (weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many types (pickle, zip, safetensors, runtime)
        raise DagError(f"cannot read {what} file {str(path)!r}: {_first_line(e)}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DagError(f"{what} file {str(path)!r} is not a plain state dict of tensors")
    return state


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors are often paragraphs)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__
