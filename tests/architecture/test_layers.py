"""The engine never imports the command line: only `cli.py`, `__main__.py` and `commands/` may import Typer or
`dagcli.commands` (or `dagcli.cli`), read from the source with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

SRC = ROOT / "src" / "dagcli"
CLI_LAYER = {"cli.py", "__main__.py"}  # besides the commands/ package
FORBIDDEN = ("typer", "click", "dagcli.commands", "dagcli.cli")


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, a module of `package`: `import x`, `from x
    import y` (also relative), and `importlib.import_module` / `__import__` of a constant name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _absolute(module: str | None, level: int, package: str) -> str:
    if not level:
        return module or ""
    parts = package.split(".")[: len(package.split(".")) - level + 1]
    return ".".join(parts + ([module] if module else []))


def _is_dynamic_import(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("import_module", "__import__")


def violations(source: str, package: str) -> list[str]:
    """The forbidden imports of one module's source."""
    return [f"line {line}: {name}" for line, name in imported_modules(source, package)
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]


def engine_modules() -> list[Path]:
    return [p for p in sorted(SRC.rglob("*.py"))
            if p.relative_to(SRC).parts[0] != "commands" and p.relative_to(SRC).as_posix() not in CLI_LAYER]


def test_no_engine_module_imports_the_command_line():
    modules = engine_modules()
    assert SRC / "api.py" in modules and SRC / "trainer.py" in modules and len(modules) > 30
    found = {}
    for path in modules:
        package = ".".join(("dagcli", *path.relative_to(SRC).parent.parts))
        if bad := violations(path.read_text(encoding="utf-8"), package):
            found[str(path.relative_to(SRC))] = bad
    assert found == {}


def test_the_check_finds_every_form_of_import():
    sources = {
        "import typer": "typer",
        "from typer.testing import CliRunner": "typer.testing",
        "def f():\n    from dagcli.commands.common import check_eta": "dagcli.commands.common",
        "from .commands import train": "dagcli.commands",
        "from .. import cli": "dagcli.cli",
        "import importlib\nimportlib.import_module('dagcli.commands.train')": "dagcli.commands.train",
        "__import__('click')": "click",
    }
    for source, name in sources.items():
        package = "dagcli.rewards" if source.startswith("from ..") else "dagcli"
        assert any(name in v for v in violations(source, package)), source
    clean = "import torch\nfrom dagcli.checks import check_eta\nfrom . import progress\nfrom .commandsx import y"
    assert violations(clean, "dagcli") == []
