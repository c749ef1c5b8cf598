"""Which graph inputs index which tables (token ids into an embedding), read from an ONNX
graph: the server refuses ids outside them, and the quantize stage checks data against
them where the model did not say its table sizes (a user's own module)."""

from __future__ import annotations

from pathlib import Path

import onnx


def index_limits(file: Path) -> dict[str, int]:
    """For each graph input used as row indices into a table (token ids into an embedding),
    the number of rows: its valid values are 0..rows-1.

    Found where the input, directly or through a Cast, is the indices of a Gather on axis 0
    of an initializer (also behind a DequantizeLinear) or the ids of ORT's fused
    EmbedLayerNormalization. ONNX Runtime answers an id past the table with an error, but
    reads a negative one from the end, and a fused graph's int32 Cast wraps large ones:
    neither is an error there, so the server checks. Inputs used otherwise are absent.
    """
    graph = onnx.load(str(file), load_external_data=False).graph
    rows = {i.name: i.dims[0] for i in graph.initializer if len(i.dims) == 2}
    for n in graph.node:  # a quantized table: its DequantizeLinear output has the rows too
        if n.op_type == "DequantizeLinear" and n.input[0] in rows:
            rows[n.output[0]] = rows[n.input[0]]
    inputs = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    source = {name: name for name in inputs}  # a tensor -> the graph input it carries
    for n in graph.node:
        if n.op_type == "Cast" and n.input[0] in inputs:
            source[n.output[0]] = n.input[0]
    limits: dict[str, int] = {}

    def limit(ids: str, table: str) -> None:
        if ids in source and table in rows:
            name = source[ids]
            limits[name] = min(limits.get(name, rows[table]), rows[table])

    for n in graph.node:
        if n.op_type == "Gather" and len(n.input) == 2:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if axis == 0:
                limit(n.input[1], n.input[0])
        elif n.op_type == "EmbedLayerNormalization":
            ins = list(n.input) + [""] * 5
            limit(ins[0], ins[2])  # input_ids -> word_embedding
            limit(ins[1], ins[4])  # segment_ids -> segment_embedding
    return limits


__all__ = ["index_limits"]
