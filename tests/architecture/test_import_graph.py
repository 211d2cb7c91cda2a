"""The package's import graph has no cycle, and the engine names no built-in model: what the built-in models add
comes in through the hooks in `dagcli.extensions` (and the prompt-set and reward registries), as a plugin's would."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from helpers import ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "dagcli"
BUILTIN = PACKAGE / "builtin"
# outside the engine: the command-line layer, whose help names the default model for the reader
FRONT = (PACKAGE / "commands", PACKAGE / "cli.py")
SHIPPED_LIST = PACKAGE / "extensions.py"  # lists the shipped extension module by its dotted name, once


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The package modules `path` imports anywhere in its body (inside functions too), as dotted names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*head, base] if base else head)
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    out = set()
    for target in found:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_resolve_to_modules_including_relative_and_function_level_ones(tmp_path):
    graph = {name: imported(name, path) for name, path in MODULES.items()}
    assert "dagcli.errors" in graph["dagcli.models"]
    assert "dagcli.quiet" in graph["dagcli.models"]  # imported inside a function
    assert "dagcli.rewards.pickled" in graph["dagcli.rewards.servers"]


def test_the_package_has_no_import_cycle():
    graph = {name: imported(name, path) for name, path in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def built_in_names() -> set[str]:
    from dagcli import builtin

    return {*builtin.BUILTIN_NAMES, builtin.TINY_DECODER_NAME}


def engine_files() -> list[Path]:
    def outside(path: Path) -> bool:
        return BUILTIN not in path.parents and not any(path == f or f in path.parents for f in FRONT)

    return [p for p in MODULES.values() if outside(p)]


def mentions(path: Path, names: set[str]) -> list[str]:
    """Where the code of `path` (not its docstrings or comments) names a built-in model, its constants
    (`TINY_*`, `BUILTIN_NAMES`, `is_tiny...`) or imports the built-in package."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    word = re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")(?![\w-])")
    ident = re.compile(r"TINY_|BUILTIN_NAMES|^is_tiny|tiny_clip|PRETRAINED_DIRS|RANDOM_MODELS")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if word.search(node.value) or "dagcli.builtin" in node.value and path != SHIPPED_LIST:
                found.append(f"{path.name}:{node.lineno} {node.value[:60]!r}")
        elif isinstance(node, (ast.Name, ast.Attribute, ast.alias, ast.FunctionDef)):
            text = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", None) or ""
            if ident.search(text):
                found.append(f"{path.name}:{getattr(node, 'lineno', '?')} {text}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            modules += [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            if any(m == "dagcli.builtin" or m.startswith("dagcli.builtin.") for m in modules):
                found.append(f"{path.name}:{node.lineno} import of the built-in package")
    return found


def test_the_check_sees_a_mention(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""tiny images are fine in a docstring."""\nfrom dagcli import builtin\n'
                   'x = builtin.TINY_CLIP_DIR if m == "tiny-flow" else None\n')
    assert len(mentions(bad, built_in_names())) == 3  # the import, builtin.TINY_CLIP_DIR (attribute), "tiny-flow"
    # docstrings, and strings where a name is only part of a word, pass
    fine = tmp_path / "fine.py"
    fine.write_text('"""The tiny model."""\nx = "tinyish-flows, shapes"\n')
    assert mentions(fine, built_in_names()) == []


@pytest.mark.parametrize("path", engine_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_engine_module_names_the_built_in_model(path):
    assert mentions(path, built_in_names()) == []
