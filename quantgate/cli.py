"""The command line. It only translates: parse flags, build a config, call one library
function, print the result, and map errors to exit codes:

    0  success (every gate passed)
    2  bad usage or bad input (missing file, corrupt checkpoint, invalid option)
    3  a gate or a validation failed (the bundle and its report are still written)
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from quantgate import __version__
from quantgate.errors import QuantgateError, exit_code

app = typer.Typer(
    name="quantgate",
    help=(
        "Take a PyTorch transformer to production: export it to ONNX, quantize it to INT8 "
        "with calibration data, prove the INT8 model is still accurate and really faster, "
        "and serve it over gRPC (KServe v2 / Triton protocol) through ONNX Runtime."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)
out = Console()


def progress() -> Progress:
    """A progress bar on stderr, so stdout stays clean for results."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def _version(value: bool) -> None:
    if value:
        out.print(f"quantgate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
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
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def train(
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", help="Checkpoint directory to write (reused when it already matches)."
        ),
    ] = Path("artifacts/digits-small"),
    preset: Annotated[
        str,
        typer.Option(
            help="Model size: 'small' (trains in minutes) or 'base' (the seed's d_model 512)."
        ),
    ] = "small",
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the 1,237 training images.")] = 25,
    seed: Annotated[
        int, typer.Option(help="Seed for initialisation and batch order: same seed, same weights.")
    ] = 0,
    force: Annotated[
        bool, typer.Option(help="Retrain even if a matching checkpoint exists.")
    ] = False,
) -> None:
    """Train the built-in encoder classifier on scikit-learn's digits (64 pixel tokens).

    The split is fixed: 1,237 train, 200 calibration, 360 test images. Training is seeded
    and deterministic; a checkpoint with the same model, settings and data is reused.
    """
    from quantgate.model.train import TrainConfig, digits_model_config
    from quantgate.model.train import train as train_model

    cfg = TrainConfig(epochs=epochs, seed=seed)
    with progress() as bar:
        task = bar.add_task("training", total=None, status="")

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, status=f"loss {loss:.3f}")

        result = train_model(
            out_dir, model_cfg=digits_model_config(preset), cfg=cfg, force=force, on_step=on_step
        )
        bar.update(task, visible=not result.reused)
    how = "reused" if result.reused else f"trained in {result.seconds:.0f}s"
    out.print(f"checkpoint {result.checkpoint} ({how})")
    out.print(f"test accuracy: {result.test_accuracy:.2%} on 360 held-out digits")


def main() -> None:
    """Console entry point: run the app, turning quantgate's errors into exit codes."""
    try:
        app(standalone_mode=False)
    except QuantgateError as e:
        console.print(Text.assemble(("error: ", "bold red"), str(e)), highlight=False)
        sys.exit(exit_code(e))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except Exception as e:  # click usage errors carry their own exit code (2)
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
