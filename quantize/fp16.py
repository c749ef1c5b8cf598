"""FP16 for the CUDA execution provider: convert an FP32 ONNX model, and measure what it costs.

On CUDA the fast variant of a transformer is FP16, not INT8 (docs/BENCHMARKS.md, "GPU": on
an H200 the fused FP16 MiniLM ran 2.11x FP32 at batch 128, dynamic INT8 0.02x).
``to_fp16`` uses ONNX Runtime's own converter (``OnnxModel.convert_float_to_float16``), which
understands the fused contrib ops (Attention, SkipLayerNormalization, BiasGelu,
EmbedLayerNormalization) through symbolic shape inference, and keeps:

- the model's inputs and outputs FP32 (``keep_io_types``): a client sends and receives the
  same tensors as for the FP32 variant, and the server needs no second codec;
- the ops in ``Fp16Config.op_block_list`` FP32. ORT's default list (tree ensembles, TopK,
  Range, CumSum, Min/Max, ...) is always included; what to add for transformers is measured,
  not assumed (see ``Fp16Config``);
- the nodes in ``Fp16Config.node_block_list`` FP32: ``out_of_range``'s, those whose values
  FP16 may not hold, found on FP32's run.

``fidelity`` compares the converted model with FP32 on real feeds (max abs diff, mean and
min cosine per row) so an accuracy gate can decide; its ``cosine:<output>`` gates are
``fidelity.Fidelity``'s, as the INT8 gates of that name are. The FP16 model also runs on the
CPU provider: ORT inserts Casts around the ops that have no FP16 CPU kernel, and removes the
Casts between two of them, so a chain of such ops runs in FP32. On the CPU that measures the
weights' rounding (and the inputs' and outputs'), not FP16 activations: an overflow there is
not seen, which is why ``out_of_range`` looks for it on FP32's run, and why the gate is
measured again on CUDA where a GPU is present.

This module imports onnx, onnxruntime and the gates' helpers only; never quantgate.serve.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from quantgate import onnxfiles
from quantgate.bundle import CPU
from quantgate.configs import check_fields, config_class
from quantgate.errors import QuantizeError, QuantizeFailed
from quantgate.quantize.fidelity import Fidelity
from quantgate.quiet import logger_silenced, stdout_captured
from quantgate.sessions import session

log = logging.getLogger(__name__)


FP16_MAX = 65504.0  # FP16's largest finite value: past it, a value is inf
# ``out_of_range`` keeps FP32 the nodes of a tensor whose FP32 values reach past this on the
# rows it runs: an eighth of FP16's range, room for inputs those rows did not show. MiniLM's
# largest activation is 192 (an FFN output), so nothing of it is kept.
MAX_ACTIVATION = FP16_MAX / 8
SCAN_ROWS = 256  # rows ``out_of_range`` runs, at most (batches of the feeds, whole)
# rows run at once: every tensor of the graph is an output then, and a large model's are
# gigabytes at a batch of 32 (BERT-large's FFN, 32 x 512 x 4096 floats: 268 MB each, x 24)
SCAN_BATCH = 4


@config_class
@dataclass(frozen=True)
class Fp16Config:
    # Op types kept FP32 on top of ORT's DEFAULT_OP_BLOCK_LIST. Empty by default. Measured on
    # all-MiniLM-L6-v2 (fused graph, CPU provider, 64 real sentences, vs FP32):
    #   nothing added:                      max abs 6.9e-3, mean cosine 0.9999992 (min 0.9999989)
    #   (Skip/Embed)LayerNormalization:     max abs 4.6e-3, mean cosine 0.9999998 (min 0.9999997)
    #   Attention, or BiasGelu:             no change
    # Both are three orders of magnitude inside any gate, and ORT's LayerNorm kernels already
    # accumulate in FP32 inside the op, while blocking them costs two Casts per op (13 of them
    # in MiniLM) on the CUDA hot path. Add them here when a model's gate says otherwise.
    op_block_list: tuple[str, ...] = ()
    # node names kept FP32: ``out_of_range``'s, where FP32's values leave FP16's range
    node_block_list: tuple[str, ...] = ()
    keep_io_types: bool = True  # inputs/outputs stay FP32: the same wire format as FP32
    # FP16's largest finite value is 65504; ORT's converter clamps constants beyond these.
    min_positive_val: float = 5.96e-08
    max_finite_val: float = FP16_MAX

    def __post_init__(self):
        check_fields(self)


def to_fp16(model: onnx.ModelProto | str | Path, cfg: Fp16Config | None = None) -> onnx.ModelProto:
    """``model`` (FP32, plain or ORT-fused) converted to FP16 with FP32 inputs and outputs."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    cfg = cfg or Fp16Config()
    proto = _own_copy(model)
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer):
        raise QuantizeError(
            "the model already holds FP16 initializers; to_fp16 expects the FP32 export"
        )
    try:
        wrapped = OnnxModel(proto)
        # symbolic_shape_infer: a warning per node it cannot bound (DeBERTa's relative
        # positions), and onnx_model's when it fails on the whole graph (a torch encoder's
        # dynamo graph: "Please file an issue"); the FP16 model is gated on its fidelity
        # after, which is what decides
        with (
            stdout_captured() as chatter,
            logger_silenced("symbolic_shape_infer"),
            logger_silenced("onnxruntime.transformers.onnx_model"),
        ):
            wrapped.convert_float_to_float16(
                use_symbolic_shape_infer=True,
                keep_io_types=cfg.keep_io_types,
                op_block_list=sorted({*DEFAULT_OP_BLOCK_LIST, *cfg.op_block_list}),
                node_block_list=list(cfg.node_block_list),
                min_positive_val=cfg.min_positive_val,
                max_finite_val=cfg.max_finite_val,
            )
    except Exception as e:  # noqa: BLE001 - ORT's converter raises anything
        raise QuantizeFailed(
            f"FP16 conversion failed: {type(e).__name__}: {e}. Keep the failing op types FP32 "
            "(QuantConfig(fp16_op_block_list=...) in Python), or pass --no-fp16: CUDA then "
            "serves FP32."
        ) from e
    if chatter.getvalue().strip():
        log.info("float16 converter said: %s", " ".join(chatter.getvalue().split()))
    converted = wrapped.model
    kept = _fp32_compute_ops(converted)
    log.info(
        "FP16: %d nodes, FP32 kept for %s",
        len(converted.graph.node),
        ", ".join(f"{op} x{n}" for op, n in sorted(kept.items())) or "no compute op",
    )
    return converted


def _own_copy(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """``model`` loaded (a path), or copied (the caller's stays as it is; not through bytes:
    none past 2 GB), its unnamed nodes named as ``out_of_range`` names them: the node block
    list names nodes."""
    if isinstance(model, (str, Path)):
        proto = onnx.load(str(model))
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    names = {n.name for n in proto.graph.node}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = next(
                name
                for k in range(len(names) + 1)
                if (name := f"{node.op_type}_{i}_{k}") not in names
            )
            names.add(node.name)
    return proto


@dataclass(frozen=True)
class OutOfRange:
    """Where an FP32 model's values leave what FP16 holds (``out_of_range``)."""

    nodes: tuple[str, ...]  # the nodes to keep FP32 (``Fp16Config.node_block_list``)
    tensors: dict[str, float]  # each tensor past the limit: its largest |value| seen
    weights: dict[str, float]  # each initializer past FP16's largest value: its largest |value|
    rows: int  # the rows run
    # control-flow nodes (If, Loop, Scan): the tensors of their subgraphs are not measured
    unmeasured: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the log and the report ("" where nothing is to be said)."""
        said = []
        if self.nodes:
            past = sorted({**self.tensors, **self.weights}.items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{name} {value:.4g}" for name, value in past[:3])
            more = f" and {len(past) - 3} more" if len(past) > 3 else ""
            said.append(
                f"{len(self.nodes)} node(s) kept FP32 for values FP16 may not hold "
                f"(activations past {MAX_ACTIVATION:g}, an eighth of FP16's largest, on "
                f"{self.rows} evaluation rows; weights past {FP16_MAX:g}): {shown}{more}"
            )
        if self.unmeasured:
            said.append(
                f"the subgraphs of {len(self.unmeasured)} control-flow node(s) "
                f"({', '.join(self.unmeasured[:3])}) were not measured: a value past FP16's "
                "range inside them would not be seen here"
            )
        return "; ".join(said)


def out_of_range(
    model: onnx.ModelProto | str | Path,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    limit: float = MAX_ACTIVATION,
    rows: int = SCAN_ROWS,
    threads: int = 0,
) -> OutOfRange:
    """The nodes of the FP32 ``model`` to keep FP32 in its FP16 variant: those that make or
    read a tensor whose values reach past ``limit`` on ``feeds`` (their first ``rows``
    rows, padding included: an inf there is NaN after attention), and those that read a
    weight past FP16's largest value (the converter would clamp it to 65504).

    Measured here because the CPU provider cannot show it: ONNX Runtime's CPU kernels for
    most FP16 ops are FP32 ones between Casts, and it removes the Casts between two such
    ops, so an FP16 model whose activations overflow on CUDA runs finite on the CPU. A
    tensor kept FP32 from its maker to every reader never passes through FP16 (ORT's
    converter removes the Cast pairs between kept nodes)."""
    from onnx import helper as oh

    proto = _own_copy(model)
    graph = proto.graph
    made = {o: n.name for n in graph.node for o in n.output if o}
    read: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            read.setdefault(i, []).append(n.name)
    inside = {n.name: _outer_reads(n) for n in graph.node if _subgraphs(n)}  # If, Loop, Scan
    weights = {}
    for t in graph.initializer:
        a = onnx.numpy_helper.to_array(t) if t.data_type == onnx.TensorProto.FLOAT else None
        if a is not None and (top := _largest(a)) is not None and top > FP16_MAX:
            weights[t.name] = top
    shown = {o.name for o in graph.output}
    for name in made:  # every tensor a graph output, its type left to ONNX Runtime
        if name not in shown:
            graph.output.append(oh.make_empty_tensor_value_info(name))
    sess = session(proto, threads=threads, optimize=False)  # the graph's own tensors
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    # rows a few at a time where every input's first axis is free (not a fixed batch)
    free = all(i.shape and not isinstance(i.shape[0], int) for i in sess.get_inputs())
    largest: dict[str, float] = {}
    seen = 0
    for batch in feeds:
        batch = {k: v for k, v in batch.items() if k in wanted}
        n = len(next(iter(batch.values())))
        step = SCAN_BATCH if free else n
        for start in range(0, n, step):
            feed = {k: v[start : start + step] for k, v in batch.items()}
            values = [*zip(names, sess.run(names, feed), strict=True), *feed.items()]
            for name, x in values:
                if isinstance(x, np.ndarray) and (top := _largest(x)) is not None:  # a tensor
                    largest[name] = max(largest.get(name, 0.0), top)
            del values
        seen += n
        if seen >= rows:
            break
    tensors = {name: v for name, v in largest.items() if v > limit}
    for node, reads in inside.items():
        if past := [t for t in (*tensors, *weights) if t in reads]:
            raise QuantizeError(
                f"{', '.join(past[:3])} hold values FP16 may not hold and are read inside the "
                f"subgraph of {node}, which ONNX Runtime's converter cannot keep FP32"
            )
    keep = {made[t] for t in tensors if t in made}
    keep.update(n for t in (*tensors, *weights) for n in read.get(t, ()))
    order = [n.name for n in graph.node if n.name in keep]  # the graph's order
    return OutOfRange(tuple(order), tensors, weights, seen, tuple(inside))


# |values| from here on are float32's saturation, not magnitudes: an attention mask's fill
# (torch.finfo(float32).min) and infinities, which FP16 holds as infinities, as they mean
SATURATED = 1e38


def _largest(x: np.ndarray) -> float | None:
    """The largest |value| of a float array that is a magnitude (``SATURATED`` and NaN left
    out), 0 where there is none; None for an array that is not float."""
    if x.dtype.kind != "f":
        return None
    magnitudes = np.abs(x[np.isfinite(x)])
    if np.finfo(x.dtype).max > SATURATED:  # (an FP16 array saturates at 65504 instead)
        magnitudes = magnitudes[magnitudes < SATURATED]
    return float(magnitudes.max()) if magnitudes.size else 0.0


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs of a control-flow node (If's branches, Loop's and Scan's bodies)."""
    return [g for a in node.attribute for g in (*([a.g] if a.HasField("g") else []), *a.graphs)]


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """The names the subgraphs of ``node`` (and theirs, to any depth) read from outside
    them: tensors and weights of the graph around, which the node reads unlisted."""
    reads: set[str] = set()
    for g in _subgraphs(node):
        own = {i.name for i in g.input} | {t.name for t in g.initializer}
        own |= {o for n in g.node for o in n.output}
        for n in g.node:
            reads |= {i for i in n.input if i and i not in own}
            reads |= _outer_reads(n) - own
    return reads


def _fp32_compute_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op types (and counts) whose float inputs stay FP32 next to Casts: what stayed FP32."""
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output)
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Cast":
            continue
        if any(types.get(i) == onnx.TensorProto.FLOAT for i in node.input if i):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` (its weights beside it past protobuf's 2 GB: ``onnxfiles.save``)."""
    return onnxfiles.save(model, path)


def crash(
    path: str | Path, provider: str = CPU, *, precision: str = "fp16", timeout_s: float = 600
) -> str | None:
    """How ONNX Runtime dies opening the model at ``path`` on ``provider``, or None.

    The session is created in a child process, with the options every session of a
    ``precision`` variant gets (``quantgate.sessions``): ORT has segfaulted on the converter's output
    (``quantgate.workarounds``), and a crash in this process would take the whole export,
    minutes of it, down with it. Only a death by signal (or a hang) counts: a Python
    exception in the child is left for the in-process session to raise with its message,
    and a child that could not even start the check is logged and ignored. Costs about a
    second.
    """
    probe = (
        "import sys; from quantgate.sessions import session\n"
        "try: session(sys.argv[1], sys.argv[2], precision=sys.argv[3])\n"
        "except Exception: pass"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe, os.fspath(path), provider, precision],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return f"ONNX Runtime did not finish creating a session on {provider} in {timeout_s:g} s"
    if done.returncode < 0:
        try:
            what = signal.Signals(-done.returncode).name
        except ValueError:  # a real-time signal has no name
            what = f"signal {-done.returncode}"
        if what == "SIGKILL":
            return (
                f"the process creating a session on {provider} was killed (SIGKILL), "
                "possibly for lack of memory"
            )
        return (
            f"ONNX Runtime crashed ({what}) creating a session on {provider}; no "
            "quantgate.workarounds entry covers this graph"
        )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        log.warning("could not check the model in a child process (%s); going on", last)
    return None


class NoFloatOutput(QuantizeError):
    """The model has no float output for ``fidelity`` to compare."""


def fidelity(
    reference: onnx.ModelProto | str | Path,
    candidate: onnx.ModelProto | str | Path,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    provider: str = CPU,
    reference_provider: str = CPU,
    outputs: Sequence[str] | None = None,
    precision: str,
    mask: str | None = "attention_mask",
    threads: int = 0,
) -> Fidelity:
    """Run ``reference`` and ``candidate`` on every feed and compare their float outputs
    (``outputs``, by default every float output: an integer one, a predicted class index,
    has no cosine, and an R² of indices means nothing). A QuantizeError where the model has
    none: nothing FP16 changes to gate.

    Rows are batch items, compared as ``Fidelity.measure`` does; ``mask`` names the feed
    (batch, sequence) whose padded positions do not count. The reference runs in FP32 on
    ``reference_provider`` (CPU by default: the exported, validated numbers); ``precision``
    is the candidate's.
    """
    ref = session(reference, reference_provider, threads=threads)
    cand = session(candidate, provider, threads=threads, precision=precision)
    floats = ("tensor(float)", "tensor(float16)", "tensor(double)")
    names = list(outputs or [o.name for o in ref.get_outputs() if o.type in floats])
    if not names:
        raise NoFloatOutput(
            "its fidelity compares the model's float outputs, and it has none ("
            + ", ".join(f"{o.name} {o.type}" for o in ref.get_outputs())
            + ")"
        )

    def runs():
        for feed in feeds:
            a = dict(zip(names, ref.run(names, dict(feed)), strict=True))
            b = dict(zip(names, cand.run(names, dict(feed)), strict=True))
            yield a, b, feed.get(mask) if mask else None

    return Fidelity.measure(runs(), names, provider=provider)


__all__ = [
    "Fidelity",
    "Fp16Config",
    "NoFloatOutput",
    "OutOfRange",
    "crash",
    "fidelity",
    "out_of_range",
    "save",
    "to_fp16",
]
