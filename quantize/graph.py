"""quantgate's hand-built INT8 graph: calibration statistics, smoothing, and the rewrite.

For every quantizable GEMM (a ``MatMul`` whose second input is a constant 2-D weight, or a
fused ``com.microsoft.Attention``) on activation ``x``::

    x --Mul(1/s)--> QuantizeLinear (per-tensor, uint8 asym) --> MatMulIntegerToFloat(W' int8
                                                                 per column) --> FP32 out
                                                            \\-> QAttention(W' int8 per column)

- ``s`` (SmoothQuant-style, alpha 1): ``s_j = max(1, absmax_j / P(absmax))`` over the
  channels j of ``x``; the rewrite ``(x / s) @ (diag(s) W) == x @ W`` is exact in FP32 and
  moves outlier channels' range into the weights, which are quantized per column.
- GEMM outputs are never re-quantized: residuals, (Skip)LayerNormalization, BiasGelu stay FP32.
- One calibration pass: per-channel min and max of every GEMM input. The per-tensor range
  after smoothing follows exactly (``min_j(min_j / s_j)``, ``max_j(max_j / s_j)``, s > 0), so
  no second pass over the calibration data is needed.

Measured on all-MiniLM-L6-v2 (bench/quantize.py, docs/BENCHMARKS.md): cosine 0.9983, top-1 0.970 vs FP32;
int8 (s8) activations are ~35x slower on x86 ORT, and a per-channel QuantizeLinear ~20x
slower than per-tensor, hence Mul + per-tensor QuantizeLinear.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from quantgate import onnxfiles
from quantgate.errors import DataError, QuantizeError
from quantgate.quantize.recipes import Calibration, Recipe
from quantgate.sessions import session

log = logging.getLogger(__name__)

MS = "com.microsoft"
MASK_INPUT = "attention_mask"  # a feed of shape x.shape[:-1]: statistics over real tokens only
_QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}
_NP = {"uint8": np.uint8, "int8": np.int8}
# Attention inputs past index 3 (past, attention_bias, past_sequence_length) and attributes
# QAttention lacks: such nodes stay FP32.
_QATTENTION_ATTRS = {
    "num_heads",
    "unidirectional",
    "do_rotary",
    "mask_filter_value",
    "scale",
    "past_present_share_buffer",
}


# ---------------------------------------------------------------------------- which nodes
@dataclass(frozen=True)
class Gemm:
    node: str  # node name
    op_type: str  # "MatMul" | "Attention" | "Gemm"
    x: str  # activation input
    w: str  # weight initializer (K, N); (N, K) where trans_b
    trans_b: bool = False  # a Gemm's transB: its weight is stored transposed
    bias: str = ""  # a Gemm's C, added after the product


def _gemm_problem(
    n: onnx.NodeProto, attrs: dict, inits: dict, aliases: dict, n_out: int
) -> str | None:
    """Why a Gemm node (its attributes ``attrs``) cannot become MatMulIntegerToFloat
    (x @ W + bias), or None."""
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("transA", 0):
        return "its alpha is not 1 or its A is transposed"
    if len(n.input) > 2 and n.input[2]:
        c = inits.get(_through_identities(n.input[2], inits, aliases))
        if c is None or list(c.dims) != [n_out] or attrs.get("beta", 1.0) != 1.0:
            return "its C is not a bias of one value per output column (times beta 1)"
    return None


def find_gemms(
    model: onnx.ModelProto, op_types: Iterable[str]
) -> tuple[list[Gemm], dict[str, str]]:
    """Quantizable GEMMs among ``op_types``, and the nodes of those types that are not
    (name -> why). A MatMul of two activations (attention scores) is neither: it is not a GEMM
    with weights. A weight is an initializer, or one read through Identity nodes: a weight
    shared between layers (ALBERT's) is exported once and read so by every layer after the
    first, which were left FP32 without a word before."""
    inits = {i.name: i for i in model.graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    ops = set(op_types)
    gemms, skipped = [], {}
    for n in model.graph.node:
        if n.op_type not in ops or n.domain not in ("", MS):
            continue
        name = _through_identities(n.input[1], inits, aliases) if len(n.input) > 1 else ""
        w = inits.get(name)
        if w is None:
            continue  # activation x activation: not a weight GEMM
        if len(w.dims) != 2 or w.data_type != TensorProto.FLOAT:
            skipped[n.name] = f"weight {name} is not a 2-D float tensor"
            continue
        if n.op_type == "Gemm":  # GPT-2's Conv1D: x (B*T, K) @ W + b
            attrs = {a.name: oh.get_attribute_value(a) for a in n.attribute}
            trans_b = bool(attrs.get("transB", 0))
            n_out = w.dims[0] if trans_b else w.dims[1]
            if problem := _gemm_problem(n, attrs, inits, aliases, n_out):
                skipped[n.name] = problem
                continue
            bias = n.input[2] if len(n.input) > 2 else ""
            gemms.append(Gemm(n.name, n.op_type, n.input[0], name, trans_b, bias))
            continue
        if n.op_type == "Attention":
            extra = [i for i in n.input[4:] if i]
            unsupported = {a.name for a in n.attribute} - _QATTENTION_ATTRS
            if extra or unsupported:
                skipped[n.name] = f"QAttention has no support for {extra or sorted(unsupported)}"
                continue
        gemms.append(Gemm(n.name, n.op_type, n.input[0], name))
    unnamed = [g for g in gemms if not g.node]
    if unnamed:
        raise QuantizeError(
            f"{len(unnamed)} GEMM nodes have no name; names identify nodes in recipes and "
            "reports. Name every node (the exporters and ORT's optimizer do)"
        )
    return gemms, skipped


def _through_identities(name: str, inits: dict, aliases: dict[str, str]) -> str:
    """The initializer ``name`` is, through a chain of Identity nodes; else ``name``."""
    seen = set()
    while name not in inits and name in aliases and name not in seen:
        seen.add(name)
        name = aliases[name]
    return name


# ---------------------------------------------------------------------------- statistics
class ChannelStats:
    """Running per-channel (last axis) min and max of one tensor. Memory: 2 x channels."""

    def __init__(self):
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None
        self.count = 0  # rows seen

    def update(self, x: np.ndarray, keep: np.ndarray | None = None) -> None:
        rows = x.reshape(-1, x.shape[-1]) if keep is None else x[keep]
        if rows.size == 0:
            return
        lo, hi = rows.min(0), rows.max(0)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)
        self.count += rows.shape[0]

    @property
    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) per channel, once a row was seen (inputs never seen are refused first)."""
        assert self.lo is not None and self.hi is not None
        return self.lo, self.hi

    @property
    def absmax(self) -> np.ndarray:
        lo, hi = self.range
        return np.maximum(np.abs(lo), np.abs(hi))


def calibrate(
    model: onnx.ModelProto, tensors: Iterable[str], calibration: Calibration
) -> dict[str, ChannelStats]:
    """Per-channel min/max of ``tensors`` over one pass of ``calibration()``.

    Rows where the feed ``attention_mask`` is 0 (padding) are left out when the mask's shape
    is the tensor's leading shape, or its size that of a tensor flattened to (B*T, K). Only
    running statistics are kept."""
    tensors = list(dict.fromkeys(tensors))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph_inputs = {i.name for i in m.graph.input}
    present = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in present and t not in graph_inputs:
            m.graph.output.append(oh.make_tensor_value_info(t, TensorProto.FLOAT, None))
    # The statistics are of the graph as written: no optimizer rewrites under the outputs.
    sess = session(m, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    stats = {t: ChannelStats() for t in tensors}
    samples = 0
    for feeds in calibration():
        feed = {k: v for k, v in feeds.items() if k in wanted}
        missing = wanted - feed.keys()
        if missing:
            raise DataError(
                f"calibration feed lacks model inputs {sorted(missing)} (has {sorted(feeds)})"
            )
        res = dict(zip(names, sess.run(None, feed), strict=True))
        mask = feeds.get(MASK_INPUT)
        for t in tensors:
            x = res[t] if t in res else feed[t]
            keep = None
            if mask is not None and mask.shape == x.shape[:-1]:
                keep = mask.astype(bool)
            elif mask is not None and x.ndim == 2 and len(x) == mask.size:  # (B*T, K): a Gemm's
                keep = mask.reshape(-1).astype(bool)
            stats[t].update(x, keep)
        samples += 1
        del res
    if samples == 0:
        raise DataError("the calibration source yielded no feeds; give it at least one sample")
    empty = [t for t, s in stats.items() if s.lo is None]
    if empty:
        raise DataError(f"calibration saw no rows (all padding?) for {empty[:3]}")
    log.info("calibrated %d tensors on %d feeds", len(tensors), samples)
    return stats


def smoothing_scales(absmax: np.ndarray, percentile: float) -> np.ndarray:
    """SmoothQuant-style per-channel divisors (alpha 1): ``max(1, absmax / P(absmax))``.
    Channels at or under the percentile keep scale 1; only outliers are divided."""
    ref = float(np.percentile(absmax, percentile))
    if not np.isfinite(ref) or ref <= 0:
        return np.ones_like(absmax, dtype=np.float32)
    return np.maximum(1.0, absmax / ref).astype(np.float32)


def qparams(lo, hi, qtype: str, symmetric: bool, reduce_range: bool = False):
    """Scale and zero point mapping [lo, hi] (arrays or scalars) onto ``qtype``; 0 is exact."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    qmin, qmax = _QRANGE[qtype]
    if reduce_range:  # 7 bits
        qmin, qmax = (0, 127) if qtype == "uint8" else (-64, 63)
    if symmetric:
        amax = np.maximum(np.abs(lo), hi)
        half = (qmax - qmin) // 2  # 127 (or 63)
        scale = amax / half
        zp = np.full_like(scale, (qmin + qmax + 1) // 2)  # 128 for uint8, 0 for int8
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = np.round(qmin - lo / np.where(scale > 0, scale, 1.0))
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # all-zero range: any scale
    return scale, np.clip(zp, qmin, qmax).astype(_NP[qtype])


def quantize_weight(w: np.ndarray, recipe: Recipe):
    """(K, N) float weights -> (int8/uint8 weights, scale, zero point); per column or tensor."""
    if recipe.per_channel:
        lo, hi = w.min(0), w.max(0)
    else:
        lo, hi = np.array(w.min()), np.array(w.max())
    scale, zp = qparams(lo, hi, recipe.weight_type, recipe.weight_symmetric, recipe.reduce_range)
    qmin, qmax = _QRANGE[recipe.weight_type]
    q = np.clip(np.round(w / scale) + zp.astype(np.float32), qmin, qmax).astype(zp.dtype)
    return q, scale, zp


# ---------------------------------------------------------------------------- the rewrite
def _safe(name: str) -> str:
    return name.strip("/").replace("/", "_").replace(":", "_") or "node"


def apply_smoothing(
    model: onnx.ModelProto,
    gemms: list[Gemm],
    stats: dict[str, ChannelStats],
    percentile: float,
) -> None:
    """Exact FP32 rewrite, in place: ``Mul(x, 1/s)`` before each smoothed GEMM and its weight
    rows scaled by ``s``. Node names stay, so ``keep_fp32`` still applies afterwards."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    by_node = {t.node: t for t in gemms}
    scales = {x: smoothing_scales(stats[x].absmax, percentile) for x in {t.x for t in gemms}}
    nodes, done = [], set()
    for n in g.node:
        t = by_node.get(n.name)
        if t is not None and np.any(scales[t.x] > 1):
            s, p = scales[t.x], _safe(t.x)
            if t.x not in done:
                g.initializer.append(numpy_helper.from_array(1.0 / s, p + "_inv_s"))
                nodes.append(
                    oh.make_node("Mul", [t.x, p + "_inv_s"], [p + "_smoothed"], name=p + "_smooth")
                )
                done.add(t.x)
            w = numpy_helper.to_array(inits[t.w]).astype(np.float32)
            w = w * (s[None, :] if t.trans_b else s[:, None])  # the input channels: K
            wname = _safe(n.name) + "_Wsmoothed"
            g.initializer.append(numpy_helper.from_array(w, wname))
            n.input[0], n.input[1] = p + "_smoothed", wname
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    _drop_unused(g, {t.w for t in gemms})


def select_gemms(model: onnx.ModelProto, recipe: Recipe) -> tuple[list, list[str]]:
    """The GEMMs a recipe quantizes, and the node names it keeps FP32 (asked for, or not
    quantizable). ``keep_fp32`` must name nodes of this graph."""
    gemms, skipped = find_gemms(model, recipe.op_types)
    unknown = sorted(set(recipe.keep_fp32) - {n.name for n in model.graph.node})
    if unknown:
        raise QuantizeError(
            f"keep_fp32 names nodes the model does not have: {unknown[:5]}; names must come "
            "from the graph being quantized (fused unless fuse_first=False)"
        )
    keep = set(recipe.keep_fp32)
    for name, why in skipped.items():
        log.info("%s stays FP32: %s", name, why)
    todo = [g for g in gemms if g.node not in keep]
    return todo, [g.node for g in gemms if g.node in keep] + sorted(skipped)


def build_integer_to_float(
    src: Path, recipe: Recipe, calibration: Calibration, out: Path
) -> tuple[list[str], list[str]]:
    """The hand-built INT8 graph; returns (quantized node names, node names kept FP32).

    One calibration pass over the GEMMs' inputs; each input is then quantized once (after
    its smoothing Mul, when the recipe smooths), and each GEMM becomes its integer op on
    weights quantized per column; the FP32 weights no other node reads are dropped.
    """
    model = onnx.load(str(src))
    todo, kept = select_gemms(model, recipe)
    if not todo:
        return [], kept
    stats = calibrate(model, [t.x for t in todo], calibration)
    inputs = {x: _quantize_input(x, stats[x], recipe) for x in dict.fromkeys(t.x for t in todo)}
    _replace_gemms(model.graph, todo, inputs, recipe)
    _drop_unused(model.graph, {t.w for t in todo})
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(oh.make_opsetid(MS, 1))
    onnxfiles.save(model, out)
    return [t.node for t in todo], kept


@dataclass(frozen=True)
class _QuantizedInput:
    """A GEMM input quantized once, for every GEMM that reads it."""

    q: str  # the quantized tensor, and its per-tensor scale and zero point
    scale: str
    zero_point: str
    smoothing: np.ndarray | None  # (K,) divisors s of its channels; None: not smoothed
    nodes: tuple[onnx.NodeProto, ...]  # [Mul(x, 1/s)], QuantizeLinear
    initializers: tuple[onnx.TensorProto, ...]


def _quantize_input(x: str, stats: ChannelStats, recipe: Recipe) -> _QuantizedInput:
    """``x`` divided by its smoothing scales (when the recipe smooths it), then quantized per
    tensor over the range that its channels' statistics give."""
    p, (lo, hi) = _safe(x), stats.range
    nodes, inits = [], []
    s = _smoothing(stats, recipe)
    if s is not None:
        inits.append(numpy_helper.from_array((1.0 / s).astype(np.float32), p + "_inv_s"))
        nodes.append(oh.make_node("Mul", [x, p + "_inv_s"], [p + "_smoothed"], name=p + "_smooth"))
        x, lo, hi = p + "_smoothed", lo / s, hi / s  # the range of x / s: exact, as s > 0
    scale, zp = qparams(lo.min(), hi.max(), recipe.activation_type, recipe.activation_symmetric)
    inits += [
        numpy_helper.from_array(scale.reshape(()), p + "_scale"),
        numpy_helper.from_array(zp.reshape(()), p + "_zp"),
    ]
    nodes.append(
        oh.make_node(
            "QuantizeLinear", [x, p + "_scale", p + "_zp"], [p + "_q"], name=p + "_quantize"
        )
    )
    return _QuantizedInput(p + "_q", p + "_scale", p + "_zp", s, tuple(nodes), tuple(inits))


def _smoothing(stats: ChannelStats, recipe: Recipe) -> np.ndarray | None:
    """The recipe's smoothing scales for an input; None when it does not smooth, or when no
    channel is an outlier (every scale 1)."""
    if recipe.smooth_percentile is None:
        return None
    s = smoothing_scales(stats.absmax, recipe.smooth_percentile)
    return s if np.any(s > 1) else None


def _replace_gemms(
    g: onnx.GraphProto, todo: list[Gemm], inputs: dict[str, _QuantizedInput], recipe: Recipe
) -> None:
    """In place, in graph order: each input's quantizing nodes before the first GEMM that
    reads it, and every GEMM of ``todo`` replaced by its integer op."""
    weights = {i.name: i for i in g.initializer}
    by_node = {t.node: t for t in todo}
    first_reader: dict[str, str] = {}  # input -> the first GEMM (node name) that reads it
    for t in todo:
        first_reader.setdefault(t.x, t.node)
    before = {node: inputs[x].nodes for x, node in first_reader.items()}
    nodes: list[onnx.NodeProto] = []
    inits = [i for q in inputs.values() for i in q.initializers]
    for n in g.node:
        nodes += before.get(n.name, ())
        gemm = by_node.get(n.name)
        if gemm is None:
            nodes.append(n)
            continue
        integer, weight = _integer_gemm(n, gemm, inputs[gemm.x], weights[gemm.w], recipe)
        nodes.append(integer)
        inits += weight
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(inits)


def _integer_gemm(
    n: onnx.NodeProto, t: Gemm, xq: _QuantizedInput, weight: onnx.TensorProto, recipe: Recipe
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """``n`` as MatMulIntegerToFloat (or QAttention) of the quantized input and the weight
    quantized per column, its rows multiplied by the input's smoothing scales; and the
    quantized weight's initializers."""
    w = numpy_helper.to_array(weight).astype(np.float32)
    if t.trans_b:
        w = w.T  # (N, K) -> (K, N)
    if xq.smoothing is not None:
        w = w * xq.smoothing[:, None]  # (K, N): row j carries channel j's divisor
    wq, ws, wzp = quantize_weight(w, recipe)
    p = _safe(n.name)
    inits = [
        numpy_helper.from_array(wq, p + "_Wq"),
        numpy_helper.from_array(ws, p + "_Wscale"),
        numpy_helper.from_array(wzp, p + "_Wzp"),
    ]
    if t.op_type in ("MatMul", "Gemm"):
        q = oh.make_node(
            "MatMulIntegerToFloat",  # its 7th input, a Gemm's bias, is added to the product
            [xq.q, p + "_Wq", xq.scale, p + "_Wscale", xq.zero_point, p + "_Wzp"]
            + ([t.bias] if t.bias else []),
            list(n.output),
            name=n.name + "_int8",
            domain=MS,
        )
    else:
        mask = n.input[3] if len(n.input) > 3 else ""
        attrs = {a.name: oh.get_attribute_value(a) for a in n.attribute}
        q = oh.make_node(
            "QAttention",
            [xq.q, p + "_Wq", n.input[2], xq.scale, p + "_Wscale", mask, xq.zero_point, p + "_Wzp"],
            list(n.output),
            name=n.name + "_int8",
            domain=MS,
            **attrs,
        )
    return q, inits


def _drop_unused(g: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop the FP32 weights that were replaced, unless something else still reads them, and
    the Identity nodes that read them for GEMMs that no longer do (shared weights)."""
    while True:
        read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type == "Identity" and n.output[0] not in read]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    # deleted in place: a kept tensor is not copied (protobuf copies one of 2 GB by bytes,
    # which it cannot make)
    for k in reversed(range(len(g.initializer))):
        if g.initializer[k].name in candidates and g.initializer[k].name not in used:
            del g.initializer[k]
