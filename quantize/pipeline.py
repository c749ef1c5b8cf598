"""The whole pipeline: export -> calibrate -> quantize -> gate -> bundle, and re-gating.

``build`` writes the bundle and its report in every case, then raises ``GateFailed``
(exit 3) when a variant failed a gate; that variant is marked failed in the manifest, so
``serve`` refuses the bundle. ``regate`` re-runs an existing bundle's gates on new
evaluation data (for example after an ONNX Runtime upgrade): its INT8 variant's on the CPU,
or every variant's on CUDA by the build's rule; it rewrites the manifest and report
atomically, and raises ``GateFailed`` unless the bundle then passes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.bundle import (
    PASS,
    Bundle,
    GateResult,
    Manifest,
    Variant,
    all_passed,
    check_writable_target,
    load,
    rewrite,
)
from quantgate.configs import require
from quantgate.errors import BundleError, ConfigError, DataError, GateFailed, QuantizeError
from quantgate.export.config import ExportConfig
from quantgate.fsutil import claimed
from quantgate.progress import ProgressFn, no_progress
from quantgate.quantize import report as reports
from quantgate.quantize.cuda import CPU, CUDA, CudaGating
from quantgate.quantize.data import (
    MIN_CALIBRATION_ROWS,
    DataSource,
    DataSpec,
    ModelInfo,
    check_ids,
    check_not_calibration,
    named,
    open_source,
    with_graph_tables,
)
from quantgate.quantize.decide import GateConfig
from quantgate.quantize.fidelity import cosine_of_r2
from quantgate.quantize.gates import (
    MIN_EVAL_ROWS,
    accuracy_gates,
    batch_consistency,
    check_evaluation,
    collect,
    counts_rows,
)
from quantgate.quantize.heldout import Fingerprint, check_held_out
from quantgate.quantize.labels import NO_LABEL
from quantgate.quantize.search import (
    Candidate,
    QuantConfig,
    SearchResult,
    chosen_recipes,
    search,
)
from quantgate.quantize.speed import speed_gates

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
    evaluation rows that are calibration rows (``data.check_held_out``), and enough
    evaluation rows for the gates. Returns the bundle when every gate passed; otherwise
    writes it (INT8 marked failed) and raises ``GateFailed`` with the bundle's path.
    """
    from quantgate.export import write_bundle
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
        tempfile.TemporaryDirectory(prefix="quantgate-build-") as tmp,
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
        ev = check_held_out(
            ev,
            cal.fingerprint(),
            where=where,
            calibrated_on=named("--calibration", calibration, cal),
        )
        _check_eval_rows(ev, model.task, model.outputs, gate_cfg.eval_samples, where=where)
        if _much_longer(cal.lengths[1], ev.lengths[1]):
            log.warning(
                "the evaluation rows run to %d tokens, the calibration rows only to %d: INT8 "
                "is calibrated on shorter sequences than it is judged on (and served on?). "
                "Calibrate on rows of the lengths the model will serve.",
                ev.lengths[1],
                cal.lengths[1],
            )
        result = _export(model, work, export_cfg, emit)
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
        write_bundle(
            _with_extra(result, quantization=summary),
            out,
            variants=variants,
            calibration={**data["calibration"], "evaluation": data["evaluation"]},
            report_sections=[*sections, *more],
            files=[plot] if plot is not None else [],
            name=export_cfg.name,
            force=force,
        )
    return _passed_bundle(out, found)


def _load(model_spec: ModelSpec, cfg: ExportConfig, emit: ProgressFn) -> LoadedModel:
    """The model to export: the first step of the "export" task."""
    from quantgate.export.pipeline import EXPORT_STEPS, load

    emit("export", 0, EXPORT_STEPS, "loading the model")
    return load(model_spec, cfg)


def _export(model: LoadedModel, work: Path, cfg: ExportConfig, emit: ProgressFn) -> ExportResult:
    """The validated FP32 export, its steps shown as the "export" task."""
    from quantgate.export import export_fp32
    from quantgate.export.pipeline import EXPORT_STEPS

    result = export_fp32(model, work, cfg=cfg, on_progress=emit)
    emit("export", EXPORT_STEPS, EXPORT_STEPS, "validated")
    return result


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
        variants, on_cuda = _gate_on_cuda(
            result, variants, evaluation, quant_cfg, emit, gate_cfg=gate_cfg
        )
        sections += on_cuda
    return variants, sections


def _with_extra(result: ExportResult, **extra: Any) -> ExportResult:
    """``result`` with ``extra`` added to its model's extra fields (the manifest's)."""
    model = dataclasses.replace(result.model, extra={**result.extra, **extra})
    return dataclasses.replace(result, model=model)


def _passed_bundle(
    path: Path, search: SearchResult | None = None, *, verify: bool = True
) -> Bundle:
    """The bundle written at ``path`` (its files verified unless ``verify`` is False: a
    re-gate verified them before it measured, and rewrote only the manifest and report);
    ``GateFailed`` unless every gate of every variant passed. ``search``: the recipe search
    of a build, which the message names where it stopped early."""
    bundle = load(path, verify=verify)
    if bundle.manifest.verdict != PASS:
        message = _failure_message(bundle.manifest, path, search)
        raise GateFailed(message, bundle_path=str(path))
    return bundle


def _check_eval_rows(
    ev: DataSource,
    task: str,
    outputs: Sequence[str],
    eval_samples: int | None,
    *,
    where: str,
) -> None:
    """DataError where the accuracy, top-1 or nearest-neighbour gates would refuse ``ev`` for
    having fewer than ``MIN_EVAL_ROWS`` rows (``gates.check_evaluation``): known when the data
    are opened, before minutes of export, and said with the advice that fits: a file too
    small, or an ``eval_samples`` cap too low. A model with neither a classifier's nor an
    embedding's outputs is gated on cosine alone, on any number of rows."""
    if not counts_rows(task, outputs) or ev.samples >= MIN_EVAL_ROWS:
        return
    need = (
        f"the accuracy, top-1 and nearest-neighbour gates need at least {MIN_EVAL_ROWS} "
        f"evaluation rows (with {ev.samples}, each row is {100 / ev.samples:.3g} points of "
        "accuracy)"
    )
    capped = eval_samples is not None and ev.capped
    if capped and (ev.total is None or ev.total >= MIN_EVAL_ROWS):
        of = f" of its {ev.total}" if ev.total is not None else ""
        raise DataError(
            f"eval_samples {eval_samples} (--gate-config) keeps {ev.samples}{of} rows of {where}; "
            f"{need}. Raise eval_samples to {MIN_EVAL_ROWS} or more, or leave it out to use "
            "every row."
        )
    rows = ev.total if ev.total is not None else ev.samples
    kept = f" (eval_samples {eval_samples} keeps {ev.samples})" if capped else ""
    raise DataError(
        f"{where} has {rows} row(s){kept}; {need}. Pass more held-out rows (hundreds for a "
        "1-point accuracy gate)."
    )


def _require_data(model_spec, calibration, evaluation) -> None:
    """Only a `quantgate train` checkpoint has data of its own (the digits splits): other
    models need both files, which is known before minutes of export. A factory that cannot
    be imported is said first: that is the mistake to fix, not the data."""
    from quantgate.model.loaders import factory_of, spec_kind

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
    raise DataError(
        f"{' and '.join(f'{m} PATH' for m in missing)} required for this model: only the "
        'built-in digits model has data of its own. Pass a .jsonl of {"text": ..., "label": ...} '
        "lines (label optional) or a .npz with one array per model input (plus optional labels)."
    )


def _fp16_variant(
    fp32: Path, evaluation, work: Path, cfg: QuantConfig, gate_cfg: GateConfig = DEFAULT_GATES
):
    """FP16 for the CUDA execution provider, and its report section: FP32 inputs and outputs,
    gated on fidelity against FP32 over the evaluation rows on the CPU provider
    (``_gate_on_cuda`` measures it again on CUDA where a GPU is present).

    An FP16 model that cannot be built, or that crashes ONNX Runtime, is left out (None):
    it is an extra for CUDA, and the FP32 and INT8 variants measured before it are not lost
    for it. The warning and the report say why; CUDA then serves FP32.
    """
    from quantgate.export import ExtraVariant
    from quantgate.quantize import fp16

    try:
        f16 = fp16.save(fp16.to_fp16(fp32), work / "model.fp16.onnx")
    except QuantizeError as e:
        return None, _fp16_left_out(str(e))
    if (crashed := fp16.crash(f16)) is not None:
        return None, _fp16_left_out(crashed)
    fidelity = fp16.fidelity(fp32, f16, evaluation(), precision="fp16")
    variant = ExtraVariant(
        path=f16,
        precision="fp16",
        gates=fidelity.gates(min_cosine=cfg.fp16_min_cosine, cfg=gate_cfg),
        providers=(CUDA,),
        recipe={"kind": "fp16", "keep_io_types": True},
        notes="for CUDA; accuracy gated on the CPU provider, speed on CUDA where a GPU is present",
    )
    return variant, reports.fp16_section(variant.gates)


def _fp16_left_out(why: str) -> str:
    """Warn that the bundle ships without FP16; its report section."""
    why = why.rstrip(". ")
    log.warning(
        "the FP16 variant is left out of the bundle: %s. CUDA will serve FP32; "
        "pass --no-fp16 to skip FP16 and this warning.",
        why,
    )
    return reports.fp16_left_out(why)


def _gate_on_cuda(
    result,
    variants: list,
    evaluation,
    cfg: QuantConfig,
    emit: ProgressFn,
    *,
    gate_cfg: GateConfig = DEFAULT_GATES,
    provider: str = CUDA,
) -> tuple[list, list[str]]:
    """Where a CUDA GPU is present, gate every variant on it (``_cuda_gates``) and apply the
    results (``cuda.apply_gates``): FP16 ships on CUDA only if it is accurate and faster
    there; INT8's CUDA results decide only where it runs, slower or falling back to the CPU
    and it is marked not for CUDA (its CPU gates still decide whether it ships). The
    variants and the report's CUDA section; ``provider`` is a parameter so that tests run
    this on the CPU.
    """
    from quantgate.quantize import cuda

    if provider == CUDA and not cuda.available():
        return variants, []
    files = {v.precision: v.path for v in variants}
    gated = _cuda_gates(
        result.onnx, files, result.inputs, result.max_seq_len, evaluation, emit,
        fp16_min_cosine=cfg.fp16_min_cosine, gate_cfg=gate_cfg, provider=provider,
    )  # fmt: skip
    out = [cuda.apply_gates(v, gated.gates[v.precision], provider) for v in variants]
    return out, [reports.cuda_section(gated)]


def _cuda_gates(
    fp32: Path,
    files: dict[str, Path],
    inputs: Sequence,
    max_seq_len: int,
    evaluation,
    emit: ProgressFn,
    *,
    fp16_min_cosine: float,
    gate_cfg: GateConfig,
    provider: str,
) -> CudaGating:
    """Every variant in ``files`` (precision -> ONNX file) gated on ``provider``.

    Placement and speed against ``fp32`` (``cuda.gate_variants``, at sequence lengths capped
    at what the model takes); then the fidelity on ``evaluation`` there (CUDA's arithmetic,
    not only FP16 storage as on the CPU): always for FP16, cosine >= ``fp16_min_cosine``, and
    for INT8 only where it is fast enough to run there at all, cosine >=
    ``gate_cfg.min_cosine``.
    """
    from quantgate.quantize import cuda, fp16

    emit("cuda", 0, 1, f"timing every variant on {provider}")
    default = cuda.CudaGateConfig()
    seq = min(default.throughput[1], max_seq_len)
    timing = dataclasses.replace(
        default, throughput=(default.throughput[0], seq), latency=(default.latency[0], seq)
    )
    gates, timings, where = cuda.gate_variants(fp32, files, inputs, timing, provider=provider)
    for k, file in files.items():
        if k != "fp16" and not all_passed(gates[k]):
            continue  # not for CUDA anyway: its accuracy there does not matter
        fidelity = fp16.fidelity(fp32, file, evaluation(), provider=provider, precision=k)
        threshold = fp16_min_cosine if k == "fp16" else gate_cfg.min_cosine
        gates[k] = (*fidelity.gates(min_cosine=threshold, cfg=gate_cfg), *gates[k])
    emit("cuda", 1, 1, "gated")
    return CudaGating(gates, timings, where, timing)


def regate(
    bundle_path: str | Path,
    evaluation: DataSpec | None = None,
    gate_cfg: GateConfig | None = None,
    *,
    on_progress: ProgressFn | None = None,
    allow_unlabelled: bool = False,
) -> Bundle:
    """Re-run a bundle's gates on ``gate_cfg.provider`` on ``evaluation``; rewrite its
    manifest and report atomically.

    A bundle gated on labelled accuracy is refused unlabelled evaluation data (a DataError,
    before anything is measured): the agreement gates that would stand in let far more rows
    change, and a misnamed label key would turn a CI gate green. ``allow_unlabelled`` gates
    it on agreement with FP32 knowingly.

    On the CPU: the INT8 variant's accuracy and speed gates, which replace its gates measured
    there; its gates on CUDA are kept. On CUDA: every variant's CUDA gates, by the build's rule
    (``_regate_on_cuda``); the gates measured on the CPU are kept.

    ``gate_cfg`` defaults to the settings the bundle was last gated with
    (``recorded_gate_config``): a re-gate keeps the bundle's thresholds unless told
    otherwise, and a loosened threshold is warned about and named in the report. In
    report.md the re-gate comes first, and the sections it replaces are kept, marked
    superseded (``report.regated``). Raises ``GateFailed`` (after rewriting) unless the
    bundle then passes: every gate of every variant.

    One process at a time reads, re-gates and rewrites a bundle (``fsutil.claimed``): a
    second re-gate or an export to it meanwhile is refused (``Busy``).
    """
    with claimed(bundle_path, "a re-gate"):
        return _regate(bundle_path, evaluation, gate_cfg, on_progress, allow_unlabelled)


def _regate(
    bundle_path: str | Path,
    evaluation: DataSpec | None,
    gate_cfg: GateConfig | None,
    on_progress: ProgressFn | None,
    allow_unlabelled: bool,
) -> Bundle:
    bundle = load(bundle_path)  # verifies every file's sha256
    check_writable_target(bundle.path, force=False)  # read-only: refused before the measuring
    m = bundle.manifest
    if gate_cfg is not None:
        require(gate_cfg, GateConfig, "gate_cfg")
    recorded = recorded_gate_config(m)
    gate_cfg = gate_cfg or recorded or DEFAULT_GATES
    on_cuda = gate_cfg.provider == CUDA
    _require_variants(m, on_cuda)  # before minutes of reading and measuring
    changed = _changed_settings(recorded, gate_cfg) if recorded else None
    loosened = [text for text, looser in changed or () if looser]
    if loosened:
        log.warning(
            "re-gating with looser settings than the bundle was last gated with: %s",
            "; ".join(loosened),
        )
    info = with_graph_tables(ModelInfo.from_manifest(m, bundle.path), bundle.file("fp32"))
    fingerprint = Fingerprint.from_record(m.calibration)
    if fingerprint is None:  # a bundle from before its calibration rows were recorded
        check_not_calibration(evaluation, m.calibration)
    ev = open_source(evaluation, info, role="evaluation", samples=gate_cfg.eval_samples)
    where = named("--eval", evaluation, ev)
    calibrated_on = (
        f"the data this bundle was calibrated on ({(m.calibration or {}).get('source')})"
    )
    ev = check_held_out(ev, fingerprint, where=where, calibrated_on=calibrated_on)
    if not on_cuda:
        _check_labels_kept(m, ev, where, allow=allow_unlabelled)
    emit = on_progress or no_progress
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    said = (_measured_on(ev), _settings_said(changed))
    record = {
        "at": when,
        "provider": gate_cfg.provider,
        "evaluation": ev.record(),
        "gate_config": dataclasses.asdict(gate_cfg),
    }
    if on_cuda:
        variants, gated = _regate_on_cuda(bundle, ev, gate_cfg, emit)
        manifest = _recorded(m, variants, record)
        section = reports.cuda_regated(manifest, when, *said, gated, gate_cfg.confidence)
    else:
        _check_eval_rows(
            ev, m.task, [o.name for o in m.outputs], gate_cfg.eval_samples, where=where
        )
        variants, kept, new = _regate_int8(bundle, ev, gate_cfg, emit)
        manifest = _recorded(m, variants, record)
        section = reports.regate_section(manifest, when, gate_cfg, *said, kept=kept, new=new)
    old = bundle.report.read_text() if bundle.report.is_file() else ""
    report = reports.regated(old, section, manifest, when, provider=gate_cfg.provider)
    rewrite(bundle, manifest, report)
    return _passed_bundle(bundle.path, verify=False)


def _regate_int8(
    bundle: Bundle, ev: DataSource, gate_cfg: GateConfig, emit: ProgressFn
) -> tuple[tuple[Variant, ...], bool, list[str]]:
    """The bundle's variants after its INT8 variant's accuracy and speed gates are measured
    again on ``gate_cfg.provider``, replacing those measured there before; whether it keeps
    gates measured on other providers (CUDA's, from the build); and the accuracy gates it
    has now that it had not before."""
    int8 = bundle.manifest.variant("int8")
    measured = _int8_gates(bundle, ev, gate_cfg, emit)
    kept = tuple(g for g in int8.gates if g.provider not in (None, gate_cfg.provider))
    before = {g.name for g in int8.gates}
    if new := [g.name for g in measured if not g.is_speed and g.name not in before]:
        # A gate a newer quantgate measures (an embedding's per-token cosine): a failure
        # there is new evidence on the same model, not a changed threshold, and is said so.
        log.warning(
            "the INT8 variant is now also gated on %s, which its last gating did not measure",
            ", ".join(new),
        )
    return _with_int8_gates(bundle.manifest.variants, (*measured, *kept)), bool(kept), new


def _check_labels_kept(m: Manifest, ev: DataSource, where: str, *, allow: bool) -> None:
    """Refuse unlabelled ``ev`` for a bundle whose INT8 was gated on labelled accuracy,
    unless ``allow``: then say, as a warning, which gates stand in."""
    drop = next((g for g in m.variant("int8").gates if g.name.endswith("accuracy_drop")), None)
    if ev.has_labels or drop is None:
        return
    tokens = drop.name.startswith("token")
    agreement = "token_top1_agreement, token_kl" if tokens else "top1_agreement, kl"
    if allow:
        log.warning(
            "%s has no labels: gating INT8 on agreement with FP32 (%s) in place of its "
            "labelled accuracy gate, as --allow-unlabelled asks",
            where, agreement,
        )  # fmt: skip
        return
    how = (
        f"token labels: a .npz array 'labels' of shape (rows, sequence), {NO_LABEL} where a "
        "position has none; JSONL cannot carry them"
        if tokens
        else 'a "label" key on every JSONL line; a "labels" array in a .npz'
    )
    raise DataError(
        f"{where} has no labels, but this bundle's INT8 was gated on labelled accuracy "
        f"({drop.name} <= {drop.threshold:g} points). Without labels that gate would give "
        f"way to agreement with FP32 ({agreement}), which lets far more change: a CI gate "
        f"must not loosen because a label went missing. Label the rows ({how}), or pass "
        "--allow-unlabelled to gate on agreement knowingly."
    )


def _require_variants(m: Manifest, on_cuda: bool) -> None:
    """BundleError unless ``m`` has a variant to re-gate: INT8 on the CPU; on CUDA, FP16 or
    INT8, and ConfigError unless CUDA is there to measure them."""
    from quantgate.quantize import cuda

    if not on_cuda:
        m.variant("int8")  # says which variants it has, and why INT8 may be missing
        return
    if not any(v.precision in ("fp16", "int8") for v in m.variants):
        m.variant("fp16")
    if not cuda.available():
        raise ConfigError(
            f"the gate settings ask for a re-gate on {CUDA}, but this onnxruntime has no "
            "working CUDA provider. Run it on a GPU host with the `gpu` extra installed "
            f"(onnxruntime-gpu), or re-gate on the CPU (`--device cpu`; provider = {CPU!r} in "
            "a --gate-config file)."
        )


def _regate_on_cuda(
    bundle: Bundle, ev: DataSource, gate_cfg: GateConfig, emit: ProgressFn, *, provider: str = CUDA
) -> tuple[tuple[Variant, ...], CudaGating]:
    """The bundle's variants after its FP16 and INT8 are gated on ``provider`` again, as the
    build gates them on a GPU host (``_gate_on_cuda``): their gates measured there before are
    replaced (``cuda.apply_gates``), FP16's new gates decide whether it ships, INT8's only
    whether it runs on CUDA; gates measured on the CPU are kept. Also the new gates, and the
    timings for the report (``_cuda_gates``). The thresholds: FP16's cosine is the one its
    gates were built with; INT8's is ``gate_cfg.min_cosine``, as in the build."""
    from quantgate.quantize import cuda

    m = bundle.manifest
    files = {
        v.precision: bundle.file(v.precision) for v in m.variants if v.precision in ("fp16", "int8")
    }
    gated = _cuda_gates(
        bundle.file("fp32"), files, m.inputs, m.max_seq_len or gate_cfg.seq_len, ev, emit,
        fp16_min_cosine=_fp16_min_cosine(m), gate_cfg=gate_cfg, provider=provider,
    )  # fmt: skip
    variants = tuple(
        cuda.apply_gates(v, gated.gates[v.precision], provider) if v.precision in gated.gates else v
        for v in m.variants
    )
    return variants, gated


def _fp16_min_cosine(m: Manifest) -> float:
    """The cosine threshold the FP16 variant was gated with (``QuantConfig.fp16_min_cosine``
    at its build, recorded in its gates), else today's default."""
    cosines = [
        g.threshold if g.name.startswith("cosine") else cosine_of_r2(g.threshold)
        for v in m.variants
        if v.precision == "fp16"
        for g in v.gates
        if g.name == "cosine" or g.name.startswith(("cosine:", "r2:"))
    ]
    return max(cosines, default=DEFAULT_QUANT.fp16_min_cosine)


# What a bundle's gating stands for, and so what a re-gate keeps from the last one: the
# thresholds, how an interval decides, and the shapes a user serves. How a machine measures
# (provider, threads, iterations, warm-up, resamples, the eval_samples cap) is the re-gate's
# own: a re-gate on CUDA must not make the next one, on a CPU runner, ask for CUDA.
POLICY = (
    "max_accuracy_drop",
    "min_speedup",
    "min_cosine",
    "tail_cosine",
    "max_tail_share",
    "min_top1_agreement",
    "max_kl",
    "ci_rule",
    "confidence",
    "batch_sizes",
    "seq_len",
)


def recorded_gate_config(m: Manifest) -> GateConfig | None:
    """The gate policy (``POLICY``) ``m``'s bundle was last gated with, its newest re-gate's
    else its build's, over the defaults (a setting added since keeps its default); None
    where it recorded none (bundles from before the record)."""
    records = [r.get("gate_config") for r in m.extra.get("regates", []) if isinstance(r, dict)]
    records.insert(0, (m.extra.get("quantization") or {}).get("gate_config"))
    latest = next((r for r in reversed(records) if isinstance(r, dict)), None)
    if latest is None:
        return None
    try:
        return DEFAULT_GATES.with_overrides(**{k: latest[k] for k in POLICY if k in latest})
    except (ConfigError, TypeError) as e:
        raise BundleError(
            f"the gate settings {m.name!r}'s manifest records are not valid ({e}): its "
            "manifest.json was edited or damaged. Fix that gate_config (the newest under "
            "extra.regates, else extra.quantization), or export the model again"
        ) from e


# Thresholds and what makes them looser: a lower minimum, a higher maximum.
_MINIMUMS = ("min_speedup", "min_cosine", "tail_cosine", "min_top1_agreement")
_MAXIMUMS = ("max_accuracy_drop", "max_kl", "max_tail_share")


def _changed_settings(before: GateConfig, after: GateConfig) -> list[tuple[str, bool]]:
    """Each gate policy setting ``after`` changes, as ("name old -> new", looser): looser
    where it lets more through: a lower minimum, a higher maximum, the point estimate for
    the bound, a served batch size no longer timed."""
    changed = []
    for name in POLICY:
        old, new = getattr(before, name), getattr(after, name)
        if old == new:
            continue
        looser = (
            (name in _MINIMUMS and new < old)
            or (name in _MAXIMUMS and new > old)
            or (name == "ci_rule" and new == "point")
            or (name == "batch_sizes" and not set(old) <= set(new))
        )
        changed.append((f"{name} {old} -> {new}", looser))
    return changed


def _int8_gates(
    bundle: Bundle, ev: DataSource, cfg: GateConfig, emit: ProgressFn
) -> tuple[GateResult, ...]:
    """The INT8 variant's accuracy and speed gates against FP32 on the rows of ``ev``,
    measured on ``cfg.provider``."""
    m = bundle.manifest
    fp32, int8 = bundle.file("fp32"), bundle.file("int8")
    emit("search", 0, 1, "evaluating FP32 and INT8")
    reference = collect(fp32, ev, provider=cfg.provider, threads=cfg.threads)
    check_evaluation(reference, m.task)
    got = collect(int8, ev, provider=cfg.provider, threads=cfg.threads)
    accuracy = accuracy_gates(reference, got, m.task, cfg)
    consistency = batch_consistency(int8, ev, m.task, cfg) if m.variant("int8").dynamic else None
    if consistency is not None:
        accuracy.append(consistency)
    sample = next(ev.batches()).feeds
    max_seq = m.max_seq_len or cfg.seq_len
    speed = speed_gates(fp32, int8, m.inputs, max_seq, cfg, sample=sample, on_progress=emit)
    emit("search", 1, 1, "done")
    return (*accuracy, *speed)


def _with_int8_gates(variants: Sequence[Variant], gates: tuple[GateResult, ...]) -> tuple:
    """``variants`` with the INT8 variant's gates (and so its verdict) replaced by ``gates``."""
    return tuple(
        dataclasses.replace(v, gates=gates) if v.precision == "int8" else v for v in variants
    )


def _recorded(m: Manifest, variants: Sequence[Variant], regate: dict[str, Any]) -> Manifest:
    """``m`` with ``variants``, and ``regate`` (when, where, on what data, with what settings)
    recorded with the bundle's new verdict in ``extra["regates"]``."""
    now = dataclasses.replace(m, variants=tuple(variants))
    regates = [*m.extra.get("regates", []), {**regate, "verdict": now.verdict}]
    return dataclasses.replace(now, extra={**m.extra, "regates": regates})


def _measured_on(ev: DataSource) -> str:
    return f"with onnxruntime {_ort_version()} on {ev.description} (sha256 `{ev.sha256[:12]}`)"


def _settings_said(changed: list[tuple[str, bool]] | None) -> str:
    """The sentence of a re-gate's section on the gate settings ``changed`` since the last
    gating (None: the bundle recorded none)."""
    if changed is None:
        return "The bundle recorded no gate settings to compare these with."
    if not changed:
        return "Gate settings: those of the last gating."
    said = (text + (" (looser)" if looser else "") for text, looser in changed)
    return f"Gate settings changed since the last gating: {'; '.join(said)}."


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


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
        "plot": reports.PLOT if plot else None,
    }


def _failure_message(manifest: Manifest, where, search: SearchResult | None = None) -> str:
    """Which gates failed, by how much; and, where the INT8 variant failed, what is likely to
    be the cause: a search stopped before it tried every recipe, a small calibration set."""
    bad = [(v.precision, g) for v in manifest.variants for g in v.gates if not g.passed]
    lines = [
        f"{precision} {g.label} = {g.value:.4g}, required {g.op} {g.threshold:g}"
        + (f" (interval {g.ci[0]:.4g}..{g.ci[1]:.4g})" if g.ci else "")
        for precision, g in bad
    ]
    int8 = [g for precision, g in bad if precision == "int8"]
    # Calibration explains failed accuracy gates of a calibrated (static) INT8 only, and
    # not its batch_* gates, which measure dynamic scaling.
    calibrated = any(v.precision == "int8" and not v.dynamic for v in manifest.variants)
    inaccurate = calibrated and any(
        not g.is_speed and not g.name.startswith("batch_") for g in int8
    )
    causes = [
        *(_did_not_hold(search) if int8 and search is not None else []),
        *(_stopped_early(search) if int8 and search is not None else []),
        *(_few_calibration_rows(manifest) if inaccurate else []),
        *(_longer_than_calibrated(manifest) if inaccurate else []),
        *_thresholds_origin(manifest),
    ]
    return (
        f"{len(bad)} gate(s) failed; the bundle at {where} is written and marked failed "
        "(see its report.md):\n"
        + "\n".join(f"  - {line}" for line in lines)
        + "".join(f"\n{cause}" for cause in causes)
    )


def _did_not_hold(search: SearchResult) -> list[str]:
    """Where candidates passed in the search but not when timed again: their speed is at the
    threshold, within the machine's noise."""
    if search.chosen is not None or not search.retimed:
        return []
    return [
        f"{len(search.retimed)} candidate(s) passed every gate in the search but not when "
        "timed again: "
        + "; ".join(
            f"{c.name} {', '.join(f'{g.name} {g.value:.3g}' for g in c.speed if not g.passed)}"
            for c in search.retimed
        )
        + ". Their speed is at the threshold, within this machine's noise."
    ]


def _stopped_early(search: SearchResult) -> list[str]:
    """What to raise when the search stopped before trying every recipe: one not tried may
    pass (and a time budget stops it sooner on a loaded machine)."""
    if not search.skipped:
        return []
    by_count = search.max_candidates and len(search.candidates) >= search.max_candidates
    raise_it = (
        f"--max-candidates (now {search.max_candidates})"
        if by_count
        else f"--search-budget (now {search.budget_s:g}s; this search took {search.seconds:.0f}s)"
    )
    return [
        f"The search stopped early: {search.stopped}, with {len(search.skipped)} recipe(s) not "
        f"tried ({', '.join(search.skipped)}), and one of them may pass. Raise {raise_it} to try "
        "them."
    ]


def _few_calibration_rows(manifest: Manifest) -> list[str]:
    """The likely cause of failed INT8 accuracy gates where fewer than MIN_CALIBRATION_ROWS
    rows calibrated the model."""
    rows = (manifest.calibration or {}).get("samples")
    if not isinstance(rows, int) or rows >= MIN_CALIBRATION_ROWS:
        return []
    return [
        f"The INT8 model was calibrated on only {rows} row(s), fewer than "
        f"{MIN_CALIBRATION_ROWS}: activation ranges taken from so few rows are noise, a likely "
        "cause of its failed accuracy gates. Calibrate on a few hundred rows like those the "
        "model will serve (--calibration) and export again."
    ]


def _thresholds_origin(manifest: Manifest) -> list[str]:
    """Where the thresholds in force came from, when a re-gate set them (not the build): a
    re-gate keeps the last gating's settings, which a user may have forgotten setting."""
    regates = [r for r in manifest.extra.get("regates") or [] if isinstance(r, dict)]
    build = (manifest.extra.get("quantization") or {}).get("gate_config")

    def policy(config: Any) -> dict:
        return {k: config.get(k) for k in POLICY} if isinstance(config, dict) else {}

    if not regates or policy(regates[-1].get("gate_config")) == policy(build):
        return []
    since = regates[-1]
    for record in reversed(regates[:-1]):
        if policy(record.get("gate_config")) != policy(since.get("gate_config")):
            break
        since = record
    if since is regates[-1]:  # this re-gate's own flags set them: nothing to remind
        return []
    return [
        f"The thresholds are those set by the re-gate of {since.get('at')} (a re-gate keeps "
        "the last gating's; its flags or --gate-config change them)."
    ]


# Evaluation rows this many times longer than the longest calibration row were judged on
# activations the calibration never saw (attention over more positions, later position
# embeddings): say so where the INT8 accuracy gates fail.
LONGER_THAN_CALIBRATED = 2


def _much_longer(cal_longest: int, ev_longest: int) -> bool:
    """Whether evaluation rows run ``LONGER_THAN_CALIBRATED`` times the longest calibrated
    row (the one rule for the build's warning and the failure's likely cause)."""
    return bool(cal_longest) and ev_longest >= LONGER_THAN_CALIBRATED * cal_longest


def _longer_than_calibrated(manifest: Manifest) -> list[str]:
    """A likely cause of failed INT8 accuracy gates: evaluation rows (the newest re-gate's,
    else the build's) much longer than any row the model was calibrated on."""
    cal = manifest.calibration or {}
    regates = manifest.extra.get("regates") or []
    ev = (regates[-1] if regates else cal).get("evaluation") or {}
    try:
        (_, cal_longest), (_, ev_longest) = cal["lengths"], ev["lengths"]
    except (KeyError, TypeError, ValueError):  # an older bundle's record: nothing to compare
        return []
    if not _much_longer(cal_longest, ev_longest):
        return []
    return [
        f"The evaluation rows run to {ev_longest} tokens, the calibration rows only to "
        f"{cal_longest}: the INT8 activation ranges were calibrated on shorter sequences than "
        "it was judged on, a likely cause of its failed accuracy gates. Calibrate on rows of "
        "the lengths the model will serve (--calibration) and export again."
    ]


__all__ = ["build", "regate"]
