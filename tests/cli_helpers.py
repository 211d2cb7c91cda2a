"""Running the real `dag` entry point inside the test process."""

from __future__ import annotations

from dagcli.cli import main


def run_cli(args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `dag ARGS`; arguments may be paths."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
