"""INT8 recipes as values, the defaults for this CPU, and ``quantize`` (one entry point).

A ``Recipe`` says *what* to quantize and how; ``quantize`` turns an FP32 ONNX model plus a
calibration source into an INT8 model. Implementations are chosen by ``recipe.format``
from ``BUILDERS`` (a dict, not an if/elif chain):

- ``integer-to-float``: quantgate's own graph (``quantize/graph.py``): SmoothQuant-style
  exact FP32 rewrite, per-tensor uint8 ``QuantizeLinear`` and int8 per-column weights into
  ``com.microsoft.MatMulIntegerToFloat`` / ``QAttention``; GEMM outputs stay FP32.
- ``qdq`` / ``qoperator`` / ``dynamic``: ONNX Runtime's own quantizers
  (``quantize/ort_recipes.py``), for comparison and as search candidates.

A calibration source is a zero-argument callable returning a *fresh* iterator of ONNX
Runtime feed dicts each time; it may be called more than once. Only running statistics are
kept, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from quantgate.errors import NothingToQuantize, QuantgateError, QuantizeError, QuantizeFailed

log = logging.getLogger(__name__)

Calibration = Callable[[], Iterable[dict[str, np.ndarray]]]


class Format(str, Enum):
    INTEGER_TO_FLOAT = "integer-to-float"  # quantgate's hand-built graph (graph.py)
    QDQ = "qdq"  # ORT quantize_static, QuantizeLinear/DequantizeLinear pairs
    QOPERATOR = "qoperator"  # ORT quantize_static, QLinearMatMul & co.
    DYNAMIC = "dynamic"  # ORT quantize_dynamic: activation ranges computed at run time


METHODS = ("static", "dynamic")
QTYPES = ("uint8", "int8")
CALIBRATIONS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Recipe:
    name: str  # e.g. "smooth-static-u8s8", "ort-static-qdq", "ort-dynamic-per-channel"
    method: str  # "static" | "dynamic" (dynamic = uncalibrated; labelled in reports)
    format: str  # a Format value
    # uint8 asymmetric activations: on x86 ORT's fast integer GEMM is u8 x s8; int8
    # activations measured ~35x slower here (6 vs 211 GMAC/s u8s8 on AVX512-VNNI).
    activation_type: str = "uint8"
    activation_symmetric: bool = False
    weight_type: str = "int8"
    weight_symmetric: bool = True
    per_channel: bool = True  # weights: one scale per output column
    calibration: str = "minmax"  # minmax | entropy | percentile (the hand-built graph: minmax)
    # Gemm: GPT-2's Conv1D layers (x @ W + b), which the legacy exporter writes as Gemm
    op_types: tuple[str, ...] = ("MatMul", "Attention", "Gemm")
    keep_fp32: tuple[str, ...] = ()  # node names (of the graph quantized) left in FP32
    # SmoothQuant-style migration: s_j = max(1, absmax_j / P(absmax)), x/s before the GEMM,
    # weight row j * s_j. 75 measured best on MiniLM (P50..P98 within 0.0003 cosine).
    smooth_percentile: float | None = 75.0
    fuse_first: bool = (
        True  # quantize the fused graph (fusion, then quantization) or the unfused one
    )
    # 7-bit weights. ORT's advice for x86 without VNNI, where u8 x s8 goes through
    # VPMADDUBSW and pairs of products can saturate int16.
    reduce_range: bool = False

    def __post_init__(self):
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {METHODS}")
        if self.format not in {f.value for f in Format}:
            problems.append(f"format {self.format!r} is not one of {[f.value for f in Format]}")
        if (self.method == "dynamic") != (self.format == Format.DYNAMIC.value):
            problems.append(
                f"method {self.method!r} does not fit format {self.format!r}: "
                "only the 'dynamic' format is uncalibrated"
            )
        for what in ("activation_type", "weight_type"):
            if getattr(self, what) not in QTYPES:
                problems.append(f"{what} {getattr(self, what)!r} is not one of {QTYPES}")
        if self.calibration not in CALIBRATIONS:
            problems.append(f"calibration {self.calibration!r} is not one of {CALIBRATIONS}")
        if self.smooth_percentile is not None and not 0 < self.smooth_percentile <= 100:
            problems.append(f"smooth_percentile must be in (0, 100], got {self.smooth_percentile}")
        if not self.op_types:
            problems.append("op_types is empty: nothing would be quantized")
        if problems:
            raise QuantizeError(f"invalid recipe {self.name!r}: " + "; ".join(problems))
        object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))

    def to_dict(self) -> dict:
        """A plain JSON value for the manifest."""
        d = dataclasses.asdict(self)
        d["op_types"], d["keep_fp32"] = list(self.op_types), list(self.keep_fp32)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise QuantizeError(f"unknown recipe fields {unknown}; known: {sorted(fields)}")
        d = dict(d)
        for k in ("op_types", "keep_fp32"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def with_keep_fp32(self, nodes) -> Recipe:
        """This recipe with ``nodes`` added to the nodes kept FP32 (order kept, no duplicates)."""
        merged = tuple(dict.fromkeys([*self.keep_fp32, *nodes]))
        return dataclasses.replace(self, keep_fp32=merged)


@dataclass(frozen=True)
class QuantizedModel:
    path: Path
    recipe: Recipe
    quantized_nodes: tuple[str, ...]  # names of the FP32 nodes that now run in INT8
    kept_fp32: tuple[str, ...]  # eligible nodes left FP32 (recipe.keep_fp32 or unsupported)
    seconds: float
    source: Path | None = None  # the FP32 graph it was made from (fused or unfused)


# ---------------------------------------------------------------------------- the registry
SMOOTH_STATIC = Recipe("smooth-static-u8s8", "static", Format.INTEGER_TO_FLOAT.value)
# The same on the exporter's graph: Q, K and V as three integer GEMMs sharing one quantized
# input, and the attention core as plain ops, instead of ORT's QAttention. On MiniLM it is
# faster at batch 32 and a little slower at batch 1, with the same fidelity
# (docs/BENCHMARKS.md, "Quantization"): the search times both and keeps the faster.
SMOOTH_STATIC_UNFUSED = Recipe(
    "smooth-static-u8s8-unfused", "static", Format.INTEGER_TO_FLOAT.value, fuse_first=False
)
STATIC = Recipe("static-u8s8", "static", Format.INTEGER_TO_FLOAT.value, smooth_percentile=None)
ORT_DYNAMIC_FUSED = Recipe(
    "ort-dynamic-per-channel-fused", "dynamic", Format.DYNAMIC.value, smooth_percentile=None
)
ORT_DYNAMIC = Recipe(
    "ort-dynamic-per-channel",
    "dynamic",
    Format.DYNAMIC.value,
    smooth_percentile=None,
    fuse_first=False,
)
# ORT's defaults as a user would call quantize_static: QDQ, S8S8, MinMax, on the exporter's
# graph. Measured inaccurate and slow on MiniLM; kept as the reference point.
ORT_STATIC_QDQ = Recipe(
    "ort-static-qdq",
    "static",
    Format.QDQ.value,
    activation_type="int8",
    smooth_percentile=None,
    fuse_first=False,
)
ORT_STATIC_QDQ_U8S8 = Recipe(
    "ort-static-qdq-u8s8",
    "static",
    Format.QDQ.value,
    smooth_percentile=None,
    fuse_first=False,
    op_types=("MatMul",),
)

# What the search tries, best first; ORT's default static QDQ is only the reference point.
SEARCH_ORDER = (
    SMOOTH_STATIC,
    SMOOTH_STATIC_UNFUSED,
    STATIC,
    ORT_DYNAMIC_FUSED,
    ORT_DYNAMIC,
    ORT_STATIC_QDQ_U8S8,
)
RECIPES: dict[str, Recipe] = {r.name: r for r in (*SEARCH_ORDER, ORT_STATIC_QDQ)}


def default_recipes(features: frozenset[str] | None = None) -> list[Recipe]:
    """The recipes worth trying on a CPU with ``features`` (``cpu.detect_features()`` when
    None), best first."""
    from quantgate.quantize.cpu import detect_features, needs_reduce_range

    feats = detect_features() if features is None else features
    order = list(SEARCH_ORDER)
    if needs_reduce_range(feats):
        order = [dataclasses.replace(r, reduce_range=True) for r in order]
    return order


# ---------------------------------------------------------------------------- quantize
def _builders() -> dict[str, Callable]:
    # Imported here: both modules import Recipe from this one.
    from quantgate.quantize import graph, ort_recipes

    return {
        Format.INTEGER_TO_FLOAT.value: graph.build_integer_to_float,
        Format.QDQ.value: ort_recipes.quantize_static_qdq,
        Format.QOPERATOR.value: ort_recipes.quantize_static_qoperator,
        Format.DYNAMIC.value: ort_recipes.quantize_dynamic,
    }


def _counts(ops: collections.Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in ops.most_common(6))


def quantize(
    fp32_model: Path,
    recipe: Recipe,
    calibration: Calibration,
    out: Path,
    *,
    unfused_model: Path | None = None,
) -> QuantizedModel:
    """Quantize ``fp32_model`` (the fused graph) — or ``unfused_model`` when
    ``recipe.fuse_first`` is False — with ``recipe``; write the INT8 model to ``out``."""
    src = Path(fp32_model) if recipe.fuse_first else unfused_model
    if src is None:
        raise QuantizeError(
            f"recipe {recipe.name!r} quantizes the unfused graph (fuse_first=False) but no "
            "unfused_model was given; pass ExportResult.unfused_onnx"
        )
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise QuantizeError(f"FP32 model {src} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        quantized, kept = _builders()[recipe.format](src, recipe, calibration, out)
    except QuantgateError:  # DataError, QuantizeError: already say what to do
        raise
    except Exception as e:  # ORT/onnx raise many types; name the recipe and the cause
        raise QuantizeFailed(
            f"recipe {recipe.name!r} failed on {src.name}: {type(e).__name__}: {e}"
        ) from e
    if not quantized:
        import onnx

        graph = onnx.load(str(src), load_external_data=False).graph
        matrices = {i.name for i in graph.initializer if len(i.dims) >= 2}
        ops = collections.Counter(n.op_type for n in graph.node)
        weighted = collections.Counter(
            n.op_type for n in graph.node if any(i in matrices for i in n.input)
        )
        where = (
            f"the graph's weight matrices are read by {_counts(weighted)}"
            if weighted
            else f"the graph's most common ops: {_counts(ops)}"
        )
        raise NothingToQuantize(
            f"recipe {recipe.name!r} quantized no node of {src.name}: it quantizes "
            f"{', '.join(recipe.op_types)} nodes with weights, and found "
            + (f"{len(kept)} it had to keep FP32" if kept else "none")
            + f" ({where}). This recipe has nothing to quantize here; where no recipe has, "
            "INT8 has nothing to gain: export the model with --no-quantize."
        )
    seconds = time.perf_counter() - t0
    log.info(
        "%s: %d nodes INT8, %d kept FP32, %.1f s", recipe.name, len(quantized), len(kept), seconds
    )
    return QuantizedModel(out, recipe, tuple(quantized), tuple(kept), seconds, src)
