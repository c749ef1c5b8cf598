"""Per-node sensitivity: how much error each quantized node introduces on its own.

For every node the INT8 model quantized, the INT8 model's own input to that node is fed to
the node's FP32 original (a one-node model with the original weights), and the INT8 node's
output is compared with it::

    error(node) = ||y_int8 - f_fp32(x_int8)|| / ||f_fp32(x_int8)||   (summed over the feeds)

This is the error *introduced* at the node, not the error accumulated from everything before
it, so one noisy early layer does not make every later node look bad. Worst first. Where
the feeds carry an ``attention_mask`` of the output's leading shape, padded positions are left
out (calibration ranges ignore them, so their outputs are not meant to match).
Nodes whose tensors the INT8 graph no longer exposes (an ORT rewrite renamed them) are
skipped with a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh

from quantgate.errors import DataError, QuantizeError
from quantgate.quantize.graph import MASK_INPUT
from quantgate.quantize.recipes import QuantizedModel
from quantgate.sessions import session

log = logging.getLogger(__name__)


def _single_node(fp32: onnx.ModelProto, node: onnx.NodeProto) -> onnx.ModelProto:
    """A model of just ``node`` with its initializers; activations become inputs."""
    inits = {i.name: i for i in fp32.graph.initializer}
    used = [i for i in node.input if i]
    g = oh.make_graph(
        [node],
        "node",
        [oh.make_tensor_value_info(i, _dtype_of(fp32, i), None) for i in used if i not in inits],
        [oh.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        [inits[i] for i in used if i in inits],
    )
    m = oh.make_model(g, opset_imports=list(fp32.opset_import), ir_version=fp32.ir_version)
    return m


def _dtype_of(model: onnx.ModelProto, name: str) -> int:
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if v.name == name and v.type.tensor_type.elem_type:
            return v.type.tensor_type.elem_type
    # Attention's mask_index is int32 after ORT's fusion; everything else here is float
    for n in model.graph.node:
        if n.op_type == "Attention" and len(n.input) > 3 and n.input[3] == name:
            return TensorProto.INT32
    return TensorProto.FLOAT


def node_sensitivity(
    fp32_model: Path, int8: QuantizedModel, feeds: Iterable[dict], top_k: int = 8
) -> list[tuple[str, float]]:
    """(quantized node name, relative error it introduces), worst first, at most ``top_k``.

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
    q_tensors = {o for n in q.graph.node for o in n.output} | {i.name for i in q.graph.input}
    q_inits = {i.name for i in q.graph.initializer}
    probes = {}  # node -> (activation inputs, output)
    for name in int8.quantized_nodes:
        n = nodes[name]
        acts = [i for i in n.input if i and i not in {t.name for t in fp32.graph.initializer}]
        if all(a in q_tensors or a in q_inits for a in acts) and n.output[0] in q_tensors:
            probes[name] = (acts, n.output[0])
        else:
            log.info("sensitivity: %s skipped, the INT8 graph does not expose its tensors", name)
    if not probes:
        return []

    wanted = {t for acts, o in probes.values() for t in [*acts, o]}
    graph_inputs = {i.name for i in q.graph.input}
    outs = {o.name for o in q.graph.output}
    for t in sorted(wanted - outs - graph_inputs - q_inits):
        q.graph.output.append(oh.make_tensor_value_info(t, _dtype_of(fp32, t), None))
    q_sess = session(q, optimize=False)
    q_names = [o.name for o in q_sess.get_outputs()]
    q_inputs = {i.name for i in q_sess.get_inputs()}
    ref = {name: session(_single_node(fp32, nodes[name]), optimize=False) for name in probes}

    err2 = dict.fromkeys(probes, 0.0)
    ref2 = dict.fromkeys(probes, 0.0)
    count = 0
    for f in feeds:
        feed = {k: v for k, v in f.items() if k in q_inputs}
        res = dict(zip(q_names, q_sess.run(None, feed), strict=True))
        res.update({k: v for k, v in feed.items() if k not in res})
        for name, (acts, out) in probes.items():
            y_ref = ref[name].run(None, {a: res[a] for a in acts})[0]
            y, y_ref = res[out].astype(np.float64), y_ref.astype(np.float64)
            mask = f.get(MASK_INPUT)
            if mask is not None and mask.shape == y.shape[:-1]:  # real tokens only
                y, y_ref = y[mask.astype(bool)], y_ref[mask.astype(bool)]
            err2[name] += float(np.sum((y - y_ref) ** 2))
            ref2[name] += float(np.sum(y_ref**2))
        count += 1
    if count == 0:
        raise DataError("node_sensitivity got no feeds; pass a few calibration samples")
    scores = [(n, float(np.sqrt(err2[n] / max(ref2[n], 1e-30)))) for n in probes]
    scores.sort(key=lambda kv: kv[1], reverse=True)
    return scores[:top_k]
