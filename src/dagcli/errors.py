"""User-facing errors.

Anything the user can fix (a bad flag, a missing file, an unknown reward) raises `DagError`. The CLI prints
its message on one line and exits with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

from collections.abc import Iterable


class DagError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


def unknown_choice(kind: str, value: object, options: Iterable[str]) -> DagError:
    """`unknown reward 'foo'; valid options: a, b, c` — the standard message for a bad name."""
    opts = ", ".join(sorted(options)) or "(none)"
    return DagError(f"unknown {kind} {value!r}; valid options: {opts}")


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped a command that has something to say about it (where its last checkpoint is);
    the CLI prints the message on one line and exits with 128 + the signal's number (130 for Ctrl-C)."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + signum
