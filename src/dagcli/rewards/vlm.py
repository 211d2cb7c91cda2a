"""A VLM judge behind an OpenAI-compatible chat endpoint (vLLM, sglang, ...): `--reward vlm+http://HOST:PORT`.

Each image goes as a PNG data URI with a rubric (the prompt filled in) to `POST /v1/chat/completions`, several
requests in flight at once (option `concurrency`). The score of an image is, when the server returns
log-probabilities of the first answer token (`logprobs: true, top_logprobs`, which vLLM and sglang support), the
probability of Yes against No: P(yes) / (P(yes) + P(no)) over the top tokens that read yes or no in any case or
spacing; otherwise it is read from the answer's text: the last number in it, divided by N when written `X/N`
(`Score: 7/10` is 0.7), or 1 for an answer starting with Yes and 0 for No. An answer with neither is NaN, which
the trainer treats like any NaN reward (dropped and counted, `reward.max_nonfinite`).

Rubrics: the built-in `yes-no` (default) and `score-10`, or a UTF-8 text file whose `{prompt}` is replaced by the
image's prompt (option `rubric`).
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dagcli.errors import DagError
from dagcli.rewards.base import check_prompts, positive_int, single_output
from dagcli.rewards.remote import (
    HEALTH_TIMEOUT,
    HTTP_FALSE,
    HTTP_TRUE,
    ServerURL,
    first_line,
    options_and_client,
    png_base64,
)

RUBRICS = {
    "yes-no": 'Does this image show "{prompt}"? Answer with one word, Yes or No.',
    "score-10": 'How well does this image show "{prompt}", and how good does it look? Rate it from 0 to 10 and '
                'answer in the form "Score: N/10".',
}
TOP_LOGPROBS = 5
_SCORE = re.compile(r"(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?")


def load_rubric(rubric: str) -> str:
    """A built-in rubric by name, or the text of a rubric file; it must contain `{prompt}`."""
    if rubric in RUBRICS:
        return RUBRICS[rubric]
    path = Path(rubric).expanduser()
    if not path.is_file():
        raise DagError(f"rubric {rubric!r} is neither a built-in rubric nor a file; valid options: "
                       f"{', '.join(RUBRICS)}, or a text file with {{prompt}} in it")
    text = path.read_text(encoding="utf-8").strip()
    if "{prompt}" not in text:
        raise DagError(f"rubric file {rubric!r} has no {{prompt}} placeholder; write {{prompt}} where the prompt goes")
    return text


def yes_probability(top: list[dict]) -> float | None:
    """P(yes) / (P(yes) + P(no)) over a token's top alternatives; None when neither is among them."""
    mass = {"yes": 0.0, "no": 0.0}
    for entry in top:
        word = str(entry.get("token", "")).strip().lower()
        if word in mass and isinstance(entry.get("logprob"), (int, float)):
            mass[word] += math.exp(entry["logprob"])
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else None


def text_score(text: str) -> float:
    """The score an answer's text gives: the last number (X/N as X / N), else Yes -> 1, No -> 0, else NaN."""
    found = list(_SCORE.finditer(text))
    if found:
        value, scale = found[-1].groups()
        return float(value) / float(scale) if scale and float(scale) else float(value)
    word = text.strip().lower()
    if word.startswith("yes"):
        return 1.0
    if word.startswith("no"):
        return 0.0
    return math.nan


def answer_score(reply: dict, who: str) -> float:
    """The score of one chat completion (see the module docstring)."""
    try:
        choice = reply["choices"][0]
        text = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise DagError(f"{who} replied no choices[0].message: {first_line(json.dumps(reply), 120)}") from None
    tokens = ((choice.get("logprobs") or {}).get("content") or []) if isinstance(choice, dict) else []
    if tokens and isinstance(tokens[0], dict):
        p = yes_probability(tokens[0].get("top_logprobs") or [])
        if p is not None:
            return p
    return text_score(str(text))


class VlmJudge:
    """Scores images by asking an OpenAI-compatible VLM server, `concurrency` requests at a time."""

    slow = True

    def __init__(self, url: ServerURL, client, name: str, model: str, rubric: str, logprobs: bool,
                 max_tokens: int, concurrency: int):
        self.url, self.client, self.name, self.model, self.rubric = url, client, name, model, rubric
        self.logprobs, self.max_tokens, self.concurrency = logprobs, max_tokens, concurrency

    def __repr__(self) -> str:
        return f"VlmJudge({self.url.text!r})"

    def request_body(self, image: str, prompt: str) -> dict:
        content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                   {"type": "text", "text": self.rubric.replace("{prompt}", prompt)}]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "temperature": 0}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        return body

    def _one(self, image: str, prompt: str) -> float:
        reply = self.client.request(endpoint(self.url, "chat/completions"),
                                    json.dumps(self.request_body(image, prompt)).encode())
        try:
            data = json.loads(reply)
        except ValueError:
            raise DagError(f"{self.client.who} replied something that is not JSON: "
                           f"{first_line(reply.decode('utf-8', 'replace'), 80)!r}") from None
        return answer_score(data, self.client.who)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None):
        prompts = check_prompts(prompts, len(images))
        encoded = png_base64(images)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts)) or 1,
                                thread_name_prefix="dagcli-vlm") as pool:
            scores = list(pool.map(self._one, encoded, prompts))
        return single_output(self.name, torch.tensor(scores, dtype=torch.float32))


def endpoint(url: ServerURL, name: str) -> str:
    """`BASE/v1/NAME` (or `BASE/NAME` when the URL already ends in /v1)."""
    return f"{url.base}/{name}" if url.base.endswith("/v1") else f"{url.base}/v1/{name}"


def served_model(url: ServerURL, client) -> str:
    """The first model `GET /v1/models` lists (also the judge's health check)."""
    body = client.request(endpoint(url, "models"), timeout=min(client.timeout, HEALTH_TIMEOUT))
    try:
        return str(json.loads(body)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise DagError(f"{client.who}: GET {endpoint(url, 'models')} lists no model; give one with the option "
                       "model") from None


def remote_vlm(url: ServerURL, model=None, rubric=None, logprobs=None, max_tokens=None, concurrency=None,
               api_key_env=None, timeout=None, retries=None, backoff=None, name=None) -> VlmJudge:
    """Options: model (default: the first the server lists), rubric (yes-no | score-10 | FILE), logprobs (true),
    max_tokens (16), concurrency (8), api_key_env (an environment variable holding the server's API key),
    timeout (60 s), retries (3), backoff (0.5 s), name (vlm)."""
    given = dict(model=model, rubric=rubric, logprobs=logprobs, max_tokens=max_tokens, concurrency=concurrency,
                 api_key_env=api_key_env, timeout=timeout, retries=retries, backoff=backoff, name=name)
    o, client = options_and_client(url, given, f"VLM judge {url.text}")
    if o.get("api_key_env"):
        key = os.environ.get(str(o["api_key_env"]))
        if not key:
            raise DagError(f"option api_key_env of {url.text!r}: environment variable {o['api_key_env']!r} is not set")
        client.headers["Authorization"] = f"Bearer {key}"
    use_logprobs = str(o.get("logprobs", "true")).strip().lower()
    if use_logprobs not in HTTP_TRUE | HTTP_FALSE:
        raise DagError(f"option logprobs of {url.text!r} must be true or false, got {o['logprobs']!r}")
    text = load_rubric(str(o.get("rubric") or "yes-no"))
    model_name = str(o["model"]) if o.get("model") else served_model(url, client)
    if o.get("model"):
        served_model(url, client)  # the health check, before anything is sampled
    return VlmJudge(url, client, str(o.get("name") or "vlm"), model_name, text, use_logprobs in HTTP_TRUE,
                    positive_int("max_tokens", o.get("max_tokens", 16)),
                    positive_int("concurrency", o.get("concurrency", 8)))
