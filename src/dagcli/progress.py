"""The one seam between the engine and the terminal: progress bars and messages (rich), main process only.

Engine code receives a `Progress`-like object (or the do-nothing `NullProgress`) and never imports rich.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Protocol


class Reporter(Protocol):
    def task(self, description: str, total: int): ...  # context manager yielding advance(n=1)
    def info(self, message: str) -> None: ...
    def warn(self, message: str) -> None: ...


class NullReporter:
    """Reports nothing (tests, non-main ranks)."""

    @contextmanager
    def task(self, description: str, total: int):
        yield lambda n=1: None

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass


class RichReporter:
    """Progress bars and coloured messages on stderr."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet

    @contextmanager
    def task(self, description: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True, disable=self.quiet) as bar:
            task_id = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task_id, n)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}", highlight=False)


def default_reporter(quiet: bool = False) -> Reporter:
    return RichReporter(quiet=quiet) if sys.stderr is not None else NullReporter()
