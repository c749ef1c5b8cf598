"""The export stage: MODEL spec -> a validated, fused FP32 ONNX model -> a bundle.

Two steps, kept apart so that quantization can run between them::

    result = export_fp32(spec, workdir, cfg=cfg)      # files in workdir, nothing at --out
    ... quantize and gate result.onnx (result.unfused_onnx, .inputs, .task) ...
    bundle = write_bundle(result, out, variants=[...]) # the only step that touches --out

``export(spec, out, cfg=cfg)`` runs both for an FP32-only bundle.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from quantgate import __version__
from quantgate.bundle import Bundle, TensorSpec, check_writable_target, sha256_file
from quantgate.configs import require
from quantgate.errors import ExportError, ValidationError
from quantgate.export.config import ExportConfig, Exporter
from quantgate.export.exporters import opset_of, to_onnx, tracer_advice
from quantgate.export.optimize import OptimizerFailed, fuse, fusion_summary
from quantgate.export.validation import (
    Case,
    TorchOutputs,
    ValidationReport,
    build_cases,
    check_batched,
    check_class_names,
    check_padding,
    check_rows_alone,
    input_specs,
    output_specs,
    reference_outputs,
    validate,
)
from quantgate.fsutil import claimed, raise_if_full, work_dir
from quantgate.model.loaders import LoadedModel, ModelSpec, Samples, load_model
from quantgate.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

# The exporters AUTO tries, best first (see ExportConfig.exporter).
AUTO_ORDER = (Exporter.LEGACY, Exporter.DYNAMO)
DEFAULT_CONFIG = ExportConfig()
TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "transformers", "numpy")

# The steps the "export" task counts (export_fp32's): load, run PyTorch, export, validate,
# fuse, validate the fused graph. Writing the bundle is the "bundle" task (``writing``).
EXPORT_STEPS = 6


@dataclass(frozen=True)
class ExporterRun:
    """What one exporter produced: the file to ship and the evidence for it."""

    onnx: Path  # fused when cfg.optimize, validated either way
    unfused_onnx: Path  # the exporter's own graph, validated too
    validation: ValidationReport  # of ``onnx``
    unfused_validation: ValidationReport  # of ``unfused_onnx``
    fusions: dict[str, int]  # fused op type -> count; empty when not optimized
    tracer_notes: tuple[str, ...] = ()  # constants the tracer fixed in the model's code
    optimizer_failed: str | None = None  # why the graph ships unfused, where the optimizer fell


@dataclass(frozen=True)
class ExportResult:
    """A validated FP32 ONNX model in a workdir, and everything measured on the way.

    The quantize stage reads ``onnx`` (the fused graph; ``unfused_onnx`` for recipes that
    want the exporter's own), compares against ``references`` on ``cases``, and can run
    ``model.module`` (PyTorch FP32) on its own data.
    """

    model: LoadedModel  # the PyTorch side: module, input specs, samples, source
    onnx: Path  # the model to ship
    unfused_onnx: Path
    sha256: str  # of ``onnx`` as validated; the bundle's copy must match it
    inputs: tuple[TensorSpec, ...]  # dims with symbolic "batch" and "sequence"
    outputs: tuple[TensorSpec, ...]
    opset: int
    exporter: Exporter  # the one that produced ``onnx``
    cases: tuple[Case, ...]  # validation shapes, as ONNX Runtime feeds
    references: tuple[TorchOutputs, ...]  # PyTorch's outputs for each case
    validation: ValidationReport  # of ``onnx``
    unfused_validation: ValidationReport  # of ``unfused_onnx``
    fusions: dict[str, int]  # fused op type -> count
    attempts: tuple[str, ...] = ()  # why earlier exporters were passed over (AUTO)
    optimizer_failed: str | None = None  # why ``onnx`` is unfused though cfg.optimize
    # where the legacy tracer fixed values computed from tensors in the model's own code
    tracer_notes: tuple[str, ...] = ()
    tools: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def source(self) -> dict[str, Any]:
        return self.model.source

    @property
    def extra(self) -> dict[str, Any]:
        return self.model.extra

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    @property
    def samples(self) -> Samples:
        return self.model.samples

    def samples_used(self) -> str:
        """Where the validation rows came from, and whether the longest were stretched."""
        longest = max((c.sequence for c in self.cases), default=0)
        if longest <= self.samples.width:
            return self.samples.source
        return (
            f"{self.samples.source}; each row's real tokens repeated to {longest} tokens "
            "(the model's max_seq_len) for the longest and padded shapes"
        )

    def export_record(self) -> dict[str, Any]:
        """The manifest's ``export`` field: how the model was made and what validated it."""
        return {
            "exporter": self.exporter.value,
            "opset": self.opset,
            "max_seq_len": self.max_seq_len,
            # what fills a row past its real length, per input: the server pads batched
            # requests with it (a GPT-2 classifier finds each row's last token by its pad id)
            "pad_values": {i.name: i.pad_value for i in self.model.inputs},
            "optimized": self.onnx != self.unfused_onnx,
            "fusions": self.fusions,
            "fusion_summary": fusion_summary(self.fusions),
            "samples": self.samples_used(),
            "validation": self.validation.to_dict(),
            "unfused_validation": self.unfused_validation.to_dict(),
            "attempts": list(self.attempts),
            "tracer_notes": list(self.tracer_notes),
            "optimizer_failed": self.optimizer_failed,
            "seconds": round(self.seconds, 1),
        }


def export(
    model_spec: ModelSpec,
    out: str | Path,
    *,
    cfg: ExportConfig = DEFAULT_CONFIG,
    force: bool = False,
    on_progress: ProgressFn | None = None,
) -> Bundle:
    """Export ``model_spec`` to a validated FP32 bundle at ``out`` (atomically).

    ``out`` may be missing, empty or a bundle of the same model; any other directory, or a
    bundle of another model, is refused unless ``force``. "The same model" is where it comes
    from (``bundle.model_identity``: a checkpoint's or factory file's resolved path, a
    ``module:function``, a Python object's class), not its weights: a model trained again
    replaces its bundle, and so does another object of the same class. On any failure
    ``out`` is left as it was and no temporary files remain.
    """
    from quantgate.export.writer import write_bundle

    require(cfg, ExportConfig, "cfg")
    on_progress = on_progress or no_progress
    out = Path(out).absolute()
    # before minutes of work, not after
    check_writable_target(out, force=force, inputs=[("model", model_spec)])
    with (
        claimed(out, "an export", create=True),
        work_dir("quantgate-export-") as work,
    ):
        result = export_fp32(model_spec, Path(work), cfg=cfg, on_progress=on_progress)
        with writing(on_progress):
            bundle = write_bundle(result, out, name=cfg.name, force=force)
    return bundle


@contextlib.contextmanager
def writing(on_progress: ProgressFn) -> Iterator[None]:
    """The bundle's writing as the progress task "bundle" (its tokenizer checked, files
    hashed, the directory swapped in): a step of its own, after the export's, or after a
    search's."""
    log.info("writing the bundle")
    on_progress("bundle", 0, 1, "writing")
    yield
    on_progress("bundle", 1, 1, "written")


def load(model_spec: ModelSpec, cfg: ExportConfig = DEFAULT_CONFIG) -> LoadedModel:
    """The model ``model_spec`` names, loaded as ``cfg`` asks (task, longest sequence)."""
    return load_model(model_spec, task=cfg.task, max_seq_len=cfg.max_seq_len)


def export_fp32(
    model_spec: ModelSpec | LoadedModel,
    workdir: Path,
    *,
    cfg: ExportConfig = DEFAULT_CONFIG,
    on_progress: ProgressFn | None = None,
) -> ExportResult:
    """Load (unless ``model_spec`` is loaded already, by ``load``), export, validate, fuse and
    validate again; the files stay in ``workdir`` (created when missing)."""
    require(cfg, ExportConfig, "cfg")
    stage = _Steps(on_progress or no_progress)
    t0 = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(model_spec, LoadedModel):
        model = model_spec
    else:
        stage("loading the model", 0)
        model = load(model_spec, cfg)
    stage("running PyTorch on the samples", 1)
    cases = tuple(build_cases(model, mid_batch=cfg.mid_batch))
    refs = tuple(reference_outputs(model, cases))
    outputs = output_specs(model.outputs, cases, refs)
    check_batched(outputs)
    check_rows_alone(model, cases, refs)
    check_class_names(model, outputs)
    check_padding(model, cases, refs, outputs, atol=cfg.atol, rtol=cfg.rtol)  # before any export

    order = AUTO_ORDER if cfg.exporter is Exporter.AUTO else (cfg.exporter,)
    attempts: list[str] = []
    errors: list[ExportError] = []
    # a validated graph ONNX Runtime's optimizer failed on: it ships, unfused, only where no
    # later exporter's graph validates fused
    unfused: tuple[Exporter, ExporterRun] | None = None

    def result(exporter: Exporter, made: ExporterRun) -> ExportResult:
        if made.optimizer_failed:
            log.warning(
                "%s. The bundle keeps %s's own graph, unfused (validated): ONNX Runtime runs "
                "it without its fused attention and layer-norm kernels.",
                made.optimizer_failed,
                exporter.value,
            )
        return ExportResult(
            model=model,
            onnx=made.onnx,
            unfused_onnx=made.unfused_onnx,
            sha256=sha256_file(made.onnx),
            inputs=input_specs(model),
            outputs=outputs,
            opset=opset_of(made.onnx),
            exporter=exporter,
            cases=cases,
            references=refs,
            validation=made.validation,
            unfused_validation=made.unfused_validation,
            fusions=made.fusions,
            attempts=tuple(attempts),
            tracer_notes=made.tracer_notes,
            optimizer_failed=made.optimizer_failed,
            tools=tool_versions(),
            seconds=time.perf_counter() - t0,
        )

    for exporter in order:
        try:
            made = _export_one(model, workdir, exporter, cases, refs, outputs, cfg, stage)
        except ExportError as e:  # ValidationError included: the next exporter may do better
            # ...but not on a full disk: say so, and do not spend minutes
            raise_if_full(e, workdir, f"the export ({exporter.value})")
            log.info("%s exporter: %s", exporter.value, e)
            # the whole reason, on one line: its first line alone may say only "names differ"
            attempts.append(f"{exporter.value}: {_one_line(str(e), 400)}")
            errors.append(e)
            continue
        if made.optimizer_failed:  # the next exporter's graph may fuse
            unfused = unfused or (exporter, made)
            continue
        if unfused is not None:
            attempts.append(f"{unfused[0].value}: {unfused[1].optimizer_failed}")
        stage("validated", EXPORT_STEPS)
        return result(exporter, made)
    if unfused is not None:
        stage("validated", EXPORT_STEPS)
        return result(*unfused)
    raise _combine(errors, order)


def _one_line(text: str, limit: int) -> str:
    """``text``'s lines joined by "; ", cut at ``limit`` characters."""
    joined = "; ".join(line.strip(" -") for line in text.splitlines() if line.strip())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def _export_one(
    model: LoadedModel,
    workdir: Path,
    exporter: Exporter,
    cases: tuple[Case, ...],
    refs: tuple[TorchOutputs, ...],
    outputs: tuple[TensorSpec, ...],
    cfg: ExportConfig,
    stage: _Steps,
) -> ExporterRun:
    check = functools.partial(
        validate, inputs=model.input_names, outputs=model.outputs, atol=cfg.atol, rtol=cfg.rtol
    )
    raw = workdir / f"{exporter.value}-export.onnx"
    stage(f"exporting ({exporter.value})", 2)
    example = cases[1]  # the middle batch: neither dim is 1, which tracers would specialise
    notes = to_onnx(
        model, raw, exporter=exporter, example=example, outputs=outputs, opset=cfg.opset
    )
    stage(f"validating at {len(cases)} shapes", 3)
    # under --exporter auto the dynamo exporter is tried next where this one fails
    with _explained(notes, dynamo_next=cfg.exporter is Exporter.AUTO):
        raw_report = check(raw, cases, refs)
    if notes:  # validated, yet only at these shapes and rows: the user should know where
        log.warning(
            "%s It validated at %d shapes up to %d tokens, which is all that was checked.",
            tracer_advice(notes),
            len(cases),
            max(c.sequence for c in cases),
        )
    if not cfg.optimize:
        return ExporterRun(raw, raw, raw_report, raw_report, {}, notes)
    fused_path = workdir / f"{exporter.value}-fused.onnx"
    stage("fusing (ONNX Runtime transformer optimizer)", 4)
    try:
        fusions = fuse(raw, fused_path, num_heads=model.num_heads, hidden_size=model.hidden_size)
    except OptimizerFailed as e:  # a fusion is a speed-up: the exporter's graph is validated
        log.info("%s exporter: %s", exporter.value, e)
        return ExporterRun(raw, raw, raw_report, raw_report, {}, notes, optimizer_failed=str(e))
    stage("validating the fused graph", 5)
    fused_report = check(fused_path, cases, refs)
    return ExporterRun(fused_path, raw, fused_report, raw_report, fusions, notes)


@contextlib.contextmanager
def _explained(notes: tuple[str, ...], *, dynamo_next: bool) -> Iterator[None]:
    """A validation failure of a graph whose tracer fixed Python values names those places
    first: they are the likely cause (a branch or a length taken from the example batch).
    ``dynamo_next``: the dynamo exporter is tried next, and not to be suggested."""
    try:
        yield
    except ValidationError as e:
        if not notes:
            raise
        raise ValidationError(
            f"{e.summary.rstrip('.')}. Likely cause: the tracer fixed values computed from "
            f"tensors at {notes[0]}",
            [*e.failures, tracer_advice(notes, dynamo_untried=not dynamo_next)],
        ) from e


def _combine(errors: list[ExportError], order: tuple[Exporter, ...]) -> ExportError:
    """One error for every exporter tried; a validation failure outranks an export failure."""
    if len(errors) == 1:
        return errors[0]
    failures = [  # each exporter's own summary, then its failures
        f"{exporter.value}: {line}"
        for exporter, e in zip(order, errors, strict=True)
        for line in ([e.summary, *e.failures] if isinstance(e, ValidationError) else [str(e)])
    ]
    tried = ", ".join(e.value for e in order)
    if any(isinstance(e, ValidationError) for e in errors):
        return ValidationError(
            f"no exporter produced a model that validates (tried {tried})", failures
        )
    return ExportError(f"every exporter failed (tried {tried}):\n" + "\n".join(failures))


def tool_versions() -> dict[str, str]:
    versions = {"quantgate": __version__, "python": platform.python_version()}
    for pkg in TOOLS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return versions


class _Steps:
    """The "export" task's progress, ``stage(what, step)`` of EXPORT_STEPS, counted only
    forward: an exporter tried after another failed goes through steps 3 to 6 again, and
    these are counted as steps added to the total, not as the count going back."""

    def __init__(self, on_progress: ProgressFn):
        self._on_progress = on_progress
        self._added = 0  # steps the failed exporters took
        self._last = -1

    def __call__(self, what: str, step: int) -> None:
        done = step + self._added
        if done <= self._last:
            self._added += self._last + 1 - done
            done = self._last + 1
        self._last = done
        log.info("%s", what)
        self._on_progress("export", done, EXPORT_STEPS + self._added, what)
