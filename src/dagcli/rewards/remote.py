"""Rewards served by another process or machine: the URL spec parts, the HTTP client, the native protocol.

A spec part that starts with a scheme names a reward server instead of a registered reward:

    http://127.0.0.1:8000              dagcli's JSON protocol (`dag serve-reward`, or any server speaking it)
    https://host:8000/prefix           the same; endpoints are PREFIX/compute and PREFIX/health
    pickle+http://127.0.0.1:18085      the pickle protocol of Flow-GRPO's reward servers (`rewards.pickled`)
    vlm+http://127.0.0.1:8000          an OpenAI-compatible VLM judge, e.g. vLLM or sglang (`rewards.vlm`)

Options come as reward options under the URL as written (`--reward-option http://127.0.0.1:8000.timeout=30`)
or as the URL's query (`http://127.0.0.1:8000?timeout=30&batch_size=8`); every kind takes `timeout`
(seconds per request), `retries` (extra attempts after a refused connection or an HTTP 408/429/5xx reply),
`backoff` (seconds before the first retry, doubled each time) and `name` (the component name). A request that
gets no answer within `timeout` is not retried: the run stops with one line instead of waiting again.

The native protocol: `GET PREFIX/health` answers `{"status": "ok", ...}`; `POST PREFIX/compute` takes
`{"prompts": [...], "images": [base64 PNG, ...], "metadata": [{...}, ...]}` and answers `{"rewards": [...]}`
(one number per image; NaN passes through to the trainer's NaN policy). The server is asked for its health
when the reward is built, before anything is sampled.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import math
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dagcli.errors import DagError
from dagcli.rewards.base import (
    RewardInfo,
    RewardOutput,
    as_float,
    batches,
    check_prompts,
    positive_int,
    single_output,
    to_hwc_arrays,
)

SCHEMES = {"http": "json", "https": "json", "pickle+http": "pickle", "pickle+https": "pickle",
           "vlm+http": "vlm", "vlm+https": "vlm"}
URL_START = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]*://")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
DEFAULT_TIMEOUT, DEFAULT_RETRIES, DEFAULT_BACKOFF = 60.0, 3, 0.5
HEALTH_TIMEOUT = 5.0  # the health check answers at once or the server is not ready
HTTP_TRUE, HTTP_FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}  # option values of a switch


def server_rows() -> list[RewardInfo]:
    """The rows of `dag rewards` for the server kinds (after the registered rewards)."""
    return [
        RewardInfo("http://HOST:PORT", "a reward served over HTTP with dagcli's JSON protocol, e.g. any reward above "
                   "behind `dag serve-reward SPEC`", "the served reward's", "a running server; options batch_size, "
                   "timeout, retries, backoff, name"),
        RewardInfo("pickle+http://HOST:PORT", "a Flow-GRPO reward server (GenEval, OCR, DeQA: pickle protocol); "
                   "unpickling its reply can run its code, so this machine only unless allow_remote=true",
                   "the server's (reply key `scores`)", "a running server; options key, batch_size, only_strict, "
                   "allow_remote"),
        RewardInfo("vlm+http://HOST:PORT", "a VLM judge behind an OpenAI-compatible chat endpoint (vLLM, sglang): "
                   "P(yes) from log-probabilities, else the score in its answer", "probability of Yes, or the "
                   "rubric's score", "a running server; options model, rubric, concurrency, logprobs"),
    ]


def is_url(text: str) -> bool:
    """True for a spec part that names a server (`scheme://...`)."""
    return bool(URL_START.match(text))


def split_weight(part: str) -> tuple[str, float | None]:
    """`http://h:8000:0.5` -> ("http://h:8000", 0.5); `http://h:8000` -> ("http://h:8000", None).

    The text after the last `:` is a weight only when it is a number and what stays before it still has a port
    or a path (so the port of `http://h:8000` is never read as a weight).
    """
    part = part.strip()
    head, sep, tail = part.rpartition(":")
    if sep and _NUMBER.match(tail.strip()):
        rest = re.sub(r"\[[^\]]*\]", "", head.split("://", 1)[1])  # an IPv6 host's colons are not a port
        if ":" in rest or "/" in rest:
            return head, float(tail)
    return part, None


@dataclass(frozen=True)
class ServerURL:
    """A parsed reward-server URL: what to speak, where, and the options given in its query."""

    text: str  # as the user wrote it (the spec label)
    kind: str  # json | pickle | vlm
    base: str  # scheme (without the dialect) + host + port + path, no trailing slash, no query
    host: str
    options: dict[str, str]

    def endpoint(self, name: str) -> str:
        """`BASE/name`, or BASE itself when its path already ends with `/name` (or `name` is empty: `BASE/`)."""
        if not name:
            return self.base + ("/" if self.base.count("/") == 2 else "")
        return self.base if self.base.endswith("/" + name) else f"{self.base}/{name}"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def parse_url(text: str) -> ServerURL:
    """Check a reward-server URL; a malformed one is a DagError naming it and the accepted forms."""
    form = "expected http://HOST:PORT[/PATH], pickle+http://HOST:PORT or vlm+http://HOST:PORT[/PATH]"
    split = urllib.parse.urlsplit(text.strip())
    scheme = split.scheme.lower()
    if scheme not in SCHEMES:
        raise DagError(f"unknown reward server scheme {split.scheme!r} in {text!r}; valid options: "
                       f"{', '.join(SCHEMES)}")
    try:
        port = split.port
    except ValueError as e:
        raise DagError(f"bad port in reward server URL {text!r} ({e}); {form}") from e
    if not split.hostname or split.username or split.password or split.fragment:
        raise DagError(f"bad reward server URL {text!r}; {form}")
    try:
        options = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True, strict_parsing=bool(split.query)))
    except ValueError as e:
        raise DagError(f"bad query in reward server URL {text!r}; expected ?OPTION=VALUE&OPTION=VALUE") from e
    host = f"[{split.hostname}]" if ":" in split.hostname else split.hostname
    transport = scheme.rpartition("+")[2]
    netloc = host if port is None else f"{host}:{port}"
    base = f"{transport}://{netloc}{split.path}".rstrip("/")
    return ServerURL(text.strip(), SCHEMES[scheme], base, split.hostname, options)


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (by name or address; no name is resolved)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def first_line(text: str, limit: int = 300) -> str:
    """One line of a server's message (its JSON `error`/`detail`/`message` field when it sends JSON)."""
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            for key in ("error", "detail", "message"):
                if key in data:
                    text = data[key] if isinstance(data[key], str) else json.dumps(data[key])
                    break
    except ValueError:
        pass
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class HttpClient:
    """Requests to one server, with a timeout, bounded retries with exponential backoff, and one-line errors.

    Proxies are never used (reward servers are reached directly). Safe to use from several threads.
    """

    def __init__(self, who: str, timeout: float, retries: int, backoff: float, headers: dict | None = None):
        self.who, self.timeout, self.retries, self.backoff = who, timeout, retries, backoff
        self.headers = dict(headers or {})
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, url: str, body: bytes | None = None, content_type: str = "application/json",
                timeout: float | None = None, retries: int | None = None, any_status: bool = False) -> bytes:
        """The reply body of a GET (no body) or POST to `url`; raises a DagError once retries are spent.

        With `any_status`, an HTTP error reply counts as an answer (b"" is returned): the server is up."""
        retries = self.retries if retries is None else retries
        timeout = self.timeout if timeout is None else timeout
        for attempt in range(retries + 1):
            try:
                return self._once(url, body, content_type, timeout, any_status)
            except _Retryable as e:
                if attempt == retries:
                    tries = f" after {retries + 1} attempts" if retries else ""
                    raise DagError(f"{self.who}: {e}{tries} ({url}); {e.hint}") from None
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _once(self, url: str, body: bytes | None, content_type: str, timeout: float, any_status: bool) -> bytes:
        headers = {**self.headers, **({"Content-Type": content_type} if body is not None else {})}
        req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
        try:
            with self.opener.open(req, timeout=timeout) as reply:
                return reply.read()
        except urllib.error.HTTPError as e:
            if any_status:
                return b""
            message = first_line(e.read().decode("utf-8", "replace")) or e.reason
            if e.code in RETRY_STATUS:
                raise _Retryable(f"HTTP {e.code}: {message}", "see the server's log, or raise the option "
                                 "retries for a server that is busy") from None
            raise DagError(f"{self.who}: HTTP {e.code} from {url}: {message}") from None
        except TimeoutError:
            raise self._timed_out(url, timeout) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise self._timed_out(url, timeout) from None
            if isinstance(e.reason, socket.gaierror):
                raise DagError(f"{self.who}: unknown host in {url} ({e.reason.strerror})") from None
            raise _Retryable(f"cannot connect ({_reason(e.reason)})") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"connection lost ({_reason(e)})") from None

    def _timed_out(self, url: str, timeout: float) -> DagError:
        return DagError(f"{self.who}: no answer within {timeout:g} s from {url}; "
                        "check the server, or raise the option timeout")


class _Retryable(Exception):
    """A failure worth another attempt: refused or dropped connection, HTTP 408/429/5xx."""

    def __init__(self, message: str, hint: str = "is the server running? Start one with `dag serve-reward SPEC`, "
                                                 "or raise the option retries"):
        super().__init__(message)
        self.hint = hint


def _reason(error: object) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return " ".join(str(error).split()) or type(error).__name__


def client_settings(url: ServerURL, options: dict) -> dict:
    """The query's options under the explicitly given ones (explicit options win)."""
    return {**url.options, **{k: v for k, v in options.items() if v is not None}}


def make_client(url: ServerURL, who: str, timeout, retries, backoff, headers: dict | None = None) -> HttpClient:
    retries_n = int(as_float("retries", retries))
    if retries_n < 0 or retries_n != as_float("retries", retries):
        raise DagError(f"option retries must be a whole number >= 0, got {retries!r}")
    seconds, pause = as_float("timeout", timeout), as_float("backoff", backoff)
    if not seconds > 0 or not pause >= 0 or math.isinf(seconds):
        raise DagError(f"options timeout (> 0) and backoff (>= 0) of {url.text!r} must be seconds, "
                       f"got {timeout!r} and {backoff!r}")
    return HttpClient(who, seconds, retries_n, pause, headers)


def png_base64(images: torch.Tensor) -> list[str]:
    """[B, 3, H, W] in [0, 1] -> base64 PNGs of the uint8 images (exact: no quantisation beyond uint8)."""
    out = []
    for array in to_hwc_arrays(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def metadata_list(metadata: list[dict] | None, n: int) -> list[dict]:
    return [dict(m or {}) for m in metadata] if metadata is not None else [{} for _ in range(n)]


def numeric_scores(values: object, n: int, who: str, key: str) -> torch.Tensor:
    """A server's list of `n` scores -> float32 [n]; NaN/inf kept (the NaN policy decides), anything else an error."""
    if isinstance(values, np.ndarray):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise DagError(f"{who} replied {key!r} as {type(values).__name__}; expected a list of {n} numbers")
    if len(values) != n:
        raise DagError(f"{who} replied {len(values)} scores for {n} images; expected one score per image")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DagError(f"{who} replied a non-numeric score {v!r} at position {i}; expected numbers")
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float32)


def score_in_batches(score_batch: Callable, name: str, batch_size: int, images: torch.Tensor, prompts: list[str],
                     metadata: list[dict] | None) -> RewardOutput:
    """One component `name` from `score_batch(images, prompts, metadata) -> [b]`, asked `batch_size` at a time."""
    prompts = check_prompts(prompts, len(images))
    meta = metadata_list(metadata, len(images))
    scores = [score_batch(images[s], prompts[s], meta[s]) for s in batches(len(images), batch_size)]
    return single_output(name, torch.cat(scores))


class RemoteReward:
    """A reward computed by a server speaking dagcli's JSON protocol (e.g. `dag serve-reward`)."""

    slow = True

    def __init__(self, url: ServerURL, client: HttpClient, name: str, batch_size: int):
        self.url, self.client, self.name, self.batch_size = url, client, name, batch_size
        self.server: dict = {}

    def __repr__(self) -> str:
        return f"RemoteReward({self.url.text!r})"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        return score_in_batches(self._batch, self.name, self.batch_size, images, prompts, metadata)

    def check_health(self) -> dict:
        """The server's `GET /health` reply; a server that is down fails here, within seconds."""
        body = self.client.request(self.url.endpoint("health"), timeout=min(self.client.timeout, HEALTH_TIMEOUT))
        try:
            self.server = json.loads(body)
        except ValueError:
            raise DagError(f"{self.client.who}: GET {self.url.endpoint('health')} did not answer JSON; "
                           "is it a dagcli reward server?") from None
        if not isinstance(self.server, dict) or self.server.get("status", "ok") != "ok":
            raise DagError(f"{self.client.who} is not healthy: {first_line(json.dumps(self.server))}")
        return self.server

    def _batch(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        body = json.dumps({"prompts": prompts, "images": png_base64(images), "metadata": metadata}).encode()
        reply = self.client.request(self.url.endpoint("compute"), body)
        try:
            data = json.loads(reply)
        except ValueError:
            raise DagError(f"{self.client.who} replied something that is not JSON: "
                           f"{first_line(reply.decode('utf-8', 'replace'), 80)!r}") from None
        if not isinstance(data, dict) or "rewards" not in data:
            raise DagError(f"{self.client.who} replied without a 'rewards' list: {first_line(json.dumps(data), 80)}")
        return numeric_scores(data["rewards"], len(images), self.client.who, "rewards")


def remote_json(url: ServerURL, timeout=None, retries=None, backoff=None, batch_size=None,
                name=None) -> RemoteReward:
    """Options: batch_size (images per request, 32), timeout (60 s), retries (3), backoff (0.5 s), name."""
    o, client = options_and_client(url, dict(timeout=timeout, retries=retries, backoff=backoff, name=name,
                                             batch_size=batch_size), f"reward server {url.text}")
    reward = RemoteReward(url, client, str(o.get("name") or "remote"), positive_int("batch_size",
                                                                                     o.get("batch_size", 32)))
    reward.check_health()
    return reward


def options_and_client(url: ServerURL, given: dict, who: str,
                       default_timeout: float = DEFAULT_TIMEOUT) -> tuple[dict, HttpClient]:
    """A server reward's options (the query's under the given ones, all checked against the factory's keyword
    names) and its client with the common ones (timeout, retries, backoff)."""
    o = client_settings(url, given)
    check_known(url, o, set(given))
    client = make_client(url, who, o.get("timeout", default_timeout), o.get("retries", DEFAULT_RETRIES),
                         o.get("backoff", DEFAULT_BACKOFF))
    return o, client


def check_known(url: ServerURL, options: dict, known: set[str]) -> None:
    """Every option is one of `known` (the query's too)."""
    unknown = sorted(set(options) - known)
    if unknown:
        raise DagError(f"unknown option {unknown[0]!r} for reward {url.text!r}; valid options: "
                       f"{', '.join(sorted(known))}")


def probe(text: str) -> None:
    """Whether the server a URL part names answers at all (any HTTP reply), within seconds: for the checks a
    command makes before loading a model. The full health check comes when the reward is built. A pickle server
    on another machine is not contacted here (whether it may be is decided with all its options, when built)."""
    url = parse_url(text)
    if url.kind == "pickle" and not url.loopback:
        return
    o = url.options
    client = make_client(url, f"reward server {url.text}", o.get("timeout", DEFAULT_TIMEOUT),
                         o.get("retries", DEFAULT_RETRIES), o.get("backoff", DEFAULT_BACKOFF))
    client.request(url.endpoint("" if url.kind == "pickle" else "health"), timeout=min(client.timeout, HEALTH_TIMEOUT),
                   any_status=True)
