"""Reading JSON Lines text (`samples.jsonl`, `.jsonl` prompt files)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

from dagcli.errors import DagError


def json_lines(text: str, bad_line: Callable[[int, str], str]) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line. A line that is not JSON raises a DagError whose
    message is `bad_line(line number, the parser's reason)`."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DagError(bad_line(number, e.msg)) from e
        yield number, value
