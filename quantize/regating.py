"""Re-gating a bundle: its gates measured again on new evaluation data (for example in CI
after an ONNX Runtime upgrade), its manifest and report rewritten atomically.

On the CPU, the INT8 variant's accuracy and speed gates replace those measured there
before; on CUDA, every variant's gates there, by the build's rule (``cuda.gate_built``).
A re-gate keeps the thresholds the bundle was last gated with (``recorded_gate_config``),
warns about a looser one and names it in the report, warns on every run whose settings are
looser than the export's (``exported_gate_config``), says which gates were redefined
since the last gating (``recorded_definitions``), refuses evaluation rows the
calibration saw (``heldout.check_held_out``) and unlabelled rows for a bundle any gating of
which was on labelled accuracy, and raises ``GateFailed`` (after rewriting) unless the
bundle then passes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from quantgate import __version__, onnxfiles
from quantgate.bundle import (
    Bundle,
    GateResult,
    Manifest,
    Variant,
    check_files,
    check_writable_target,
    load,
    rewrite,
    unlisted_weights,
)
from quantgate.configs import require
from quantgate.errors import BundleError, ConfigError, DataError
from quantgate.fsutil import claimed, gone_cwd
from quantgate.progress import ProgressFn, no_progress
from quantgate.quantize import cuda
from quantgate.quantize import report as reports
from quantgate.quantize.cuda import CUDA, CudaGating
from quantgate.quantize.data import (
    DataSource,
    DataSpec,
    ModelInfo,
    check_not_calibration,
    check_same_texts,
    named,
    open_source,
    with_graph_tables,
)
from quantgate.quantize.decide import GATE_DEFINITIONS, GateConfig, definition_changes
from quantgate.quantize.fidelity import cosine_of_r2
from quantgate.quantize.gates import (
    accuracy_gates,
    batch_consistency,
    check_eval_rows,
    check_evaluation,
    collect,
    unread_answer_rule,
)
from quantgate.quantize.heldout import Fingerprint, check_held_out, distinct_rows
from quantgate.quantize.labels import NO_LABEL
from quantgate.quantize.search import QuantConfig
from quantgate.quantize.speed import speed_gates, speed_shapes
from quantgate.quantize.verdict import POLICY, passed_bundle
from quantgate.tasks import CLASSIFIER_TASKS, TOKEN_TASKS

log = logging.getLogger(__name__)

DEFAULT_GATES = GateConfig()


def regate(
    bundle_path: str | Path,
    evaluation: DataSpec | None = None,
    gate_cfg: GateConfig | None = None,
    *,
    gate_file: str | Path | None = None,
    overrides: Mapping[str, Any] = MappingProxyType({}),
    provider: str | None = None,
    on_progress: ProgressFn | None = None,
    allow_unlabelled: bool = False,
) -> Bundle:
    """Re-run a bundle's gates on ``gate_cfg.provider`` on ``evaluation``; rewrite its
    manifest and report atomically.

    A bundle gated on labelled accuracy (by its export, or by any re-gate it records) is
    refused unlabelled evaluation data (a DataError, before anything is measured): the
    agreement gates that would stand in let far more rows change, and a misnamed label key
    would turn a CI gate green. ``allow_unlabelled`` gates it on agreement with FP32
    knowingly, for this call only: the next without it is refused again.

    On the CPU: the INT8 variant's accuracy and speed gates, which replace its gates measured
    there; its gates on CUDA are kept. On CUDA: every variant's CUDA gates, by the build's rule
    (``_regate_on_cuda``); the gates measured on the CPU are kept.

    The settings: ``gate_cfg``, by default those the bundle was last gated with
    (``recorded_gate_config``); then a ``gate_file``'s (TOML or JSON, as ``--gate-config``
    reads it), then ``overrides`` (GateConfig fields; None leaves one as it is), then
    ``provider``. A re-gate keeps the bundle's thresholds unless told otherwise, and a
    loosened threshold is warned about and named in the report; so, on every re-gate, is a
    setting looser than the export's (``exported_gate_config``). In
    report.md the re-gate comes first, and the sections it replaces are kept, marked
    superseded (``report.regated``). Raises ``GateFailed`` (after rewriting) unless the
    bundle then passes: every gate of every variant.

    One process at a time reads, re-gates and rewrites a bundle (``fsutil.claimed``): a
    second re-gate or an export to it meanwhile is refused (``Busy``).
    """
    if gate_cfg is not None:
        require(gate_cfg, GateConfig, "gate_cfg")
    # by its path from the root: the rewrite puts a new directory at that path, and a
    # relative one (`quantgate gate .` from inside it) would then name the old one, removed
    if gone := gone_cwd(bundle_path):  # the shell's directory was a bundle a rewrite replaced
        raise BundleError(gone)
    bundle_path = Path(bundle_path).absolute()
    # held from the read of the settings to the rewrite: another re-gate in between would
    # have this one start from settings it then replaced
    with claimed(bundle_path, "a re-gate"):
        bundle = load(bundle_path, verify=False)  # the settings first: cheap, then the files
        recorded = recorded_gate_config(bundle.manifest)
        base = gate_cfg or recorded or DEFAULT_GATES
        if gate_file is not None:
            settings = GateConfig.from_file(gate_file, base, **overrides)
        else:
            settings = base.with_overrides(**overrides)
        if provider is not None:
            settings = settings.with_overrides(provider=provider)
        settings = unread_answer_rule(bundle.manifest.task, settings)
        check_files(bundle)  # every file's sha256
        check_weights_listed(bundle)
        return _regate(bundle, evaluation, settings, recorded, on_progress, allow_unlabelled)


def check_weights_listed(bundle: Bundle) -> None:
    """BundleError where a variant keeps weights in a file the manifest does not list (and
    so does not hash): the gates would measure what no sha256 vouches for."""
    for v in bundle.manifest.variants:
        try:
            locations = onnxfiles.external_locations(bundle.path / v.file)
        except Exception:  # noqa: BLE001 - no model to read: what opens it says what is wrong
            continue
        if said := unlisted_weights(bundle.manifest, v, locations):
            raise BundleError(f"bundle {bundle.path}: {said}")


def _regate(
    bundle: Bundle,
    evaluation: DataSpec | None,
    gate_cfg: GateConfig,
    recorded: GateConfig | None,
    on_progress: ProgressFn | None,
    allow_unlabelled: bool,
) -> Bundle:
    # read-only: refused before the measuring (a re-gate keeps the files it does not list)
    check_writable_target(
        bundle.path,
        force=False,
        carries_others=True,
        mount_ok=True,
        elsewhere=(
            "re-gate a copy of it in a place you can write "
            f"(cp -r {bundle.path} COPY, then quantgate gate COPY)"
        ),
    )
    m = bundle.manifest
    on_cuda = gate_cfg.provider == CUDA
    _require_variants(m, on_cuda)  # before minutes of reading and measuring

    def timed(cfg: GateConfig) -> int:  # the sequence length the speed gates time at
        return speed_shapes(m.inputs, m.max_seq_len or cfg.seq_len, cfg)[0][1]

    changed = _changed_settings(recorded, gate_cfg, timed_seq=timed) if recorded else None
    loosened = [text for text, looser in changed or () if looser]
    if loosened:
        log.warning(
            "re-gating with looser settings than the bundle was last gated with: %s",
            "; ".join(loosened),
        )
    # and against the export's, on every run: a loosened threshold that a later plain re-gate
    # keeps (it keeps the last gating's) is still named, not inherited in silence
    exported = exported_gate_config(m)
    beyond = _looser_than(exported, gate_cfg, timed) if exported else []
    if unsaid := [text for text in beyond if text not in loosened]:
        log.warning("re-gating with settings looser than the export's: %s", "; ".join(unsaid))
    # the same settings can decide otherwise where the gates were redefined since
    since = recorded_definitions(m)
    if redefined := definition_changes(since, m.task):
        log.warning(
            "the gates were redefined since this bundle was last gated (%s), so its verdict "
            "can change with the same settings and data: %s",
            _definitions_said(since),
            "; ".join(redefined),
        )
    elif since is not None and since > GATE_DEFINITIONS:
        log.warning(
            "this bundle was last gated by a newer quantgate (gate definitions %d; this one's "
            "are %d): its gates are measured again as this quantgate defines them",
            since,
            GATE_DEFINITIONS,
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
    check_same_texts(ev, m.calibration, where, calibrated_on)
    ev = distinct_rows(ev, info, where=where)
    ev = check_held_out(ev, fingerprint, model=info, where=where, calibrated_on=calibrated_on)
    waived = None if on_cuda else _check_labels_kept(m, ev, where, allow=allow_unlabelled)
    emit = on_progress or no_progress
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    measured = _measured_otherwise(_last_gating(m), gate_cfg)
    settings_said = _settings_said(changed, beyond, since, m.task, measured)
    said = (_measured_on(ev), f"{waived} {settings_said}" if waived else settings_said)
    record = {
        "at": when,
        "provider": gate_cfg.provider,
        "evaluation": ev.record(),
        "gate_config": dataclasses.asdict(gate_cfg),
        "gate_definitions": GATE_DEFINITIONS,
        # what measured it: the manifest's own tools are the export's
        "tools": {"quantgate": __version__, "onnxruntime": _ort_version()},
    }
    if on_cuda:
        variants, gated = _regate_on_cuda(bundle, ev, gate_cfg, emit)
        manifest = _recorded(m, variants, record)
        section = reports.cuda_regated(manifest, when, *said, gated, gate_cfg.confidence)
    else:
        check_eval_rows(ev, m.task, [o.name for o in m.outputs], gate_cfg.eval_samples, where=where)
        variants, kept, new = _regate_int8(bundle, ev, gate_cfg, emit)
        manifest = _recorded(m, variants, record)
        section = reports.regate_section(manifest, when, gate_cfg, *said, kept=kept, new=new)
    old = bundle.report.read_text() if bundle.report.is_file() else ""
    report = reports.regated(old, section, manifest, when, provider=gate_cfg.provider)
    rewrite(bundle, manifest, report)
    return passed_bundle(bundle.path, verify=False)


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


def _check_labels_kept(m: Manifest, ev: DataSource, where: str, *, allow: bool) -> str | None:
    """Refuse unlabelled ``ev`` for a bundle whose INT8 was gated on labelled accuracy,
    unless ``allow``: then say, as a warning, which gates stand in, and return the sentence
    that says so in report.md (the waiver is the run's, written down)."""
    drop = _labelled_accuracy(m)
    if ev.has_labels or drop is None:
        return None
    gate, threshold = drop
    tokens = gate.startswith("token")
    agreement = "token_top1_agreement, token_kl" if tokens else "top1_agreement, kl"
    if allow:
        log.warning(
            "%s has no labels: gating INT8 on agreement with FP32 (%s) in place of its "
            "labelled accuracy gate (%s <= %g points), as --allow-unlabelled asks",
            where, agreement, gate, threshold,
        )  # fmt: skip
        return (
            f"Run with --allow-unlabelled: the evaluation rows have no labels, so INT8 was "
            f"gated on agreement with FP32 ({agreement}) in place of its labelled accuracy "
            f"gate ({gate} <= {threshold:g} points)."
        )
    how = (
        f"token labels: a .npz array 'labels' of shape (rows, sequence), {NO_LABEL} where a "
        "position has none; text files cannot carry them"
        if tokens
        else 'a "label" key on every JSONL line, a "label" column in a CSV or TSV; a "labels" '
        "array in a .npz"
    )
    raise DataError(
        f"{where} has no labels, but this bundle's INT8 was gated on labelled accuracy "
        f"({gate} <= {threshold:g} points). Without labels that gate would give "
        f"way to agreement with FP32 ({agreement}), which lets far more change: a CI gate "
        f"must not loosen because a label went missing. Label the rows ({how}), or pass "
        "--allow-unlabelled to gate on agreement knowingly."
    )


def _labelled_accuracy(m: Manifest) -> tuple[str, float] | None:
    """The labelled accuracy gate ``m``'s INT8 was last gated on (its name and threshold),
    by any gating its manifest records, else None: its gates now; else the newest re-gate
    on the CPU on labelled rows; else its export's (the shipped candidate's gates, else its
    labelled evaluation rows).

    Its gates now alone would not do: a re-gate with ``allow_unlabelled`` replaces the
    accuracy gate with agreement ones, and the next re-gate would then take unlabelled rows
    without being asked."""
    drop = next((g for g in m.variant("int8").gates if g.name.endswith("accuracy_drop")), None)
    if drop is not None:
        return drop.name, drop.threshold
    name = "token_accuracy_drop" if m.task in TOKEN_TASKS else "accuracy_drop"
    labelled_task = m.task in (*CLASSIFIER_TASKS, *TOKEN_TASKS)

    def gate(name: str, config: Any) -> tuple[str, float]:
        limit = config.get("max_accuracy_drop") if isinstance(config, dict) else None
        if not isinstance(limit, (int, float)) or isinstance(limit, bool):
            limit = DEFAULT_GATES.max_accuracy_drop
        return name, float(limit)

    for r in reversed(m.extra.get("regates") or []):
        if not isinstance(r, dict) or r.get("provider") == CUDA:  # CUDA's gates: fidelity only
            continue
        labelled = (r.get("evaluation") or {}).get("labels") is True
        if labelled and labelled_task:
            return gate(name, r.get("gate_config"))
    quant = m.extra.get("quantization") or {}
    if not isinstance(quant, dict):
        return None
    candidates = [c for c in quant.get("candidates") or [] if isinstance(c, dict)]
    shipped = [c for c in candidates if c.get("name") == quant.get("shipped")] or candidates
    for c in shipped:
        accuracy = c.get("accuracy")
        drops = [k for k in accuracy or {} if str(k).endswith("accuracy_drop")]
        if isinstance(accuracy, dict) and drops:
            return gate(drops[0], quant.get("gate_config"))
    evaluated = ((m.calibration or {}).get("evaluation") or {}).get("labels") is True
    if evaluated and labelled_task:
        return gate(name, quant.get("gate_config"))
    return None


def _require_variants(m: Manifest, on_cuda: bool) -> None:
    """BundleError unless ``m`` has a variant to re-gate: INT8 on the CPU; on CUDA, FP16 or
    INT8, and ConfigError unless CUDA is there to measure them."""
    if not on_cuda:
        m.variant("int8")  # says which variants it has, and why INT8 may be missing
        return
    if not any(v.precision in ("fp16", "int8") for v in m.variants):
        m.variant("fp16")
    if not cuda.available():
        raise ConfigError(
            f"the gate settings ask for a re-gate on {CUDA}, but this onnxruntime has no "
            "working CUDA provider. Run it on a GPU host with the `gpu` extra installed "
            f'(onnxruntime-gpu), or re-gate on the CPU (`--device cpu`; provider = "cpu" in '
            "a --gate-config file)."
        )


def _regate_on_cuda(
    bundle: Bundle, ev: DataSource, gate_cfg: GateConfig, emit: ProgressFn, *, provider: str = CUDA
) -> tuple[tuple[Variant, ...], CudaGating]:
    """The bundle's variants after its FP16 and INT8 are gated on ``provider`` again, as the
    build gates them on a GPU host (``cuda.gate_built``): their gates measured there before are
    replaced (``cuda.apply_gates``), FP16's new gates decide whether it ships, INT8's only
    whether it runs on CUDA; gates measured on the CPU are kept. Also the new gates, and the
    timings for the report (``cuda.gate_every_variant``). The thresholds: FP16's cosine is the one its
    gates were built with; INT8's is ``gate_cfg.min_cosine``, as in the build."""
    m = bundle.manifest
    files = {
        v.precision: bundle.file(v.precision) for v in m.variants if v.precision in ("fp16", "int8")
    }
    gated = cuda.gate_every_variant(
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
    return max(cosines, default=QuantConfig().fp16_min_cosine)


def recorded_gate_config(m: Manifest) -> GateConfig | None:
    """The gate policy (``POLICY``) ``m``'s bundle was last gated with, its newest re-gate's
    else its build's, over the defaults (a setting added since keeps its default); None
    where it recorded none (bundles from before the record)."""
    latest = _last_gating(m)
    where = "the newest under extra.regates, else extra.quantization"
    return None if latest is None else _policy(m, latest["gate_config"], where)


def recorded_definitions(m: Manifest) -> int | None:
    """The version of the gates' definitions (``GATE_DEFINITIONS``) ``m``'s bundle was last
    gated under; None where that gating recorded none (before versions were recorded)."""
    version = (_last_gating(m) or {}).get("gate_definitions")
    valid = isinstance(version, int) and not isinstance(version, bool) and version >= 1
    return version if valid else None


def _last_gating(m: Manifest) -> dict[str, Any] | None:
    """The record of the last gating with settings: the newest re-gate's, else the build's."""
    records = [r for r in m.extra.get("regates", []) if isinstance(r, dict)]
    records.insert(0, m.extra.get("quantization") or {})
    return next((r for r in reversed(records) if isinstance(r.get("gate_config"), dict)), None)


def exported_gate_config(m: Manifest) -> GateConfig | None:
    """The gate policy ``m``'s bundle was exported with (its build's record, over the
    defaults), which every re-gate is compared with; None where it recorded none."""
    build = (m.extra.get("quantization") or {}).get("gate_config")
    return _policy(m, build, "extra.quantization") if isinstance(build, dict) else None


def _policy(m: Manifest, record: dict[str, Any], where: str) -> GateConfig:
    try:
        return DEFAULT_GATES.with_overrides(**{k: record[k] for k in POLICY if k in record})
    except (ConfigError, TypeError) as e:
        raise BundleError(
            f"the gate settings {m.name!r}'s manifest records are not valid ({e}): its "
            f"manifest.json was edited or damaged. Fix that gate_config ({where}), or export "
            "the model again"
        ) from e


# How a question answerer's answers are read: any change judges other answers than before,
# as loose as a dropped threshold (a span gate that failed can pass by reading shorter ones).
_ANSWER_RULE = ("max_answer_tokens", "null_answer")
# Thresholds and what makes them looser: a lower minimum, a higher maximum.
_MINIMUMS = ("min_speedup", "min_cosine", "tail_cosine", "min_top1_agreement")
_MAXIMUMS = ("max_accuracy_drop", "max_kl", "max_tail_share")


def _changed_settings(
    before: GateConfig, after: GateConfig, *, timed_seq: Callable[[GateConfig], int] | None = None
) -> list[tuple[str, bool]]:
    """Each gate policy setting ``after`` changes, as ("name old -> new", looser): looser
    where it lets more through: a lower minimum, a higher maximum, the point estimate for
    the bound, a lower confidence where the bound decides (``ci_rule`` "upper", before and
    after), a shape timed before and no longer: a served batch size dropped, or a different
    sequence length, shorter or longer (``timed_seq``: the length a config times at, the
    model's cap applied; without it, ``seq_len`` itself).

    Under ``ci_rule`` "point" the confidence decides no verdict, and is said so; a
    ``seq_len`` that still times the same shape (both at or above the model's longest) is
    not looser, and is said so too."""
    changed = []
    for name in POLICY:
        old, new = getattr(before, name), getattr(after, name)
        if old == new:
            continue
        text = f"{name} {old} -> {new}"
        looser = (
            (name in _MINIMUMS and new < old)
            or (name in _MAXIMUMS and new > old)
            or (name == "ci_rule" and new == "point")
            or (name == "batch_sizes" and not set(old) <= set(new))
            # answers read by another rule: the agreement measured is not the one before
            or name in _ANSWER_RULE
        )
        if name == "confidence" and after.ci_rule == "point":
            text += " (decides no verdict under ci_rule 'point')"
        elif name == "confidence":
            # a bound at a lower confidence sits nearer the estimate; from "point" to
            # "upper", any bound is stricter than the estimate it replaces
            looser = before.ci_rule == "upper" and new < old
        elif name in _ANSWER_RULE:
            text += " (answers read by another rule)"
        elif name == "seq_len":
            was, now = (timed_seq(before), timed_seq(after)) if timed_seq else (old, new)
            # the shapes timed before are no longer timed, as with a dropped batch size:
            # a speedup is no more assured at another length than at another batch size
            looser = was != now
            text += " (a different shape)" if looser else f" (timed at {now} either way)"
        changed.append((text, looser))
    return changed


# How a machine measures: a re-gate's own (verdict.POLICY), each said where it differs from
# the last gating's, since a verdict measured on 4 timed pairs is thinner than one on 16.
_MEASURING = ("provider", "threads", "warmup", "iterations", "bootstrap", "eval_samples", "seed")


def _measured_otherwise(last: dict[str, Any] | None, after: GateConfig) -> list[str]:
    """Each way ``after`` measures that ``last``, the last gating's record, did not:
    "iterations 21 -> 3" (a setting it did not record, nothing)."""
    before = (last or {}).get("gate_config") or {}
    return [
        f"{name} {before[name]} -> {getattr(after, name)}"
        for name in _MEASURING
        if name in before and before[name] != getattr(after, name)
    ]


def _looser_than(
    before: GateConfig, after: GateConfig, timed_seq: Callable[[GateConfig], int] | None = None
) -> list[str]:
    """The settings of ``after`` looser than ``before``'s, as "name old -> new"."""
    return [
        text for text, looser in _changed_settings(before, after, timed_seq=timed_seq) if looser
    ]


def _int8_gates(
    bundle: Bundle, ev: DataSource, cfg: GateConfig, emit: ProgressFn
) -> tuple[GateResult, ...]:
    """The INT8 variant's accuracy and speed gates against FP32 on the rows of ``ev``,
    measured on ``cfg.provider``."""
    m = bundle.manifest
    fp32, int8 = bundle.file("fp32"), bundle.file("int8")
    emit("gate", 0, 1, "evaluating FP32 and INT8")
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
    emit("gate", 1, 1, "done")
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


def _settings_said(
    changed: list[tuple[str, bool]] | None,
    beyond: Sequence[str] = (),
    since: int | None = None,
    task: str | None = None,
    measured: Sequence[str] = (),
) -> str:
    """The sentences of a re-gate's section on the gate settings ``changed`` since the last
    gating (None: the bundle recorded none), on those ``beyond`` the export's: looser than
    its settings, however many re-gates ago they were loosened; on the gates' definitions
    changed since version ``since``, the last gating's, for a model of ``task``; and on how
    this gating ``measured`` otherwise than the last (``_measured_otherwise``)."""
    if changed is None:
        said = "The bundle recorded no gate settings to compare these with."
    elif not changed:
        said = "Thresholds and rules: those of the last gating."
    else:
        listed = (text + (" (looser)" if looser else "") for text, looser in changed)
        said = f"Thresholds and rules changed since the last gating: {'; '.join(listed)}."
    if measured:
        said += f" Measured otherwise than the last gating: {'; '.join(measured)}."
    if beyond:
        said += f" Looser than the export's: {'; '.join(beyond)}."
    if redefined := definition_changes(since, task):
        said += (
            f" The gates were redefined since the last gating ({_definitions_said(since)}): "
            f"{'; '.join(redefined)}."
        )
    return said


def _definitions_said(since: int | None) -> str:
    under = "a version it did not record" if since is None else f"version {since}"
    return f"under the gates' definitions {under}; this quantgate's are version {GATE_DEFINITIONS}"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


__all__ = ["exported_gate_config", "recorded_definitions", "recorded_gate_config", "regate"]
