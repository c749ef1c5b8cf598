"""ONNX Runtime's own quantizers as recipes: static QDQ, static QOperator, dynamic.

These are the standard tools as a user would call them, kept for comparison and as search
candidates. Calibration memory is bounded: ORT's calibrators keep every intermediate output
of the feeds given to one ``collect_data`` call, so the reader is handed over in strides of
at most ``MAX_STRIDE`` feeds (``CalibStridedMinMax``); after each stride MinMax merges its
ranges and Entropy/Percentile their fixed-size histograms.

Not ``CalibMaxIntermediateOutputs``: in ORT 1.32 ``MinMaxCalibrater.collect_data`` *clears*
the collected outputs when that count is reached without reducing them first, so only the
last partial chunk of the calibration set would set the ranges.

If ``recipe.smooth_percentile`` is set, the FP32 model is first rewritten with the same
exact smoothing as quantgate's own graph (``graph.py``), then handed to ORT.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto

from quantgate import cpus, onnxfiles
from quantgate.errors import DataError, QuantizeError
from quantgate.quantize import graph
from quantgate.quantize.recipes import Calibration, Recipe

log = logging.getLogger(__name__)


class _NoPreprocessAdvice(logging.Filter):
    """ORT's quantizers log "Please consider (to run) pre-processing" on the root logger
    for every model that was not passed through quant_pre_process. quantgate quantizes
    ORT-fused graphs on purpose (pre-processing would undo the fusions), so the advice is
    noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")


@contextlib.contextmanager
def _without_preprocess_advice() -> Iterator[None]:
    """While ORT quantizes: its root-logger advice is filtered, and its sessions' warnings
    are not printed (``_StandIn``), and only then. ORT logs the advice
    with ``logging.warning``, which configures the root logger (``basicConfig``: a stderr
    handler) where it has no handler yet: a program embedding quantgate then found its own
    ``basicConfig`` doing nothing. A handler that drops everything stands in meanwhile, from
    the first of the builds quantizing at once in a process to the last."""
    advice, root = _NoPreprocessAdvice(), logging.getLogger()
    root.addFilter(advice)
    try:
        with _STAND_IN:
            yield
    finally:
        root.removeFilter(advice)


class _StandIn:
    """A root handler that drops everything, there (where the root has none) from the first
    of the quantizations running at once in a process to the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._handler = logging.NullHandler()

    def __enter__(self) -> None:
        with self._lock:
            self._users += 1
            root = logging.getLogger()
            if self._users == 1 and not root.handlers:
                root.addHandler(self._handler)
            if self._users == 1:  # the sessions ORT's calibrators open take its default
                # severity: their warnings ("Removing initializer ... not used") went to the
                # console in colour, among quantgate's lines. Errors still show.
                _ort_logs(ERRORS_ONLY)

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self._users -= 1
            if not self._users:
                logging.getLogger().removeHandler(self._handler)
                _ort_logs(ORT_DEFAULT)


# ONNX Runtime's log severities: 2 (warnings) is its default, 3 errors only
ORT_DEFAULT, ERRORS_ONLY = 2, 3


def _ort_logs(severity: int) -> None:
    import onnxruntime

    onnxruntime.set_default_logger_severity(severity)


_STAND_IN = _StandIn()


# Most feeds ORT's calibrator holds before it reduces them to running statistics.
MAX_STRIDE = 16


def _ort():
    from onnxruntime import quantization as q

    return q


def _qtype(name: str):
    q = _ort()
    return {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}[name]


def _method(name: str):
    q = _ort()
    return {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }[name]


class _Reader:
    """ORT's CalibrationDataReader protocol over a calibration callable, streaming, with the
    ``len``/``set_range`` that ``CalibStridedMinMax`` needs. ORT asks for consecutive ranges,
    so one pass over the source serves them all; it restarts only for a range that does not
    begin where the pass stands."""

    def __init__(self, calibration: Calibration, input_names: set[str]):
        self._calibration = calibration
        self._names = input_names
        # a pass that only counts: not one a progress bar reports (data.Counted)
        self._len = sum(1 for _ in getattr(calibration, "uncounted", calibration)())
        self._source: Iterator = iter(calibration())
        self._pos = 0  # feeds taken from self._source
        self._end = self._len

    def __len__(self) -> int:
        return self._len

    def set_range(self, start_index: int, end_index: int) -> None:
        if start_index != self._pos:  # a new pass, skipped ahead to the range
            self._source = itertools.islice(iter(self._calibration()), start_index, None)
            self._pos = start_index
        self._end = end_index

    def get_next(self):
        feeds = next(self._source, None) if self._pos < self._end else None
        if feeds is None:
            return None
        self._pos += 1
        return {k: v for k, v in feeds.items() if k in self._names}

    def stride(self) -> int:
        """The largest divisor of the sample count up to MAX_STRIDE (ORT requires one)."""
        return max(d for d in range(1, MAX_STRIDE + 1) if self._len % d == 0)

    def __iter__(self):
        return self

    def __next__(self):
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds


def _eligible(model: onnx.ModelProto, recipe: Recipe) -> tuple[list[str], list[str]]:
    todo, kept = graph.select_gemms(model, recipe)
    return [g.node for g in todo], kept


def _smoothed(src: Path, recipe: Recipe, calibration: Calibration, work: Path) -> Path:
    """``src`` rewritten with exact smoothing of the GEMMs' inputs (or ``src`` unchanged)."""
    if recipe.smooth_percentile is None:
        return src
    model = onnx.load(str(src))
    gemms, _ = graph.find_gemms(model, recipe.op_types)
    gemms = [g for g in gemms if g.node not in recipe.keep_fp32]
    stats = graph.calibrate(model, [g.x for g in gemms], calibration)
    graph.apply_smoothing(model, gemms, stats, recipe.smooth_percentile)
    return onnxfiles.save(model, work / "smoothed.onnx")


def _which_quantized(src: onnx.ModelProto, out: Path, candidates: list[str]) -> list[str]:
    """The candidates whose output is now produced by a quantized op (not the FP32 op)."""
    result = onnx.load(str(out), load_external_data=False)
    producer = {o: n for n in result.graph.node for o in n.output}
    orig = {n.name: n for n in src.graph.node}
    done = []
    for name in candidates:
        n = orig[name]
        p = producer.get(n.output[0])
        if p is None:
            continue
        dq_inputs = any(
            producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
            for i in p.input
        )
        if p.op_type != n.op_type or dq_inputs:
            done.append(name)
    return done


def _static(src: Path, recipe: Recipe, calibration: Calibration, out: Path, fmt) -> tuple:
    q = _ort()
    with tempfile.TemporaryDirectory(prefix="qg-quant-", dir=out.parent) as tmp:
        model_path = _smoothed(src, recipe, calibration, Path(tmp))
        # its graph and weights' shapes (all too_large reads), not weights beside it
        model = onnx.load(str(model_path), load_external_data=False)
        todo, kept = _eligible(model, recipe)
        reader = _Reader(calibration, {i.name for i in model.graph.input})
        if len(reader) == 0:
            raise DataError("the calibration source yielded no feeds; give it at least one")
        with _without_preprocess_advice(), cpus.for_tools():  # its calibrator's session
            q.quantize_static(
                str(model_path),
                str(out),
                reader,
                use_external_data_format=onnxfiles.too_large(model),
                quant_format=fmt,
                op_types_to_quantize=list(recipe.op_types),
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                activation_type=_qtype(recipe.activation_type),
                weight_type=_qtype(recipe.weight_type),
                nodes_to_quantize=todo,
                calibrate_method=_method(recipe.calibration),
                extra_options={
                    "ActivationSymmetric": recipe.activation_symmetric,
                    "WeightSymmetric": recipe.weight_symmetric,
                    "CalibStridedMinMax": reader.stride(),
                    "DefaultTensorType": TensorProto.FLOAT,  # com.microsoft outputs have no type
                },
            )
        quantized = _which_quantized(model, out, todo)
    return quantized, kept + [n for n in todo if n not in quantized]


def quantize_static_qdq(src: Path, recipe: Recipe, calibration: Calibration, out: Path):
    return _static(src, recipe, calibration, out, _ort().QuantFormat.QDQ)


def quantize_static_qoperator(src: Path, recipe: Recipe, calibration: Calibration, out: Path):
    return _static(src, recipe, calibration, out, _ort().QuantFormat.QOperator)


def quantize_dynamic(src: Path, recipe: Recipe, calibration: Calibration, out: Path):
    """ORT's dynamic quantization: weights offline, activation ranges at run time.
    ``calibration`` is only read when the recipe smooths."""
    q = _ort()
    if recipe.activation_type != "uint8":
        raise QuantizeError(
            f"recipe {recipe.name!r}: ORT's dynamic quantization computes uint8 activations "
            f"only, not {recipe.activation_type}"
        )
    with tempfile.TemporaryDirectory(prefix="qg-quant-", dir=out.parent) as tmp:
        model_path = _smoothed(src, recipe, calibration, Path(tmp))
        model = onnx.load(str(model_path), load_external_data=False)  # as _static's
        todo, kept = _eligible(model, recipe)
        with _without_preprocess_advice():
            q.quantize_dynamic(
                str(model_path),
                str(out),
                use_external_data_format=onnxfiles.too_large(model),
                op_types_to_quantize=list(recipe.op_types),
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                weight_type=_qtype(recipe.weight_type),
                nodes_to_quantize=todo,
                extra_options={
                    "WeightSymmetric": recipe.weight_symmetric,
                    # Shape inference cannot type com.microsoft outputs (fused graphs): without
                    # this ORT fails with "Unable to find data type for weight_name".
                    "DefaultTensorType": TensorProto.FLOAT,
                },
            )
        quantized = _which_quantized(model, out, todo)
    return quantized, kept + [n for n in todo if n not in quantized]
