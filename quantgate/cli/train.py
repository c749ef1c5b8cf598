"""`quantgate train`: the built-in encoder classifier, trained on scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantgate.cli._app import command
from quantgate.cli._console import out, progress


@command()
def train(
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            metavar="DIR",
            help="Checkpoint directory to write (reused when it already matches); default: "
            "artifacts/digits-PRESET (artifacts/digits-small, which the README's tour exports).",
            show_default=False,
        ),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            metavar="small|base",
            help="Model size: 'small' (trains in minutes) or 'base' (the seed's d_model 512).",
        ),
    ] = "small",
    epochs: Annotated[
        int, typer.Option(min=1, metavar="N", help="Passes over the 1,237 training images.")
    ] = 25,
    seed: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Seed for initialisation and batch order, 0 to 2**32-1: same seed, same weights.",
        ),
    ] = 0,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Retrain even if a matching checkpoint exists; replace --out even if it is a "
            "directory that is not a checkpoint.",
        ),
    ] = False,
) -> None:
    """Train the built-in encoder classifier on scikit-learn's digits (64 pixel tokens).

    The split is fixed: 1,237 train, 200 calibration, 360 test images. Training is seeded
    and deterministic; a checkpoint with the same model, settings and data is reused.
    """
    from quantgate.model.train import TrainConfig, digits_model_config
    from quantgate.model.train import train as train_model

    cfg = TrainConfig(epochs=epochs, seed=seed)
    model_cfg = digits_model_config(preset)  # an unknown preset is refused before any bar
    out_dir = out_dir or Path(f"artifacts/digits-{preset}")  # a base model never in "small"
    with progress() as bar:
        task = bar.add_task("training", total=None, status="", result=True)  # a step's loss

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, status=f"loss {loss:.3f}")

        result = train_model(out_dir, model_cfg=model_cfg, cfg=cfg, force=force, on_step=on_step)
        bar.update(task, visible=not result.reused)
    how = "reused" if result.reused else f"trained in {result.seconds:.0f} s"
    out.print(f"checkpoint {result.checkpoint} ({how})")
    out.print(f"test accuracy: {result.test_accuracy:.2%} on 360 held-out digits")
