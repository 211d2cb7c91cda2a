"""Small reward servers for the tests, written from the documented protocols (standard library only, so they start
at once): dagcli's JSON protocol with injected faults, the pickle protocol of Flow-GRPO's reward servers, and an
OpenAI-compatible chat endpoint standing in for a VLM judge.

    python tests/helpers/reward_standins.py MODE [N]     prints `listening at http://127.0.0.1:PORT`, serves for at most
                                                 60 s, then exits by itself

JSON modes (`GET /health`, `POST /compute`; the reward of an image is `metadata["value"]`, else 1.0):
    ok           answers every request
    stall        answers N requests, then holds the next ones without answering (until it exits)
    die          answers N requests, then exits at the next one without answering
    error        HTTP 500 {"error": "CUDA out of memory in the test server"} (HTTP 400 for N = 400)
    short        one reward fewer than images
    nan          NaN for the first image
    text         the rewards as strings
    garbage      a reply that is not JSON
Other modes:
    pickle       POST /: pickle {"images": [JPEG], "meta_datas", "only_strict"} -> pickle {"scores": number of
                 `include` entries of each image's metadata, "rewards", "strict_rewards", "group_rewards", ...}
    openai       GET /v1/models; POST /v1/chat/completions: the image's mean brightness p as the probability of
                 "Yes" (top_logprobs when asked for logprobs), and the text "Yes" or "No"
    openai-text  the same, but no logprobs: the text `Score: S/10` with S = round(10 p)
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import pickle
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LIFETIME = 60.0
STATE = {"computes": 0}


def brightness(data: bytes) -> float:
    """Mean of an image's RGB values in [0, 1] (the judge stand-in's probability of Yes)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        pixels = list(img.convert("RGB").getdata())
    return sum(sum(p) for p in pixels) / (3 * 255 * len(pixels))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def reply(self, code: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        if MODE.startswith("openai"):
            self.reply(200, json.dumps({"object": "list", "data": [{"id": "judge-model", "object": "model"}]}).encode())
        else:
            self.reply(200, json.dumps({"status": "ok", "mode": MODE}).encode())

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if MODE == "pickle":
            return self.pickle_reply(body)
        if MODE.startswith("openai"):
            return self.openai_reply(json.loads(body))
        STATE["computes"] += 1
        if MODE in ("stall", "die") and STATE["computes"] > COUNT:
            if MODE == "die":
                os._exit(0)
            time.sleep(LIFETIME)
            return
        request = json.loads(body)
        rewards = [float(m.get("value", 1.0)) for m in request["metadata"]]
        if MODE == "error":
            message = json.dumps({"error": "CUDA out of memory in the test server"}).encode()
            return self.reply(400 if COUNT == 400 else 500, message)
        if MODE == "short":
            rewards = rewards[:-1]
        if MODE == "nan":
            rewards[0] = math.nan
        if MODE == "text":
            rewards = [str(r) for r in rewards]
        if MODE == "garbage":
            return self.reply(200, b"<html>502 Bad Gateway</html>", "text/html")
        self.reply(200, json.dumps({"rewards": rewards}).encode())

    def pickle_reply(self, body: bytes) -> None:
        request = pickle.loads(body)  # the test's own client: the stand-in trusts it
        from PIL import Image

        for data in request["images"]:
            Image.open(io.BytesIO(data), formats=["jpeg"]).load()
        scores = [float(len(m.get("include", []))) for m in request["meta_datas"]]
        reply = {"scores": scores, "rewards": scores, "strict_rewards": scores,
                 "group_rewards": {"single_object": scores}, "group_strict_rewards": {"single_object": scores}}
        self.reply(200, pickle.dumps(reply), "application/octet-stream")

    def openai_reply(self, request: dict) -> None:
        content = request["messages"][-1]["content"]
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        assert any(c["type"] == "text" and c["text"] for c in content)
        p = brightness(base64.b64decode(url.split(",", 1)[1]))
        text = "Yes" if p >= 0.5 else "No"
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        if MODE == "openai-text":
            choice["message"]["content"] = f"Score: {round(10 * p)}/10"
        elif request.get("logprobs"):
            top = [{"token": "Yes", "logprob": math.log(max(p, 1e-12))},
                   {"token": "No", "logprob": math.log(max(1 - p, 1e-12))},
                   {"token": "yes", "logprob": -30.0}]
            choice["logprobs"] = {"content": [{"token": text, "logprob": top[0 if p >= 0.5 else 1]["logprob"],
                                               "top_logprobs": top[: int(request.get("top_logprobs", 2))]}]}
        self.reply(200, json.dumps({"id": "x", "object": "chat.completion", "model": request.get("model"),
                                    "choices": [choice]}).encode())


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Timer(LIFETIME, lambda: os._exit(0)).start()
    print(f"listening at http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    MODE = sys.argv[1]
    COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    main()
