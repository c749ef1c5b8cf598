"""The whole pipeline: export -> calibrate -> quantize -> gate -> bundle.

``build`` writes the bundle and its report in every case, then raises ``GateFailed``
(exit 3) when a variant failed a gate; that variant is marked failed in the manifest, so
``serve`` refuses the bundle. Re-gating an existing bundle is ``quantize.regating``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.bundle import (
    Bundle,
    check_writable_target,
)
from quantgate.configs import require
from quantgate.errors import DataError, QuantizeError
from quantgate.export.config import ExportConfig
from quantgate.fsutil import claimed, raise_if_full, work_dir
from quantgate.progress import ProgressFn, no_progress
from quantgate.quantize import cuda
from quantgate.quantize import report as reports
from quantgate.quantize.cuda import CPU, CUDA
from quantgate.quantize.data import (
    DataSource,
    DataSpec,
    ModelInfo,
    check_ids,
    check_same_texts,
    named,
    open_source,
    with_graph_tables,
)
from quantgate.quantize.decide import GATE_DEFINITIONS, GateConfig
from quantgate.quantize.gates import check_eval_rows, unread_answer_rule
from quantgate.quantize.heldout import check_held_out, distinct_rows
from quantgate.quantize.search import (
    Candidate,
    QuantConfig,
    SearchResult,
    chosen_recipes,
    search,
)
from quantgate.quantize.verdict import manifest_at, much_longer, passed_bundle

if TYPE_CHECKING:  # loaded when build runs: export's pipeline imports the model code (torch)
    from quantgate.export import ExportResult, ExtraVariant
    from quantgate.model.loaders import LoadedModel, ModelSpec

log = logging.getLogger(__name__)

DEFAULT_EXPORT, DEFAULT_QUANT, DEFAULT_GATES = ExportConfig(), QuantConfig(), GateConfig()
INT8_PROVIDERS = (CPU,)
INT8_NOT_FOR = (CUDA,)  # slower than FP32 on CUDA, or on the CPU there (docs/gpu.md)


def build(
    model_spec: ModelSpec,
    out: str | Path,
    *,
    export_cfg: ExportConfig = DEFAULT_EXPORT,
    quant_cfg: QuantConfig = DEFAULT_QUANT,
    gate_cfg: GateConfig = DEFAULT_GATES,
    calibration: DataSpec | None = None,
    evaluation: DataSpec | None = None,
    force: bool = False,
    on_progress: ProgressFn | None = None,
) -> Bundle:
    """Export ``model_spec``, search INT8 recipes, gate them, and write the bundle at ``out``.

    The data are read and checked after the model loads, before the export: their rows,
    evaluation rows that are calibration rows (``heldout.check_held_out``), and enough
    evaluation rows for the gates. Returns the bundle when every gate passed; otherwise
    writes it (INT8 marked failed) and raises ``GateFailed`` with the bundle's path.
    """
    from quantgate.export import write_bundle
    from quantgate.export.pipeline import writing
    from quantgate.export.validation import input_specs

    require(export_cfg, ExportConfig, "export_cfg")
    require(quant_cfg, QuantConfig, "quant_cfg")
    require(gate_cfg, GateConfig, "gate_cfg")

    out = Path(out).absolute()
    inputs = (
        ("model", model_spec),
        ("calibration data", calibration),
        ("evaluation data", evaluation),
    )
    check_writable_target(out, force=force, inputs=inputs)  # before minutes of work
    _require_data(model_spec, calibration, evaluation)
    chosen_recipes(quant_cfg)  # a misspelt --recipe is refused now, not after the export
    emit = on_progress or no_progress
    with (
        claimed(out, "an export", create=True),
        work_dir("quantgate-build-") as tmp,
    ):
        work = Path(tmp)
        model = _load(model_spec, export_cfg, emit)
        info = ModelInfo.from_model(model, input_specs(model))
        # the data are read and checked now, before minutes of export
        cal = open_source(
            calibration, info, role="calibration", samples=quant_cfg.calibration_samples
        )
        ev = open_source(evaluation, info, role="evaluation", samples=gate_cfg.eval_samples)
        where = named("--eval", evaluation, ev)
        check_same_texts(ev, cal, where, named("--calibration", calibration, cal))
        ev = check_held_out(
            distinct_rows(ev, info, where=where),
            cal.fingerprint(),
            model=info,
            where=where,
            calibrated_on=named("--calibration", calibration, cal),
        )
        check_eval_rows(ev, model.task, model.outputs, gate_cfg.eval_samples, where=where)
        gate_cfg = unread_answer_rule(model.task, gate_cfg)
        if much_longer(cal.lengths[1], ev.lengths[1]):
            log.warning(
                "the evaluation rows run to %d tokens, the calibration rows only to %d: INT8 "
                "is calibrated on shorter sequences than it is judged on (and served on?). "
                "Calibrate on rows of the lengths the model will serve.",
                ev.lengths[1],
                cal.lengths[1],
            )
        result = _export(model, work, export_cfg, emit)
        # PyTorch's part is done: what follows reads the ONNX files and the model's
        # description. Its weights (a copy of the model's size) go, where nothing else holds
        # the module (a caller's own object stays the caller's).
        result = dataclasses.replace(result, model=result.model.released())
        del model
        gc.collect()
        exported = with_graph_tables(info, result.onnx)
        if exported is not info:  # table sizes the model did not say before its export
            check_ids(cal, exported, named("--calibration", calibration, cal))
            check_ids(ev, exported, where)
        found = search(
            result.onnx,
            cal,
            ev,
            task=result.task,
            inputs=result.inputs,
            max_seq_len=result.max_seq_len,
            workdir=work,
            quant_cfg=quant_cfg,
            gate_cfg=gate_cfg,
            unfused=result.unfused_onnx,
            on_progress=emit,
        )
        shipped = found.best
        data = {"calibration": cal.record(fingerprint=True), "evaluation": ev.record()}
        plot = reports.plot_candidates(found, shipped, work / reports.PLOT)
        sections = reports.sections(
            found, shipped, gate_cfg, data, plot=reports.PLOT if plot else None
        )
        variants, more = _variants(result, shipped, ev, work, quant_cfg, gate_cfg, emit)
        summary = _summary(found, shipped, gate_cfg, plot)
        replaced = manifest_at(out)  # what a failed verdict would take the place of
        with writing(emit):
            write_bundle(  # read back and every file verified
                _with_extra(result, quantization=summary),
                out,
                variants=variants,
                calibration={**data["calibration"], "evaluation": data["evaluation"]},
                report_sections=[*sections, *more],
                files=[plot] if plot is not None else [],
                name=export_cfg.name,
                force=force,
            )
    return passed_bundle(out, found, verify=False, replaced=replaced)


def _load(model_spec: ModelSpec, cfg: ExportConfig, emit: ProgressFn) -> LoadedModel:
    """The model to export: the first step of the "export" task."""
    from quantgate.export.pipeline import EXPORT_STEPS, load

    emit("export", 0, EXPORT_STEPS, "loading the model")
    return load(model_spec, cfg)


def _export(model: LoadedModel, work: Path, cfg: ExportConfig, emit: ProgressFn) -> ExportResult:
    """The validated FP32 export, its steps shown as the "export" task."""
    from quantgate.export import export_fp32

    return export_fp32(model, work, cfg=cfg, on_progress=emit)


def _variants(
    result: ExportResult,
    shipped: Candidate,
    evaluation: DataSource,
    work: Path,
    quant_cfg: QuantConfig,
    gate_cfg: GateConfig,
    emit: ProgressFn,
) -> tuple[list[ExtraVariant], list[str]]:
    """The variants shipped next to FP32, and their report sections after the INT8 search's:
    the shipped INT8 candidate; FP16 for CUDA (``quant_cfg.fp16``); and every variant gated
    on CUDA where a GPU is present (``quant_cfg.cuda_gates``)."""
    from quantgate.export import ExtraVariant

    assert shipped.path is not None  # what ships was built
    int8 = ExtraVariant(
        path=shipped.path,
        precision="int8",
        gates=shipped.gates,
        providers=INT8_PROVIDERS,
        recipe={**shipped.recipe, "candidate": shipped.name},
        not_for=INT8_NOT_FOR,
        notes=_notes(shipped),
    )
    variants, sections = [int8], []
    if quant_cfg.fp16:
        emit("fp16", 0, 1, "converting")
        f16, section = _fp16_variant(result.onnx, evaluation, work, quant_cfg, gate_cfg)
        variants += [f16] if f16 is not None else []
        sections.append(section)
        emit("fp16", 1, 1, "gated" if f16 is not None else "left out")
    if quant_cfg.cuda_gates:
        variants, on_cuda = cuda.gate_built(
            result, variants, evaluation, quant_cfg, emit, gate_cfg=gate_cfg
        )
        sections += on_cuda
    return variants, sections


def _with_extra(result: ExportResult, **extra: Any) -> ExportResult:
    """``result`` with ``extra`` added to its model's extra fields (the manifest's)."""
    model = dataclasses.replace(result.model, extra={**result.extra, **extra})
    return dataclasses.replace(result, model=model)


def _require_data(model_spec, calibration, evaluation) -> None:
    """Only a `quantgate train` checkpoint has data of its own (the digits splits): other
    models need both files, which is known before minutes of export. A factory that cannot
    be imported is said first: that is the mistake to fix, not the data."""
    from quantgate.model.factories import factory_of
    from quantgate.model.loaders import spec_kind

    missing = [
        flag
        for flag, spec in (("--calibration", calibration), ("--eval", evaluation))
        if spec is None
    ]
    # A checkpoint has its own data; for no model at all, export says what is wrong.
    kind = spec_kind(model_spec)
    if not missing or kind not in ("huggingface", "factory"):
        return
    if kind == "factory" and isinstance(model_spec, str):
        factory_of(model_spec)  # imports it (as the export would first): ModelLoadError
    arrays = "a .npz with one array per model input (plus optional labels)"
    if kind == "factory":  # it has no tokenizer: text would be refused
        what = f"Pass {arrays}, named as its forward's arguments."
    else:
        what = (
            'Pass text (a .jsonl of {"text": ..., "label": ...} lines, a .csv or .tsv with '
            '"text" and "label" columns, label optional; a .txt of one text per line) or '
            f"{arrays}."
        )
    raise DataError(
        f"{' and '.join(f'{m} PATH' for m in missing)} required for this model: only the "
        f"built-in digits model has data of its own. {what}"
    )


def _fp16_variant(
    fp32: Path, evaluation, work: Path, cfg: QuantConfig, gate_cfg: GateConfig = DEFAULT_GATES
):
    """FP16 for the CUDA execution provider, and its report section: FP32 inputs and outputs,
    gated on fidelity against FP32 over the evaluation rows on the CPU provider
    (``cuda.gate_built`` measures it again on CUDA where a GPU is present).

    An FP16 model that cannot be built, that crashes ONNX Runtime, or that has no float
    output to gate is left out (None): it is an extra for CUDA, and the FP32 and INT8
    variants measured before it are not lost for it. The warning and the report say why;
    CUDA then serves FP32.
    """
    from quantgate.export import ExtraVariant
    from quantgate.quantize import fp16

    try:
        # where FP32's values pass what FP16 holds, FP32 kept: the CPU provider's FP16 run,
        # below, is FP32 arithmetic between Casts, and would not see FP16 overflow
        past = fp16.out_of_range(fp32, evaluation(), threads=gate_cfg.threads)
        if said := past.describe():
            log.info("FP16: %s", said)
        keep = fp16.Fp16Config(op_block_list=cfg.fp16_op_block_list, node_block_list=past.nodes)
        f16 = fp16.save(fp16.to_fp16(fp32, keep), work / "model.fp16.onnx")
        if (crashed := fp16.crash(f16)) is not None:
            return None, _fp16_left_out(crashed)
        # the threads the search's FP32 reference and INT8 fidelity ran with
        fidelity = fp16.fidelity(
            fp32, f16, evaluation(), precision="fp16", threads=gate_cfg.threads
        )
    except QuantizeError as e:  # the converter's refusal, or no float output to gate
        return None, _fp16_left_out(str(e))
    except Exception as e:
        raise_if_full(e, work, "the FP16 variant")  # a full disk ends the export
        if type(e).__module__.split(".")[0] not in ("onnx", "onnxruntime"):
            raise  # the data's fault (a DataError), or quantgate's: not FP16's
        log.debug("ONNX Runtime failed on the FP16 variant", exc_info=True)
        return None, _fp16_left_out(f"{type(e).__name__}: {e}")
    variant = ExtraVariant(
        path=f16,
        precision="fp16",
        gates=fidelity.gates(min_cosine=cfg.fp16_min_cosine, cfg=gate_cfg),
        providers=(CUDA,),
        recipe={
            "kind": "fp16",
            "keep_io_types": True,
            "op_block_list": list(keep.op_block_list),
            "fp32_nodes": list(past.nodes),
        },
        notes="for CUDA; accuracy gated on the CPU provider, speed on CUDA where a GPU is present",
    )
    return variant, reports.fp16_section(variant.gates, kept=past.describe())


def _fp16_left_out(why: str) -> str:
    """Warn that the bundle ships without FP16; its report section."""
    why = why.rstrip(". ")
    log.warning(
        "the FP16 variant is left out of the bundle: %s. CUDA will serve FP32; "
        "pass --no-fp16 to skip FP16 and this warning.",
        why,
    )
    return reports.fp16_left_out(why)


def _notes(c) -> str:
    kept = f", {len(c.kept_fp32)} node(s) kept FP32" if c.kept_fp32 else ""
    kind = "calibrated static" if c.method == "static" else "dynamic (uncalibrated)"
    return f"recipe {c.name}: {kind} INT8{kept}"


def _summary(found: SearchResult, shipped, gate_cfg: GateConfig, plot) -> dict[str, Any]:
    return {
        "shipped": shipped.name,
        "passed": shipped.passed,
        "candidates": [c.to_dict() for c in found.candidates],
        "skipped": list(found.skipped),
        "stopped": found.stopped,
        "search_seconds": round(found.seconds, 1),
        "budget_seconds": found.budget_s,
        "gate_config": dataclasses.asdict(gate_cfg),
        "gate_definitions": GATE_DEFINITIONS,
        "plot": reports.PLOT if plot else None,
    }


__all__ = ["build"]
