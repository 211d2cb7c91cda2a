"""Stopping cleanly on Ctrl-C (SIGINT) or SIGTERM.

Outside training a Ctrl-C stops the command at once (`on_interrupt`). During training the first one asks the loop
to stop after the current epoch and save a checkpoint (`StopRequest`); a second one stops at once, leaving the
last checkpoint as it is. Renaming and pruning checkpoints are never cut half-way (`signals_deferred`).

A KeyboardInterrupt raised by a signal handler can be lost: one raised while a finaliser runs is only printed
("Exception ignored in ..."), and a worker thread never sees it. So an interrupt is also remembered, and long loops
(sampler steps, reward calls, micro-batches; in any thread) call `check_interrupt`, which raises it again.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_interrupted = threading.Event()


def interrupt() -> None:
    """Stop at once: remembered for `check_interrupt`, and raised here."""
    _interrupted.set()
    raise KeyboardInterrupt


def on_interrupt(signum, frame) -> None:
    """The SIGINT handler of the `dag` command."""
    interrupt()


def check_interrupt() -> None:
    """Raise KeyboardInterrupt when an interrupt came (in any thread), even if its first one was lost."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def clear_interrupt() -> None:
    """Forget an earlier interrupt (a new command in the same process)."""
    _interrupted.clear()


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done, then reach the handlers that were installed before it
    (main thread only; elsewhere the block runs as it is: signals are handled in the main thread anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


class StopRequest:
    """A flag set by SIGINT / SIGTERM while installed (main thread only); a second signal stops at once."""

    def __init__(self, reporter):
        self.reporter = reporter
        self.requested = False
        self.signum: int | None = None  # the signal that asked (its exit code is 128 + signum)
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now, the last checkpoint stays as it is
            interrupt()
        self.requested, self.signum = True, signum
        self.reporter.warn("stopping after this epoch with a checkpoint (Ctrl-C again: stop at once, keeping the "
                           "last one)")

    def install(self) -> None:
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}
