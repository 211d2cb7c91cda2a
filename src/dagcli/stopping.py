"""Stopping a run cleanly: the first Ctrl-C (or SIGTERM) asks the loop to stop after the current epoch and save a
checkpoint; a second one stops at once, leaving the last checkpoint as it is."""

from __future__ import annotations

import signal


class StopRequest:
    """A flag set by SIGINT / SIGTERM while installed (main thread only)."""

    def __init__(self, reporter):
        self.reporter = reporter
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now, the last checkpoint stays as it is
            raise KeyboardInterrupt
        self.requested = True
        self.reporter.warn("stopping after this epoch and saving a checkpoint (press Ctrl-C again to abort)")

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}
