"""How a command ends: ``main`` runs the app with the ending signals handled and maps what
ended it to an exit code (the package's docstring lists them); ``run``, the console script,
also records a signal that comes after the command."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.text import Text

from quantgate import fsutil, signals
from quantgate.cli._app import app
from quantgate.cli._console import console
from quantgate.errors import QuantgateError, exit_code

if TYPE_CHECKING:
    from click import ClickException


def _usage_errors() -> tuple[type[ClickException], ...]:
    """Click's usage errors: from click itself, and from the copy newer typers vendor."""
    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(module).ClickException)
    return tuple(found)


# The signal that ended the command, if one did: main() reports it, whatever it interrupted.
_interrupted: list[signal.Signals] = []


@contextlib.contextmanager
def _ending_signals() -> Iterator[None]:
    """While the block runs, Ctrl-C raises KeyboardInterrupt, and SIGTERM or SIGHUP (the
    terminal closed) exit through SystemExit (128 + the signal), so that `with` blocks remove
    their temporary files; the default handlers of the two would end the process without
    running them. Each is recorded for main() to report; which are handled is
    ``signals.handling``'s rule. (The server installs its own handlers while it serves.)"""

    def ended(signum, _frame):
        _interrupted.append(signal.Signals(signum))
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        sys.exit(128 + signum)

    with signals.handling(ended):
        yield


def _exit_interrupted(written: list[Path]) -> NoReturn:
    """Say which signal ended the command, and what it had already replaced (``written``:
    an interrupt after the bundle's swap finds the new bundle in place)."""
    sig = _interrupted[0]
    after = f" after writing {', '.join(map(str, written))}, which holds the new content"
    console.print(f"interrupted ({sig.name}){after if written else ''}", highlight=False)
    sys.exit(128 + sig)


# Top-level modules of the optional extras (pyproject.toml) -> the extra that installs them.
_EXTRAS = {
    "torch": "export",
    "onnxscript": "export",
    "sklearn": "export",
    "matplotlib": "export",
    "transformers": "hf",
    "tokenizers": "hf",
    "onnxruntime": "cpu",
}


def run() -> None:
    """The console script and ``python -m quantgate``: ``main``, with a Ctrl-C, SIGTERM or
    SIGHUP that comes outside the command (while it prints its last lines, or while Python
    shuts down) recorded rather than raised: Python's own handler raised KeyboardInterrupt
    wherever it found the process, a traceback and exit 0 after a finished command. main
    reports one that comes before it exits; a second one ends the process at once."""

    def late(signum: int, _frame: object) -> None:
        if late_signals:
            os._exit(128 + signum)
        late_signals.append(signum)
        _interrupted.append(signal.Signals(signum))

    late_signals: list[int] = []
    signals.install(late)  # the command's own handlers (_ending_signals) come back to it
    # Once the exit handlers (torch's, ONNX Runtime's) have run, Python's finalization puts
    # the default action back for handlers written in Python, and unloading those libraries
    # takes a second or more: a Ctrl-C then killed the process, its exit code (3: a gate
    # failed) lost to 130. Registered first, this runs last: ignored from there on, for
    # TEARDOWN_S at most.
    atexit.register(_ignore_ending_signals)
    main()


# seconds the process may take to end once ending signals are ignored: then SIGALRM's default
# action ends it, so that a teardown that hangs (a lock a stuck thread holds) still ends
TEARDOWN_S = 10


def _ignore_ending_signals() -> None:
    for sig in signals.ENDING:
        signal.signal(sig, signal.SIG_IGN)
    signal.alarm(TEARDOWN_S)


def main() -> None:
    """Run the app, turning quantgate's errors into exit codes (``run`` is the console
    script's entry: this one leaves the process's signal handlers as they were)."""
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        # --help into a pipe or a log: whole lines of up to 120 columns, not a terminal's 80
        # (click would break "sequence-classification" at its hyphen).
        wide = {"terminal_width": 120, "max_content_width": 120}
        app.info.context_settings = {**(app.info.context_settings or {}), **wide}
    _interrupted.clear()  # main() may run more than once in a process (tests, a program)
    with fsutil.recording() as replaced:
        try:
            with _ending_signals():
                code = app(standalone_mode=False)  # a command's return, or typer.Exit's code
        except BaseException as e:
            if _interrupted:  # raised because of the signal, whatever it interrupted (an import)
                _exit_interrupted(replaced)
            _exit_for(e)
        if _interrupted or code == 130:  # typer turns a KeyboardInterrupt into exit code 130
            _interrupted[:] = _interrupted or [signal.SIGINT]
            _exit_interrupted(replaced)
    sys.exit(code or 0)


def _exit_for(e: BaseException) -> NoReturn:
    """End the process as the exception that ended a command says: its message and exit
    code for quantgate's errors and a user's mistakes; anything else is raised on."""
    if isinstance(e, _usage_errors()):  # a bad option or argument: click's message, exit 2
        if getattr(e, "option_name", None) in ("-v", "--verbose"):
            e.message += " (it goes before the command: quantgate -v COMMAND ...)"  # type: ignore[misc]
        # typer checks a choice with pydantic, whose words lead its message
        e.message = e.message.replace("Value error, ", "")  # type: ignore[misc]
        e.show()
        sys.exit(e.exit_code)
    if isinstance(e, QuantgateError):
        _error(str(e))
        sys.exit(exit_code(e))
    # an optional extra this command needs is not installed
    if isinstance(e, ModuleNotFoundError) and (extra := _EXTRAS.get((e.name or "").split(".")[0])):
        _error(
            f"this command needs {e.name}, which is not installed: it comes with the "
            f"`{extra}` extra. Run: pip install 'quantgate[{extra}]'"
        )
        sys.exit(2)
    if isinstance(e, typer.Abort) and isinstance(e.__context__, EOFError):
        _error(f"unexpected end of file ({e.__context__})")  # click's Abort for any EOFError
        sys.exit(1)
    if isinstance(e, (typer.Abort, KeyboardInterrupt)):
        console.print("interrupted (SIGINT)")
        sys.exit(130)
    raise e


def _error(message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
