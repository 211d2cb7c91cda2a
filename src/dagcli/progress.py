"""The one seam between the engine and the terminal: progress bars, messages and tables, main process only.

Engine code receives a `Reporter` (rich in a terminal, plain lines in a pipe, or the do-nothing
`NullReporter`) and never imports rich. In a terminal output is rich; when stderr (progress, messages) or
stdout (tables) is a pipe or a file it is plain lines: no bars, no box drawing, no blank lines. Names and
numbers are never cut: table columns that hold them never wrap, only descriptions do.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Protocol


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
    """Progress bars and coloured messages on stderr, for a terminal."""

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


class PlainReporter:
    """Plain lines on stderr, for a pipe or a log file: messages without markup, no progress bars."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    @contextmanager
    def task(self, description: str, total: int):
        yield lambda n=1: None  # the messages around a task say what it did; a log needs no ticker

    def info(self, message: str) -> None:
        if not self.quiet:
            self._line(message)

    def warn(self, message: str) -> None:
        self._line(f"warning: {message}")

    @staticmethod
    def _line(message: str) -> None:
        from rich.text import Text

        print(Text.from_markup(message).plain, file=sys.stderr, flush=True)


def is_terminal(stream: IO | None) -> bool:
    """Whether rich would treat `stream` as a terminal (a TTY; FORCE_COLOR / TTY_COMPATIBLE can say so)."""
    from rich.console import Console

    return stream is not None and Console(file=stream).is_terminal


def default_reporter(quiet: bool = False) -> Reporter:
    """Rich progress when stderr is a terminal, plain lines when it is a pipe or a file."""
    if sys.stderr is None:
        return NullReporter()
    return RichReporter(quiet=quiet) if is_terminal(sys.stderr) else PlainReporter(quiet=quiet)


# --- tables ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A table column; `wrap` only for descriptions (names and numbers stay whole)."""

    header: str
    wrap: bool = False  # may break at spaces (and fold long words) to fit the terminal
    numeric: bool = False  # right-aligned; a "mean ± std" cell may break at its spaces but not in a number


@dataclass(frozen=True)
class TextTable:
    """Rows of strings under named columns, printed by `print_table`."""

    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[str, ...], ...]


def print_table(table: TextTable, file: IO | None = None) -> None:
    """A rich table when `file` (default stdout) is a terminal wide enough to keep every name and number
    whole; plain aligned lines otherwise."""
    from rich.console import Console

    console = Console(file=file)
    widths = fit_widths(table, console.width) if console.is_terminal else None
    if widths is None:
        for line in plain_lines(table):
            print(line, file=console.file)
        return
    console.print(rich_table(table, widths))


def plain_lines(table: TextTable) -> list[str]:
    """Header and rows, columns padded to their widest cell and two spaces apart, no trailing spaces."""
    from rich.cells import cell_len

    grid = [tuple(c.header for c in table.columns), *table.rows]
    widths = [max(cell_len(row[i]) for row in grid) for i in range(len(table.columns))]
    lines = []
    for row in grid:
        cells = [
            " " * (w - cell_len(cell)) + cell if col.numeric else cell + " " * (w - cell_len(cell))
            for cell, w, col in zip(row, widths, table.columns, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def fit_widths(table: TextTable, width: int) -> list[int] | None:
    """Content width per column so that the boxed table fits `width` with names and numbers whole, or None.

    Every column first gets its minimum (a whole cell for unwrapped columns, the longest word of a number
    or header otherwise), then the space left goes one character at a time to columns below their widest
    cell.
    """
    from rich.cells import cell_len

    def longest_word(texts) -> int:
        return max((cell_len(w) for t in texts for w in t.split()), default=1)

    minimum, natural = [], []
    for i, col in enumerate(table.columns):
        cells = [row[i] for row in table.rows]
        natural.append(max(cell_len(t) for t in [col.header, *cells]))
        if not col.wrap and not col.numeric:
            minimum.append(natural[-1])
        else:
            minimum.append(longest_word([col.header, *(cells if col.numeric else [])]))
    spare = width - (3 * len(minimum) + 1) - sum(minimum)  # 2 padding + 1 border per column, 1 more border
    if spare < 0:
        return None
    widths = list(minimum)
    while spare > 0 and any(w < n for w, n in zip(widths, natural, strict=True)):
        for i in range(len(widths)):
            if spare and widths[i] < natural[i]:
                widths[i] += 1
                spare -= 1
    return widths


def rich_table(table: TextTable, widths: list[int]):
    """A rich `Table` with fixed column widths (from `fit_widths`): long descriptions fold, nothing is cut."""
    from rich.table import Column as RichColumn
    from rich.table import Table

    columns = [
        RichColumn(
            col.header,
            width=w,
            no_wrap=not (col.wrap or col.numeric),
            overflow="fold",
            justify="right" if col.numeric else "left",
        )
        for col, w in zip(table.columns, widths, strict=True)
    ]
    out = Table(*columns, title=table.title)
    for row in table.rows:
        out.add_row(*row)
    return out
