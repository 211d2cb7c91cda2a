"""The server behind `dag serve-reward`: any reward spec behind dagcli's JSON protocol (see `rewards.remote`).

Built on the standard library's `ThreadingHTTPServer`: each connection gets a thread, and the reward itself is
called under a lock (one batch at a time on the model's device), in chunks of `batch_size` images.

    GET  /health    {"status": "ok", "protocol": "dagcli-reward/1", "reward": NAME, "components": [...], ...}
    POST /compute   {"prompts": [...], "images": [base64 PNG, ...], "metadata": [{...}, ...]}
                    -> {"rewards": [...], "components": {NAME: [...], ...}}

The singular keys `prompt` / `image` of Flow-Factory's remote reward are accepted too. A bad request gets HTTP
400 and a reward that fails HTTP 500, both as `{"error": "one line"}`; NaN scores are sent as NaN (the client
applies its own NaN policy).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from PIL import Image

from dagcli.errors import DagError
from dagcli.faults import fault_point
from dagcli.rewards.base import Reward, batches, images_from_pil

PROTOCOL = "dagcli-reward/1"
MAX_BODY = 512 * 1024 * 1024


class RewardServer(ThreadingHTTPServer):
    """An HTTP server scoring with one reward; `url` is where it listens."""

    daemon_threads = True

    def __init__(self, reward: Reward, spec: str, host: str, port: int, batch_size: int):
        self.reward, self.spec, self.batch_size = reward, spec, batch_size
        self.lock = threading.Lock()
        self.scored = 0
        super().__init__((host, port), RewardHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def health(self) -> dict:
        components = list(getattr(self.reward, "weights", None) or [self.reward.name])
        return {"status": "ok", "protocol": PROTOCOL, "reward": self.reward.name, "spec": self.spec,
                "components": components, "batch_size": self.batch_size, "scored": self.scored}

    def compute(self, request: object) -> dict:
        """Score one request (raises DagError for a bad request, RewardFailure for a failing reward)."""
        images, prompts, metadata = parse_request(request)
        fault_point("serve-reward-compute")  # tests kill the server here (DAGCLI_FAULT)
        outs = []
        with self.lock:
            for part in batches(len(prompts), self.batch_size):
                try:
                    outs.append(self.reward(images[part], prompts[part], metadata[part]))
                except DagError as e:
                    raise RewardFailure(str(e)) from e
                except Exception as e:  # any failure of the reward is reported to the client, not fatal here
                    raise RewardFailure(f"{type(e).__name__}: {' '.join(str(e).split())}") from e
            self.scored += len(prompts)
        return {"rewards": torch.cat([o.scores for o in outs]).tolist(),
                "components": {k: torch.cat([o.components[k] for o in outs]).tolist() for k in outs[0].components}}


class RewardFailure(Exception):
    """The reward raised while scoring a well-formed request (HTTP 500)."""


def parse_request(request: object) -> tuple[torch.Tensor, list[str], list[dict]]:
    """A /compute body -> images [B, 3, H, W], prompts, metadata; a DagError says what is wrong with it."""
    if not isinstance(request, dict):
        raise DagError("expected a JSON object with 'prompts', 'images' and optionally 'metadata'")
    prompts = request.get("prompts", request.get("prompt"))
    encoded = request.get("images", request.get("image"))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise DagError("'prompts' must be a list of strings")
    if not isinstance(encoded, list) or len(encoded) != len(prompts) or not prompts:
        raise DagError(f"'images' must be a list of base64 images, one per prompt ({len(prompts)} prompts)")
    metadata = request.get("metadata") or [{} for _ in prompts]
    if not isinstance(metadata, list) or len(metadata) != len(prompts) or not all(isinstance(m, dict)
                                                                                  for m in metadata):
        raise DagError("'metadata' must be a list of objects, one per prompt")
    return images_from_pil([decode_image(e, i) for i, e in enumerate(encoded)]), prompts, metadata


def decode_image(text: object, index: int) -> Image.Image:
    if not isinstance(text, str):
        raise DagError(f"image {index} is not a base64 string")
    try:
        with Image.open(io.BytesIO(base64.b64decode(text.removeprefix("data:image/png;base64,"), validate=True))) as img:
            return img.convert("RGB")
    except (binascii.Error, ValueError, OSError) as e:
        raise DagError(f"image {index} is not a base64 PNG/JPEG ({' '.join(str(e).split())})") from e


class RewardHandler(BaseHTTPRequestHandler):
    """GET /health and POST /compute; everything else 404."""

    server: RewardServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        if self.path.rstrip("/") in ("/health", ""):
            self._send(200, self.server.health())
        else:
            self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /compute"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") not in ("/compute", ""):
            self._send(404, {"error": f"unknown path {self.path}; use POST /compute"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                raise DagError(f"expected a JSON body of 1 byte to {MAX_BODY} bytes, got Content-Length {length}")
            request = json.loads(self.rfile.read(length))
            self._send(200, self.server.compute(request))
        except (DagError, ValueError) as e:
            self._send(400, {"error": " ".join(str(e).split())})
        except RewardFailure as e:
            self._send(500, {"error": str(e)})

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the standard library's signature)
        """Quiet: a reward server's output is its startup line and its errors."""
