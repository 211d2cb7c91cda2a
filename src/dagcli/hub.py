"""Weights from the Hugging Face hub: the cache first, a download only when the hub can be reached.

Every model and reward loader goes through `cached_or_download`, so offline behaviour is the same
everywhere: nothing is downloaded under `HF_HUB_OFFLINE=1`; otherwise a quick TCP probe of the hub endpoint
(`HF_ENDPOINT`, or the proxy that applies to it) decides within seconds whether a download can work, instead
of waiting for the library's retries; and a failure is one `DagError` line naming what is missing and the
option or environment variable that provides it.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from dagcli.errors import DagError

T = TypeVar("T")
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0  # a reachable hub (or proxy) accepts a TCP connection well within this
_TRUE = {"1", "on", "yes", "true"}
_CHATTY_LOGGERS = ("huggingface_hub", "urllib3", "httpx", "httpx2", "httpcore", "filelock")


def hub_offline() -> bool:
    """True when the environment forbids hub downloads (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    """The hub's address: HF_ENDPOINT, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache() -> str:
    """The folder the Hugging Face libraries read cached weights from (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _connect_target(endpoint: str) -> tuple[str, int]:
    """(host, port) a download would first connect to: the endpoint, or the proxy that applies to it."""
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or ""
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return via.hostname or "", via.port or 8080
    return host, url.port or (443 if url.scheme == "https" else 80)


@functools.cache
def _probe(host: str, port: int) -> str | None:
    """None when a TCP connection to host:port opens within PROBE_TIMEOUT_S, else why not (one process: once)."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached now (None when it can); probed once per process and endpoint."""
    return _probe(*_connect_target(hub_endpoint()))


def quiet_loading() -> None:
    """No loading bars, retry warnings or dtype notes from the libraries: our own messages are enough.

    Download bars stay on in a terminal (a multi-GB download should show progress), off in a pipe.
    """
    import diffusers.utils.logging as dlog
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as tlog

    from dagcli.progress import is_terminal

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()  # also turns off huggingface_hub's bars
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if is_terminal(sys.stderr) and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:
        hub_utils.enable_progress_bars()


def missing_message(what: str, name: str, fix: str | None, why: str) -> str:
    """One line: `what` `name` is missing, `why` it cannot be fetched, and how to provide it.

    `fix` is the option that passes a local copy instead, e.g. "--model PATH".
    """
    local = f"pass a local copy with {fix}" if fix else "pass a local folder or file path instead"
    cache_tail = "" if hub_offline() else " and set HF_HUB_OFFLINE=1"
    return (
        f"{what} {name!r} is not in the Hugging Face cache ({hub_cache()}) and {why}; {local}, "
        f"or point HF_HOME at a Hugging Face cache that holds it{cache_tail}"
    )


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors are often paragraphs)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def cached_or_download(load: Callable[[bool], T], what: str, name: str, fix: str | None) -> T:
    """`load(local_files_only)` from the cache; failing that, a download when allowed and the hub answers.

    Any failure ends in one `DagError` naming `what` `name` and `fix`, the option that passes a local copy.
    """
    quiet_loading()
    try:
        return load(True)
    except (OSError, ValueError) as cached_error:  # what the libraries raise for "not in the cache"
        if hub_offline():
            raise DagError(missing_message(what, name, fix, "HF_HUB_OFFLINE=1 forbids downloads")) from cached_error
    reason = hub_unreachable()
    if reason is not None:
        raise DagError(missing_message(what, name, fix, f"the hub ({hub_endpoint()}) cannot be reached: {reason}"))
    try:
        return load(False)
    except DagError:
        raise
    except Exception as e:  # no such repository, a broken connection, a wrong format: one line for all
        raise DagError(missing_message(what, name, fix, f"downloading it failed: {first_line(e)}")) from e
