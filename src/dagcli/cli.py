"""The `dag` command line: thin Typer commands over the engine.

Every user-facing problem is a `DagError`: printed on one line, exit code 2, no traceback (`--debug` shows it).
Ctrl-C at any moment, from here on: one line, exit code 130 (`stopping.py`).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from contextlib import contextmanager

from dagcli.faults import fault_point


def _interrupted_while_importing(signum, frame) -> None:
    print("interrupted", file=sys.stderr)
    raise SystemExit(130)


try:  # until the imports are done (then `main` takes over): no traceback from inside an import
    _sigint_before_import = signal.signal(signal.SIGINT, _interrupted_while_importing)
except ValueError:  # imported outside the main thread
    _sigint_before_import = None
fault_point("start")

import typer  # noqa: E402
from typer.core import TyperCommand, TyperGroup  # noqa: E402

from dagcli import __version__  # noqa: E402
from dagcli.errors import DagError, Interrupted  # noqa: E402

# typer 0.29 raises the exceptions of its own copy of click; typer releases built on the click package raise
# click's. Usage errors of either are caught.
CLICK_EXCEPTION_MODULES = ("typer._click.exceptions", "click.exceptions")


class _FlagsTakeNoValue:
    """Help rows of boolean flags show no value placeholder (typer 0.29 prints `<bool>` for them)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _PlainHelpInPipe:
    """`--help` is rich (boxes, colours) in a terminal and click's plain text when stdout is a pipe or a file."""

    def format_help(self, ctx, formatter):
        from dagcli.progress import is_terminal

        if is_terminal(sys.stdout):
            return super().format_help(ctx, formatter)
        mode, self.rich_markup_mode = self.rich_markup_mode, None  # typer's switch to click's own formatter
        try:
            with _wrap_at_spaces_only(formatter):
                super().format_help(ctx, formatter)
        finally:
            self.rich_markup_mode = mode
        formatter.buffer = [text.replace("\\[", "[") for text in formatter.buffer]  # help texts are rich markup


@contextmanager
def _wrap_at_spaces_only(formatter):
    """click's help wraps lines at hyphens too (`tiny-` / `random`): model names and hub ids are kept whole."""
    module = importlib.import_module(type(formatter).__module__.rsplit(".", 1)[0] + "._textwrap")
    original = module.TextWrapper

    class WholeWords(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, break_on_hyphens=False)

    module.TextWrapper = WholeWords
    try:
        yield
    finally:
        module.TextWrapper = original


class DagGroup(_PlainHelpInPipe, _FlagsTakeNoValue, TyperGroup):
    """The `dag` group."""


class DagCommand(_PlainHelpInPipe, _FlagsTakeNoValue, TyperCommand):
    """A `dag` subcommand."""


class DagTyper(typer.Typer):
    """A Typer app whose commands are `DagCommand`s unless told otherwise."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or DagCommand, **kwargs)


app = DagTyper(
    name="dag",
    cls=DagGroup,
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
    """Add the commands to `app`, once: `main` runs many times in one process under the tests."""
    if app.registered_commands:
        return
    from dagcli.commands import sample

    sample.register(app)
    for name in ("rewards", "train", "export", "evaluate", "serve_reward"):
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


def click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """The exception class `name` of every click that is loaded (typer's own copy and/or the click package)."""
    found = []
    for module_name in CLICK_EXCEPTION_MODULES:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(getattr(module, name, None), type):
            found.append(getattr(module, name))
    return tuple(found)


def usage_message(error: BaseException) -> str:
    """click's message for a usage error, plus the rejected value when the message leaves it out."""
    message = error.format_message()
    value = _rejected_value(error)
    if value is not None and value not in message:
        message += f" (got {value!r})"
    return message


def _rejected_value(error: BaseException) -> str | None:
    """The text typer failed to convert, from the validation error behind a BadParameter (typer >= 0.29)."""
    errors = getattr(error.__cause__, "errors", None)
    try:
        value = errors()[0].get("input") if callable(errors) else None
    except (IndexError, TypeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _show_usage_error(error: BaseException) -> int:
    """Print a click usage error as `error: MESSAGE` and a pointer to --help; returns the exit code.

    The `dag` group's own "no arguments" signal prints the group's help instead and exits 0.
    """
    if isinstance(error, click_exceptions("NoArgsIsHelpError")):
        text = error.format_message()  # empty when typer's rich help already printed itself
        if text:
            typer.echo(text)
        return 0
    typer.secho(f"error: {usage_message(error)}", err=True, fg="red")
    ctx = getattr(error, "ctx", None)
    if ctx is not None and ctx.help_option_names:
        typer.echo(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.", err=True)
    return getattr(error, "exit_code", 2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `dag` script."""
    from dagcli.stopping import clear_interrupt, on_interrupt

    clear_interrupt()
    previous = _install_sigint(on_interrupt)
    try:
        _run(list(sys.argv[1:] if argv is None else argv))
    finally:
        _install_sigint(previous)


def _install_sigint(handler):
    """Install a SIGINT handler (main thread only); returns the one it replaces."""
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


def _interrupted(message: str = "", code: int = 130) -> None:
    typer.secho(f"interrupted: {message}" if message else "interrupted", err=True, fg="yellow")
    sys.exit(code)


def _run(argv: list[str]) -> None:
    _quiet_libraries()
    _register_commands()
    debug = "--debug" in argv
    try:
        # typer turns a KeyboardInterrupt into the return value 130 (without standalone mode)
        if app(args=argv, standalone_mode=False) == 130:
            _interrupted()
    except DagError as e:
        if debug:
            raise
        typer.secho(f"error: {e}", err=True, fg="red")
        sys.exit(2)
    except Interrupted as e:
        _interrupted(str(e), e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:
        if not isinstance(e, click_exceptions("ClickException")):
            raise
        sys.exit(_show_usage_error(e))


if _sigint_before_import is not None:
    signal.signal(signal.SIGINT, _sigint_before_import)
