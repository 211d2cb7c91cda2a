"""Named crash points, so tests can kill or interrupt a run at exact moments (e.g. half-way through a checkpoint
write).

`DAGCLI_FAULT=NAME:N` makes the process SIGKILL itself the N-th time it reaches `fault_point(NAME)`; `NAME:N:INT`
sends it SIGINT instead (a Ctrl-C at that moment), `NAME:N:TERM` SIGTERM. Several points: comma-separated, e.g.
`optimizer-step:3:INT,checkpoint-write:2:INT`. Without the variable a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("DAGCLI_FAULT")
    if not spec:
        return
    hit = None
    for part in spec.split(","):
        target, _, rest = part.strip().partition(":")
        if target != name:
            continue
        if hit is None:
            hit = _hits[name] = _hits.get(name, 0) + 1
        count, _, sig = rest.partition(":")
        if hit == int(count or 1):
            os.kill(os.getpid(), SIGNALS[sig or "KILL"])
