"""Named crash points, so tests can kill a run at exact moments (e.g. half-way through a checkpoint write).

`DAGCLI_FAULT=NAME:N` makes the process SIGKILL itself the N-th time it reaches `fault_point(NAME)`.
Without the variable a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("DAGCLI_FAULT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
