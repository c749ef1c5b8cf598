"""The typer app every command registers with (``command``), and its root options: -v and
--version."""

from __future__ import annotations

import logging
import sys
from inspect import cleandoc
from typing import Annotated

import typer

from quantgate import __version__
from quantgate.cli._console import out

app = typer.Typer(
    name="quantgate",
    help=(
        "Take a PyTorch transformer to production: export it to ONNX, quantize it to INT8 "
        "with calibration data, prove the INT8 model is still accurate and really faster, "
        "and serve it over gRPC (KServe v2 / Triton protocol) through ONNX Runtime."
    ),
    epilog=(
        "\b\nThe built-in model, end to end (the README's tour):\n"
        "  quantgate train\n"
        "  quantgate export artifacts/digits-small --out bundles/digits\n"
        "  quantgate inspect bundles/digits\n"
        "  quantgate serve bundles/digits\n"
        "\n\b\nYour own model (a Hugging Face directory, or path/to/file.py:FUNCTION),\n"
        "with text to calibrate and gate on:\n"
        "  quantgate export MODEL --out BUNDLE \\\n"
        "      --calibration calib.jsonl --eval heldout.jsonl\n"
        "\n\b\nExit codes: 0 success; 2 bad usage or input; 3 a gate failed (the bundle\n"
        "and its report.md are written, marked failed) or the export's validation did\n"
        "(nothing is written); 1 anything else."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def command(name: str | None = None):
    """``app.command`` with the docstring's paragraphs as whole lines (a docstring's own line
    breaks would break the help mid-sentence at any width but the source's), and the first
    one whole in the command list."""

    def register(fn):
        paragraphs = [" ".join(p.split()) for p in cleandoc(fn.__doc__ or "").split("\n\n")]
        # click's own short help stops at 45 characters, or at a full stop, even in "e.g."
        return app.command(name, help="\n\n".join(paragraphs), short_help=paragraphs[0])(fn)

    return register


def _version(value: bool) -> None:
    if value:
        out.print(f"quantgate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log what each stage does.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    ctx.obj = {"verbose": verbose}
    if ctx.invoked_subcommand != "serve":  # the server sets up its own log (serve.logs)
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_own_info)
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
            handlers=[handler],
        )


def _own_info(record: logging.LogRecord) -> bool:
    """-v logs quantgate's stages; other libraries, their warnings and worse only (ONNX
    Runtime's optimizer logs every fusion, under bare names such as "fusion_base", and the
    temporary paths it saves to)."""
    return record.levelno >= logging.WARNING or record.name.partition(".")[0] == "quantgate"
