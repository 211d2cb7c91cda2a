"""The reward client a URL spec part asks for: a JSON server, Flow-GRPO's pickle dialect, or a VLM judge
(each dialect is its own module, imported when asked for; this one picks among them, so none imports another back)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from dagcli.rewards.remote import ServerURL, parse_url, remote_json


def server_factory(text: str) -> Callable:
    """The factory of a URL spec part: options in, a reward client (health-checked) out."""
    url = parse_url(text)
    if url.kind == "pickle":
        from dagcli.rewards.pickled import remote_pickle

        return _bind(remote_pickle, url)
    if url.kind == "vlm":
        from dagcli.rewards.vlm import remote_vlm

        return _bind(remote_vlm, url)
    return _bind(remote_json, url)


def _bind(factory: Callable, url: ServerURL) -> Callable:
    """`factory` with its URL filled in, keeping the signature of the remaining options (for option checks)."""
    return functools.partial(factory, url)
