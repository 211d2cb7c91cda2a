"""The `dag` command line: thin Typer commands over the engine.

Every user-facing problem is a `DagError`: printed on one line, exit code 2, no traceback (`--debug` shows it).
"""

from __future__ import annotations

import os
import sys

import typer

from dagcli import __version__
from dagcli.errors import DagError

app = typer.Typer(
    name="dag",
    help="Align text-to-image diffusion models to black-box rewards with GFlowNets (DAG).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dagcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    _state["debug"] = debug


def _register_commands() -> None:
    from dagcli.commands import sample

    sample.register(app)
    for name in ("rewards", "train", "export", "evaluate"):
        try:
            module = __import__(f"dagcli.commands.{name}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"dagcli.commands.{name}":
                raise
            continue
        module.register(app)


def _quiet_libraries() -> None:
    """Library chatter (deprecations, dtype notes) is noise in a CLI; errors still surface."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `dag` script."""
    _quiet_libraries()
    _register_commands()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        app(args=argv, standalone_mode=False)
    except DagError as e:
        if debug:
            raise
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg="yellow")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
