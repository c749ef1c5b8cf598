"""`quantgate export`: a model to ONNX, then to INT8 with its gates, written as a bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from quantgate.cli._app import command
from quantgate.cli._bundle import export_notes, fusions
from quantgate.cli._console import bars, out, progress
from quantgate.cli._gates import (
    GateFile,
    MaxAnswerTokens,
    MaxDrop,
    MinCosine,
    MinSpeedup,
    MinTop1,
    NullAnswer,
    gate_flags,
    print_gates,
    read_gate_config,
)
from quantgate.errors import GateFailed
from quantgate.export.config import ExportConfig, Exporter

_DEFAULT_EXPORT = ExportConfig()


@command("export")
def export_command(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="A checkpoint directory (`quantgate train`), a Hugging Face model directory, "
            "or your own module's factory: package.module:factory or path/to/file.py:factory.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="DIR", help="Bundle directory to write (atomically)."),
    ],
    task: Annotated[
        str | None,
        typer.Option(
            metavar="TASK",
            help="feature-extraction, sequence-classification, multi-label-classification "
            "(a sigmoid per label), token-classification or question-answering (extractive: "
            "start and end scores per token); default: the model's own (a Hugging Face "
            "config's problem_type tells a multi-label one).",
        ),
    ] = None,
    exporter: Annotated[
        Exporter, typer.Option(help="auto tries legacy, then dynamo.")
    ] = _DEFAULT_EXPORT.exporter,
    opset: Annotated[int, typer.Option(metavar="N", help="ONNX opset.")] = _DEFAULT_EXPORT.opset,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="Longest sequence to export and validate; default: the model's."
        ),
    ] = None,
    optimize: Annotated[
        bool, typer.Option(help="Apply ONNX Runtime's transformer fusions (then validate again).")
    ] = _DEFAULT_EXPORT.optimize,
    atol: Annotated[
        float, typer.Option(metavar="TOL", help="Absolute tolerance vs PyTorch.")
    ] = _DEFAULT_EXPORT.atol,
    rtol: Annotated[
        float, typer.Option(metavar="TOL", help="Relative tolerance vs PyTorch.")
    ] = _DEFAULT_EXPORT.rtol,
    name: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Bundle name; default: the --out directory's name."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace --out even if it is a directory that is not a bundle, or a bundle of "
            "another model.",
        ),
    ] = False,
    no_quantize: Annotated[
        bool, typer.Option("--no-quantize", help="Stop after FP32: no INT8, no gates.")
    ] = False,
    calibration: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help='Calibration data: text (.jsonl of {"text": ...} lines; .csv or .tsv with a '
            '"text" column; .txt, a text per line; pairs, for a cross-encoder or a question '
            'answerer, with a "text_pair" beside each "text") or a .npz of inputs. Required '
            "with --eval unless MODEL is the built-in checkpoint, which has its own.",
        ),
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            metavar="FILE",
            help="Held-out evaluation data, as --calibration's, with an optional 'label' key "
            "or column (.npz: a 'labels' array); a classifier is gated on its labels. Never "
            "the calibration rows (a tenth or more shared is refused).",
        ),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            min=1,
            metavar="N",
            help="Calibration rows to use (length-stratified; a question answerer's long "
            "contexts: pairs, each with all its windows); default: all.",
        ),
    ] = None,
    search_budget: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Seconds for the INT8 recipe search (default 900): no candidate starts "
            "after it (one already started finishes). How far the search gets then depends "
            "on the machine's speed and load; for a search that does not, bound it with "
            "--max-candidates and give it time.",
            show_default=False,
        ),
    ] = None,
    max_candidates: Annotated[
        int | None,
        typer.Option(
            min=1,
            metavar="N",
            help="Candidates the INT8 search may try (default 12), whatever the time they "
            "take: a loaded machine tries as many as an idle one.",
            show_default=False,
        ),
    ] = None,
    recipe: Annotated[
        list[str] | None,
        typer.Option(
            "--recipe",
            metavar="NAME",
            help="Search only this INT8 recipe; repeat for several (default: every recipe "
            "for this CPU, best first). A name not among them is refused with the list. "
            "Static recipes (smooth-static-u8s8, ...) fix activation scales at calibration; "
            "ORT's dynamic ones scale each batch, so a row's answer moves with its "
            "batch-mates.",
            show_default=False,
        ),
    ] = None,
    fp16: Annotated[
        bool | None,
        typer.Option(
            "--fp16/--no-fp16",
            help="Also ship an FP16 variant for CUDA, gated on fidelity against FP32 "
            "(default: yes).",
            show_default=False,
        ),
    ] = None,
    cuda_gates: Annotated[
        bool | None,
        typer.Option(
            "--cuda-gates/--no-cuda-gates",
            help="Where a CUDA GPU is present: time every variant on the CUDA provider "
            "(FP16 must be 1.2x FP32 at batch 128 and not slower at batch 1; nodes that fall "
            "back to the CPU fail it). INT8 slower on CUDA is marked not for CUDA (default: "
            "yes).",
            show_default=False,
        ),
    ] = None,
    max_accuracy_drop: MaxDrop = None,
    min_speedup: MinSpeedup = None,
    min_cosine: MinCosine = None,
    min_top1: MinTop1 = None,
    null_answer: NullAnswer = None,
    max_answer_tokens: MaxAnswerTokens = None,
    gate_config: GateFile = None,
) -> None:
    """Export MODEL, quantize it to INT8 with calibration data, gate it, write a bundle.

    FP32: validated against PyTorch on real samples at several shapes (a mismatch exits 3
    and leaves --out as it was), then fused. INT8: a recipe search keeps the fastest
    candidate that passes the accuracy and speed gates. The bundle and report.md are
    written in every case; a failed gate marks the INT8 variant failed and exits 3.
    """
    from quantgate.export import export

    cfg = ExportConfig(
        task=task,
        exporter=exporter,
        opset=opset,
        max_seq_len=max_seq_len,
        optimize=optimize,
        atol=atol,
        rtol=rtol,
        name=name,
    )
    if no_quantize:
        _refuse_unused_quantize_flags(
            calibration=calibration, eval=eval_data, samples=samples,
            search_budget=search_budget, max_candidates=max_candidates, recipe=recipe,
            fp16=fp16, cuda_gates=cuda_gates, max_accuracy_drop=max_accuracy_drop,
            min_speedup=min_speedup, min_cosine=min_cosine, min_top1=min_top1,
            null_answer=null_answer, max_answer_tokens=max_answer_tokens, gate_config=gate_config,
        )  # fmt: skip
        with progress() as bar:
            bundle = export(model, out_dir, cfg=cfg, force=force, on_progress=bars(bar))
        _print_export(bundle)
        return

    from quantgate.bundle import check_writable_target
    from quantgate.bundle import load as load_bundle
    from quantgate.quantize.data import check_path
    from quantgate.quantize.pipeline import build
    from quantgate.quantize.search import QuantConfig

    for flag, path in (("--calibration", calibration), ("--eval", eval_data)):
        if path is not None:
            check_path(path, flag)  # before minutes of export, not after
    flags = gate_flags(
        max_accuracy_drop, min_speedup, min_cosine, min_top1, null_answer, max_answer_tokens
    )
    gates = read_gate_config(gate_config, flags)
    if gate_config is not None:  # read, not kept: the directory holding it stays too
        check_writable_target(out_dir, force=force, inputs=[("gate config", gate_config)])
    given: dict[str, Any] = dict(
        search_budget_s=search_budget,
        max_candidates=max_candidates,
        recipes=tuple(recipe) if recipe else None,
        fp16=fp16,
        cuda_gates=cuda_gates,
    )
    quant = QuantConfig(
        calibration_samples=samples, **{k: v for k, v in given.items() if v is not None}
    )
    try:
        with progress() as bar:
            bundle = build(
                model,
                out_dir,
                export_cfg=cfg,
                quant_cfg=quant,
                gate_cfg=gates,
                calibration=calibration,
                evaluation=eval_data,
                force=force,
                on_progress=bars(bar),
            )
    except GateFailed as failed:
        _print_export(load_bundle(Path(failed.bundle_path or out_dir), verify=False))
        print_gates(Path(failed.bundle_path or out_dir))
        raise
    _print_export(bundle)
    print_gates(bundle.path)


def _refuse_unused_quantize_flags(**given) -> None:
    """--no-quantize with flags of the INT8 step: refuse rather than silently ignore them."""
    from quantgate.errors import ConfigError

    flag = lambda k, v: ("--no-" if v is False else "--") + k.replace("_", "-")  # noqa: E731
    if unused := [flag(k, v) for k, v in given.items() if v is not None]:
        raise ConfigError(
            f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} for quantization (INT8, "
            "FP16) and its gates, which --no-quantize skips. Drop --no-quantize to run them, "
            f"or drop {'that flag' if len(unused) == 1 else 'those flags'}."
        )


def _print_export(bundle) -> None:
    e = bundle.manifest.export
    val = e["validation"]
    out.print(f"bundle {bundle.path} ({e['exporter']} exporter, opset {bundle.manifest.opset})")
    for line in export_notes(e):
        out.print(f"  {line}", highlight=False)
    for output, diff in val["max_abs_diff"].items():
        out.print(f"  {output}: max abs diff {diff:.2e} over {len(val['cases'])} shapes")
    if longest := bundle.manifest.max_seq_len:  # a factory's: its example's width, unless set
        out.print(
            f"  longest input: {longest} tokens (the server refuses longer; --max-seq-len, or "
            "a factory's max_seq_len, sets it)",
            highlight=False,
        )
    out.print(f"  fusions: {fusions(e)}")
