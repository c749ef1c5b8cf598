"""`quantgate gate`: a bundle's gates run again, on new data, on the CPU or on CUDA."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from quantgate.cli._app import command
from quantgate.cli._console import bars, progress
from quantgate.cli._gates import (
    COSINE_HELP,
    MAX_TOKENS_HELP,
    NULL_HELP,
    TOP1_HELP,
    GateFile,
    gate_config_error,
    gate_flags,
    kept_option,
    print_gates,
)
from quantgate.errors import GateFailed


class GateDevice(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


@command()
def gate(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="BUNDLE",
            help="A bundle from `quantgate export`: with an INT8 variant to re-gate on the CPU, "
            "with FP16 or INT8 on CUDA.",
            show_default=False,
        ),
    ],
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            metavar="FILE",
            help="Evaluation data (.jsonl, .csv, .tsv, .txt or .npz, as export's --eval); the "
            "built-in model's test split by default.",
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        kept_option("Accuracy gate: largest drop in points of the task metric", "POINTS"),
    ] = None,
    min_speedup: Annotated[
        float | None, kept_option("Speed gate: INT8 vs FP32 at every shape", "RATIO")
    ] = None,
    min_cosine: Annotated[float | None, kept_option(COSINE_HELP, "COSINE")] = None,
    min_top1: Annotated[float | None, kept_option(TOP1_HELP, "RATE")] = None,
    null_answer: Annotated[
        bool | None,
        typer.Option(
            "--null-answer/--no-null-answer",
            help=NULL_HELP + " [default: the bundle's last gating's].",
            show_default=False,
        ),
    ] = None,
    max_answer_tokens: Annotated[int | None, kept_option(MAX_TOKENS_HELP, "N")] = None,
    gate_config: GateFile = None,
    device: Annotated[
        GateDevice | None,
        typer.Option(
            help="cpu: the INT8 variant's accuracy and speed gates on the CPU provider. cuda: "
            "every variant's gates on the CUDA provider, as a GPU host's export runs them: "
            "FP16's decide whether it ships, INT8's only whether it runs on CUDA; needs a GPU "
            "and the `gpu` extra. [default: cpu, or the --gate-config file's provider]",
            show_default=False,
        ),
    ] = None,
    allow_unlabelled: Annotated[
        bool,
        typer.Option(
            "--allow-unlabelled",
            help="Re-gate a bundle gated on labelled accuracy with evaluation data that has no "
            "labels, on agreement with FP32 (top-1, KL) instead. Without it such data is "
            "refused (exit 2): a missing or misnamed label key must not loosen a CI gate. "
            "For this run only: the next one without it is refused again.",
        ),
    ] = False,
) -> None:
    """Re-run a bundle's gates on new data (e.g. in CI after an ONNX Runtime upgrade).

    On the CPU (the default) the INT8 variant's accuracy and speed gates are measured again;
    with --device cuda, on a GPU host, every variant's gates on CUDA; the gates measured on the
    other provider are kept. The thresholds are the ones the bundle was last gated with (at
    export, or by the newest re-gate); a --gate-config file, then the flags, change them, and
    a looser one is warned about and named in the report, as is, on every run, any setting
    looser than the export's. Rewrites the manifest and
    report.md atomically with the new gates. Exit 0: every gate passed; 3: a gate failed (the
    bundle is marked failed); 2: bad bundle or data, or CUDA asked for where there is none;
    1: anything else (another process re-gating it, a full disk, ONNX Runtime failing).
    """
    from quantgate.bundle import CPU, CUDA
    from quantgate.errors import ConfigError
    from quantgate.quantize.regating import regate

    flags = gate_flags(
        max_accuracy_drop, min_speedup, min_cosine, min_top1, null_answer, max_answer_tokens
    )
    provider = None if device is None else CUDA if device == GateDevice.CUDA else CPU
    try:
        with progress() as bar:
            bundle = regate(
                path, eval_data, gate_file=gate_config,
                overrides={name: value for name, (_, value) in flags.items()},
                provider=provider, on_progress=bars(bar), allow_unlabelled=allow_unlabelled,
            )  # fmt: skip
    except GateFailed as e:
        # where it was written, absolute: `gate .` run inside the bundle has had its
        # directory replaced under the shell, and "." is no longer it
        print_gates(Path(e.bundle_path))
        raise
    except ConfigError as e:
        if said := gate_config_error(e, flags, gate_config):
            raise said from e
        raise
    print_gates(bundle.path)
