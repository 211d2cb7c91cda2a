"""Prompt files and built-in prompt sets.

A source is resolved in this order: a path that exists is read as a file (`.jsonl` with a `prompt` field per
line, anything else as UTF-8 text with one prompt a line, blank lines and `#` comments ignored); otherwise a
built-in set by name (`simple_animals`, or `builtin:simple_animals`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dagcli.errors import DagError
from dagcli.jsonl import json_lines

# The 45 animals used as prompts by the DDPO and DAG papers for the aesthetic reward.
SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf "
    "lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck "
    "goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    metadata: dict = field(default_factory=dict, hash=False, compare=False)


# built-in set name -> a function returning its prompts (extensions add theirs with `register_prompt_set`)
PROMPT_SETS: dict[str, Callable[[], list[str]]] = {
    "simple_animals": lambda: list(SIMPLE_ANIMALS),
}


def register_prompt_set(name: str, load: Callable[[], list[str]]) -> None:
    PROMPT_SETS[name] = load


def prompt_sets() -> dict[str, Callable[[], list[str]]]:
    """Every built-in set, the extensions' included."""
    from dagcli import extensions

    extensions.load()
    return PROMPT_SETS


def prompt_set_names() -> list[str]:
    return sorted(prompt_sets())


def load_prompts(source: str | Path) -> list[PromptItem]:
    """Read prompts from a file or a built-in set. Errors are one-line `DagError`s naming the source."""
    source = str(source)
    path = Path(source).expanduser()
    if path.exists():
        return read_prompt_file(path)
    name = source.removeprefix("builtin:")
    if name in prompt_sets():
        try:
            return [PromptItem(p) for p in PROMPT_SETS[name]()]
        except ImportError as e:
            raise DagError(f"built-in prompt set {name!r} is not available in this install ({e})") from e
    raise DagError(
        f"prompt file or set {source!r} not found; valid options: a text or .jsonl file, "
        f"or a built-in set: {', '.join(prompt_set_names())}"
    )


def read_prompt_file(path: Path) -> list[PromptItem]:
    if path.is_dir():
        raise DagError(f"prompt file {str(path)!r} is a directory; expected a text or .jsonl file")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DagError(f"prompt file {str(path)!r} is binary; expected UTF-8 text or .jsonl")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DagError(f"prompt file {str(path)!r} is not UTF-8 (byte {e.start}); save it as UTF-8") from e
    items = _parse_jsonl(text, path) if path.suffix.lower() == ".jsonl" else _parse_text(text)
    if not items:
        raise DagError(f"prompt file {str(path)!r} has no prompts; write one prompt a line")
    return items


def _parse_text(text: str) -> list[PromptItem]:
    lines = (line.strip() for line in text.splitlines())
    return [PromptItem(line) for line in lines if line and not line.startswith("#")]


def _parse_jsonl(text: str, path: Path) -> list[PromptItem]:
    items = []
    for number, record in json_lines(text, lambda n, why: f"prompt file {str(path)!r} line {n}: invalid JSON ({why})"):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise DagError(f"prompt file {str(path)!r} line {number}: expected an object with a non-empty 'prompt' string")
        meta = {k: v for k, v in record.items() if k != "prompt"}
        items.append(PromptItem(record["prompt"].strip(), meta))
    return items


def prompt_metadata(source: str | Path) -> dict[str, dict]:
    """Prompt -> the extra fields of its `.jsonl` line (GenEval's `tag`, `include`, ...), for the rewards; the first
    line wins for a prompt given twice. Empty for text files and built-in sets, and when `source` cannot be read."""
    try:
        items = load_prompts(source)
    except DagError:
        return {}
    found: dict[str, dict] = {}
    for item in items:
        if item.metadata:
            found.setdefault(item.prompt, item.metadata)
    return found
