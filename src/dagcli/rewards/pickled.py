"""The pickle protocol of Flow-GRPO's reward servers (yifan123/reward-server: GenEval, DeQA; OCR servers alike).

    --reward pickle+http://127.0.0.1:18085

Each request is `POST /` with the body `pickle.dumps({"images": [JPEG bytes, ...], "meta_datas": [dict per image],
"only_strict": bool, "prompts": [...]})`; the reply is a pickled dict whose `scores` list (option `key`: e.g.
`strict_rewards` for GenEval's strict accuracy, `outputs` for DeQA) holds one number per image. A failing server
answers HTTP 500 with its traceback as text, shown as one line.

Unpickling what a server sends can run any code it chooses. So this dialect is opt-in by its scheme, talks only to
the host the user names, refuses any host but this machine (127.0.0.1, localhost, ::1) unless the option
`allow_remote=true` is given, and unpickles the reply with an unpickler that builds nothing but dicts, lists,
tuples, numbers, strings and numpy arrays (anything else is refused, not run). Prefer `dag serve-reward` (JSON)
where the reward can run in it.
"""

from __future__ import annotations

import io
import pickle

import torch
from PIL import Image

from dagcli.errors import DagError
from dagcli.rewards.base import positive_int, to_hwc_arrays
from dagcli.rewards.remote import (
    HTTP_FALSE,
    HTTP_TRUE,
    ServerURL,
    numeric_scores,
    options_and_client,
    score_in_batches,
)

DEFAULT_BATCH = 64  # what Flow-GRPO sends per request
DEFAULT_TIMEOUT = 120.0
JPEG_QUALITY = 75  # PIL's default, what Flow-GRPO's client uses
SAFE_GLOBALS = {
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "float"), ("builtins", "int"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bool"),
    ("collections", "defaultdict"), ("collections", "OrderedDict"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class SafeUnpickler(pickle.Unpickler):
    """Builds plain containers, numbers, strings and numpy arrays only; any other class or function is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise DagError(f"the reply needs {module}.{name} to be unpickled, which dagcli does not run; "
                           "a reward server should reply plain lists, dicts, numbers and numpy arrays")
        return super().find_class(module, name)


def safe_loads(data: bytes, who: str) -> object:
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except DagError as e:
        raise DagError(f"{who}: {e}") from None
    except Exception as e:  # a truncated or foreign body raises many types
        head = data[:60].decode("utf-8", "replace")
        raise DagError(f"{who} replied something that is not a pickle ({type(e).__name__}): {head!r}") from None


def check_host(url: ServerURL, allow_remote: object) -> None:
    """Refuse a pickle server on another machine unless `allow_remote` is true."""
    allowed = str(allow_remote).strip().lower() if allow_remote is not None else "false"
    if allowed not in HTTP_TRUE | HTTP_FALSE:
        raise DagError(f"option allow_remote of {url.text!r} must be true or false, got {allow_remote!r}")
    if not url.loopback and allowed not in HTTP_TRUE:
        raise DagError(f"refusing {url.text!r}: replies of a pickle server are unpickled, and unpickling can run "
                       f"the server's code, so only servers on this machine (127.0.0.1, localhost, ::1) are used; "
                       f"if you trust {url.host}, give the option allow_remote=true")


def jpeg_bytes(images: torch.Tensor, quality: int) -> list[bytes]:
    out = []
    for array in to_hwc_arrays(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


class PickleReward:
    """A reward computed by a Flow-GRPO-style pickle server."""

    slow = True

    def __init__(self, url: ServerURL, client, name: str, key: str, batch_size: int, only_strict: bool,
                 quality: int):
        self.url, self.client, self.name, self.key = url, client, name, key
        self.batch_size, self.only_strict, self.quality = batch_size, only_strict, quality

    def __repr__(self) -> str:
        return f"PickleReward({self.url.text!r})"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        return score_in_batches(self._batch, self.name, self.batch_size, images, prompts, metadata)

    def _batch(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        body = pickle.dumps({"images": jpeg_bytes(images, self.quality), "meta_datas": metadata,
                             "only_strict": self.only_strict, "prompts": prompts})
        reply = safe_loads(self.client.request(self.url.endpoint(""), body, "application/octet-stream"),
                           self.client.who)
        if not isinstance(reply, dict) or self.key not in reply:
            keys = ", ".join(map(str, reply)) if isinstance(reply, dict) else type(reply).__name__
            raise DagError(f"{self.client.who} replied no {self.key!r} (it has: {keys}); choose one with the "
                           "option key")
        return numeric_scores(reply[self.key], len(images), self.client.who, self.key)


def remote_pickle(url: ServerURL, timeout=None, retries=None, backoff=None, batch_size=None, name=None, key=None,
                  only_strict=None, jpeg_quality=None, allow_remote=None) -> PickleReward:
    """Options: key (the reply's list of scores, `scores`), batch_size (64), only_strict (true), jpeg_quality (75),
    allow_remote (false: only this machine), timeout (120 s), retries (3), backoff (0.5 s), name."""
    given = dict(timeout=timeout, retries=retries, backoff=backoff, batch_size=batch_size, name=name, key=key,
                 only_strict=only_strict, jpeg_quality=jpeg_quality, allow_remote=allow_remote)
    check_host(url, {**url.options, **{k: v for k, v in given.items() if v is not None}}.get("allow_remote"))
    o, client = options_and_client(url, given, f"pickle reward server {url.text}", DEFAULT_TIMEOUT)
    strict = str(o.get("only_strict", "true")).strip().lower()
    if strict not in HTTP_TRUE | HTTP_FALSE:
        raise DagError(f"option only_strict of {url.text!r} must be true or false, got {o['only_strict']!r}")
    quality = positive_int("jpeg_quality", o.get("jpeg_quality", JPEG_QUALITY))
    reward = PickleReward(url, client, str(o.get("name") or "pickle"), str(o.get("key") or "scores"),
                          positive_int("batch_size", o.get("batch_size", DEFAULT_BATCH)), strict in HTTP_TRUE,
                          min(quality, 100))
    client.request(url.endpoint(""), timeout=min(client.timeout, 5.0), any_status=True)  # up: any HTTP answer
    return reward
