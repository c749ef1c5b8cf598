"""Per-node sensitivity: how much each quantized node costs the model's outputs.

A node's score is what returning it alone to FP32 buys at the outputs::

    score(node) = error(INT8) - error(INT8 with the node computed in FP32)

The second model needs no re-quantizing: it is the INT8 graph with the node's INT8 producer
swapped for its FP32 original (the original weights, reading the INT8 graph's own tensor
for the node's input), the quantizing nodes that fed only it pruned. That is the INT8 graph
whose node output is f_fp32(x_int8), exactly what keeping the node FP32 gives but for the
ranges of the nodes after it, which a recalibration would move a little. One session per
node, on a few calibration rows: all-MiniLM-L6-v2's 24 nodes on 32 rows take 2-7 s on two
busy cores, the runs most of it (the introduced error below took 4 s). Most helpful to keep
FP32 first; a node whose return does not lower the error is left out, as keeping it FP32
would cost speed for nothing.

``error`` is 1 - cosine to FP32, per row (a batch item flattened over its real tokens, its
padding zeroed where an ``attention_mask`` fits the output: ``fidelity.flat_rows``, so
padding noise does not count), averaged over rows and summed over the float outputs. It is
the gates' own measure (``cosine:<output>``, an embedding's mean cosine): a score is the
cosine a candidate failing those gates wins back. A relative L2 error would rank alike for
small errors (1 - cos ~ half the squared relative error orthogonal to FP32's) but would also
count a change of scale, which no cosine gate sees.

The error a node *introduces* (its INT8 output against the FP32 node on the same input) does
not predict this: on all-MiniLM-L6-v2 the four attentions it ranked first were 11th to 19th
of 24 by their effect on the embedding, behind the FFN down-projections, whose error the
residual stream carries to the output. Nodes whose tensors the INT8 graph no longer exposes
(an ORT rewrite renamed them) are skipped with a log line.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from quantgate.errors import DataError, QuantizeError
from quantgate.quantize.fidelity import flat_rows, row_cosine
from quantgate.quantize.graph import MASK_INPUT
from quantgate.quantize.recipes import QuantizedModel
from quantgate.sessions import session
from quantgate.tasks import token_scores

log = logging.getLogger(__name__)


def _swap(
    q: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    fp32_node: onnx.NodeProto,
    fp32_inits: dict[str, onnx.TensorProto],
) -> int | None:
    """Make ``q`` (whose nodes are ``nodes``) the graph with the producer of ``fp32_node``'s
    output replaced by ``fp32_node``, in place: its original weights appended to ``q``'s
    initializers, the nodes the outputs do not need (what quantized only its input) left out.
    How many initializers were appended, to take back; None where that producer has other
    outputs in use, which the FP32 node would not make."""
    out = fp32_node.output[0]
    producer = next((n for n in nodes if out in n.output), None)
    if producer is None:
        return None
    used = {i for n in nodes for i in n.input} | {o.name for o in q.graph.output}
    if any(o and o != out and o in used for o in producer.output):
        return None
    q_inits = {i.name for i in q.graph.initializer}
    node = onnx.NodeProto()
    node.CopyFrom(fp32_node)
    added = []
    for k, name in enumerate(node.input):
        if name in fp32_inits:
            # the INT8 graph may hold another tensor of that name (a smoothed weight)
            new = name + "__fp32" if name in q_inits else name
            t = onnx.TensorProto()
            t.CopyFrom(fp32_inits[name])
            t.name = new
            node.input[k] = new
            added.append(t)
    need = {o.name for o in q.graph.output}
    kept = []
    for n in reversed([node if n is producer else n for n in nodes]):
        if any(o in need for o in n.output):
            kept.append(n)
            need.update(i for i in n.input if i)
    # Initializers no node reads stay: copying the model without them would cost more than
    # the session's load drops them for.
    del q.graph.node[:]
    q.graph.node.extend(kept[::-1])
    q.graph.initializer.extend(added)
    return len(added)


def node_sensitivity(
    fp32_model: Path, int8: QuantizedModel, feeds: Iterable[dict], top_k: int = 8
) -> list[tuple[str, float]]:
    """(quantized node name, how much keeping it FP32 lowers the output error), most helpful
    first, at most ``top_k``, only nodes that help.

    ``fp32_model`` is the graph ``int8`` was made from; when it is not (the fused model for a
    ``fuse_first=False`` recipe), ``int8.source`` is used instead."""
    fp32 = onnx.load(str(fp32_model))
    nodes = {n.name: n for n in fp32.graph.node}
    missing = [n for n in int8.quantized_nodes if n not in nodes]
    if missing and int8.source is not None and Path(int8.source) != Path(fp32_model):
        # e.g. the fused model given for a recipe that quantized the unfused graph
        fp32_model = int8.source
        fp32 = onnx.load(str(fp32_model))
        nodes = {n.name: n for n in fp32.graph.node}
        missing = [n for n in int8.quantized_nodes if n not in nodes]
    q = onnx.load(str(int8.path))
    if missing:
        raise QuantizeError(
            f"{fp32_model} is not the graph {int8.recipe.name!r} quantized: it lacks nodes "
            f"{missing[:3]}; pass the fused model when fuse_first, the unfused one otherwise"
        )
    feeds = list(feeds)
    if not feeds:
        raise DataError("node_sensitivity got no feeds; pass a few calibration samples")
    t0 = time.monotonic()
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    q_tensors = {o for n in q.graph.node for o in n.output} | {i.name for i in q.graph.input}
    q_tensors |= {i.name for i in q.graph.initializer}
    probes = []
    for name in int8.quantized_nodes:
        n = nodes[name]
        acts = [i for i in n.input if i and i not in fp32_inits]
        if all(a in q_tensors for a in acts) and n.output[0] in q_tensors:
            probes.append(name)
        else:
            log.info("sensitivity: %s skipped, the INT8 graph does not expose its tensors", name)
    if not probes:
        return []

    floats = [o.name for o in q.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT]
    fp32_sess = session(fp32, optimize=False)
    fp32_inputs = {i.name for i in fp32_sess.get_inputs()}
    reference = [
        fp32_sess.run(floats, {k: v for k, v in f.items() if k in fp32_inputs}) for f in feeds
    ]
    del fp32_sess
    # One model, changed node by node and put back, its weights written once beside it: a
    # copy per node, or its weights serialized into every session, costs more than the runs.
    original = [onnx.NodeProto() for _ in q.graph.node]
    for copy, n in zip(original, q.graph.node, strict=True):
        copy.CopyFrom(n)
    scores = []
    with tempfile.TemporaryDirectory(prefix="quantgate-sensitivity-") as tmp:
        path = Path(tmp) / "int8.onnx"
        onnx.save(q, str(path), save_as_external_data=True, location="weights")
        base = _output_error(path, feeds, reference, floats)
        for name in probes:
            added = _swap(q, original, nodes[name], fp32_inits)
            if added is None:
                log.info("sensitivity: %s skipped, its INT8 producer makes other outputs too", name)
                continue
            onnx.save(q, str(path))  # the FP32 node's weights inline, the others' beside it
            del q.graph.node[:]
            q.graph.node.extend(original)
            del q.graph.initializer[len(q.graph.initializer) - added :]
            scores.append((name, base - _output_error(path, feeds, reference, floats)))
    log.info(
        "sensitivity: %d node(s) on %d feed(s) in %.1f s; output error %.3g (1 - cosine)",
        len(scores), len(feeds), time.monotonic() - t0, base,
    )  # fmt: skip
    scores.sort(key=lambda kv: kv[1], reverse=True)
    useless = [n for n, s in scores if s <= 0]
    if useless:
        log.info("sensitivity: FP32 does not help %d node(s), e.g. %s", len(useless), useless[0])
    return [(n, s) for n, s in scores if s > 0][:top_k]


def _output_error(
    model: Path, feeds: list[dict], reference: list[list[np.ndarray]], names: list[str]
) -> float:
    """Sum over the outputs ``names`` of the mean over rows of 1 - cosine to ``reference``."""
    sess = session(model, optimize=False)
    inputs = {i.name for i in sess.get_inputs()}
    tokens = token_scores(names)
    lost = np.zeros(len(names))
    rows = 0
    for f, ref in zip(feeds, reference, strict=True):
        got = sess.run(names, {k: v for k, v in f.items() if k in inputs})
        mask = f.get(MASK_INPUT)
        for k, (n, x, y) in enumerate(zip(names, ref, got, strict=True)):
            t = n in tokens
            lost[k] += float(
                np.sum(1 - row_cosine(flat_rows(x, mask, tokens=t), flat_rows(y, mask, tokens=t)))
            )
        rows += len(ref[0]) if names else 0
    return float(lost.sum() / max(rows, 1))
