"""The one seam between the engine and the terminal: progress bars, messages and tables, main process only.

Engine code receives a `Reporter` (rich in a terminal, plain lines in a pipe, or the do-nothing
`NullReporter`) and never imports rich. In a terminal output is rich; when stderr (progress, messages) or
stdout (tables) is a pipe or a file it is plain lines: no bars, no box drawing, no blank lines. Tables fit
the width (a terminal's, else $COLUMNS or 80) with every word whole: names and numbers never wrap, only
descriptions do, at spaces; a table too wide for that becomes a list.
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
    wrap: bool = False  # may break at spaces to fit the terminal (a word is never split)
    numeric: bool = False  # right-aligned; a "mean ± std" cell may break at its spaces but not in a number


@dataclass(frozen=True)
class TextTable:
    """Rows of strings under named columns, printed by `print_table`."""

    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[str, ...], ...]
    noun: str = "row"  # what a row is, for the note on a column that is the same in every row


def print_table(table: TextTable, file: IO | None = None) -> None:
    """A table that fits the width of `file` (default stdout; a pipe: $COLUMNS, else 80) with every word whole.

    A rich table in a terminal, aligned plain lines in a pipe. Where that does not fit, the columns that hold
    the same value in every row become notes below, and where it still does not fit, the table is a list, one
    block per row (a name longer than the width is the only thing that can still overflow: it is never cut).
    """
    from rich.console import Console

    console = Console(file=file)
    notes: list[str] = []
    layout = fitted_layout(table, console.width, console.is_terminal)
    if layout is None:
        table, notes = without_constant_columns(table)
        layout = fitted_layout(table, console.width, console.is_terminal)
    if layout is None:
        layout = list_lines(table, console.width)
    if not isinstance(layout, list):
        console.print(layout)
        layout = []
    for line in layout + notes:
        print(line, file=console.file)


def fitted_layout(table: TextTable, width: int, terminal: bool):
    """The boxed rich table (terminal) or the plain lines (pipe) of `table` if they fit `width`, else None."""
    from rich.cells import cell_len

    if terminal:
        widths = fit_widths(table, width)
        return None if widths is None else rich_table(table, widths)
    lines = plain_lines(table)
    return lines if max(map(cell_len, lines)) <= width else None


def without_constant_columns(table: TextTable) -> tuple[TextTable, list[str]]:
    """The table less the columns after the first whose cells are all alike (two rows or more), and a note
    line for each ("differentiable: no for every reward")."""
    if len(table.rows) < 2:
        return table, []
    keep = [0] + [i for i in range(1, len(table.columns)) if len({row[i] for row in table.rows}) > 1]
    notes = [
        f"{table.columns[i].header}: {table.rows[0][i]} for every {table.noun}"
        for i in range(len(table.columns))
        if i not in keep
    ]
    columns = tuple(table.columns[i] for i in keep)
    rows = tuple(tuple(row[i] for i in keep) for row in table.rows)
    return TextTable(table.title, columns, rows, table.noun), notes


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


def list_lines(table: TextTable, width: int) -> list[str]:
    """One block per row for a narrow screen: the first cell on its own line, then `header: value` lines
    indented, wrapped at spaces only (a name, number or hub id is never split)."""
    import textwrap

    wrap = textwrap.TextWrapper(
        width=width, initial_indent="  ", subsequent_indent="    ", break_long_words=False, break_on_hyphens=False
    )
    lines = []
    for row in table.rows:
        lines.append(row[0])
        for col, cell in zip(table.columns[1:], row[1:], strict=True):
            lines += wrap.wrap(f"{col.header}: {cell}")
    return lines


def fit_widths(table: TextTable, width: int) -> list[int] | None:
    """Content width per column so that the boxed table fits `width` with every word whole, or None.

    Every column first gets its minimum (a whole cell for unwrapped columns, the longest word of its header
    and cells otherwise), then the space left goes one character at a time to columns below their widest
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
            minimum.append(longest_word([col.header, *cells]))
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
