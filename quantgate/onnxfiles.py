"""ONNX models past protobuf's 2 GB: saved with their weights in a file beside them.

Protobuf cannot serialize a message of 2 GB or more, and an ONNX model is one message with
its weights inside. Past that, exporters keep the weights in files beside the graph (ONNX
external data), and so must every model quantgate makes from such a model (its smoothed,
INT8 and FP16 graphs) and every session it opens on one held in memory. ``save`` writes a
model either way, as it must; ``too_large`` tells a model that could not be written whole
(read from its tensors' shapes: weights left beside a model loaded without them count);
``external_locations`` the files a saved model keeps its weights in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

# Weights past this many bytes make a model too large to serialize whole: protobuf's 2 GiB,
# less a margin for the graph itself (its nodes, names and shapes).
INLINE_LIMIT = 2**31 - 2**26


def too_large(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s weights (its initializers, by their shapes and types: protobuf
    cannot size one of 2 GB itself) pass INLINE_LIMIT."""
    return sum(_nbytes(t) for t in model.graph.initializer) >= INLINE_LIMIT


def _nbytes(tensor: onnx.TensorProto) -> int:
    """The bytes ``tensor`` holds, by its shape (strings by their lengths; a 4-bit type is
    counted a byte an element, erring large)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(map(len, tensor.string_data))
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError):  # a type numpy has no size for: what it holds in bytes
        return len(tensor.raw_data)
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def external_locations(path: str | Path) -> list[str]:
    """The files, relative to ``path``'s folder, that hold the weights of the model at
    ``path`` outside it: in initializers and tensor attributes, subgraphs and the model's
    local functions included."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = [*_tensors(model.graph)]
    for function in model.functions:  # ONNX Runtime's quantizers move Constants' out too
        tensors += _node_tensors(function.node)
    return sorted({ExternalDataInfo(t).location for t in tensors if uses_external_data(t)})


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of an ONNX graph that can hold weights: initializers (sparse ones too)
    and tensor attributes (Constant), subgraphs (If, Loop) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    kinds = onnx.AttributeProto
    for node in nodes:
        for a in node.attribute:
            if a.type == kinds.TENSOR:
                yield a.t
            elif a.type == kinds.TENSORS:
                yield from a.tensors
            elif a.type == kinds.GRAPH:
                yield from _tensors(a.g)
            elif a.type == kinds.GRAPHS:
                for g in a.graphs:
                    yield from _tensors(g)


def data_file(path: Path) -> Path:
    """Where ``save`` writes the weights of a model it writes at ``path``, beside it."""
    return path.with_name(path.name + ".data")


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` at ``path``: whole, or where ``too_large``, with its weights in one file
    beside it, named ``path``'s name + ``.data`` (they then leave ``model`` in memory: ONNX
    moves them out as it writes them)."""
    path = Path(path)
    if not too_large(model):
        onnx.save_model(model, str(path))
        return path
    data = data_file(path)
    data.unlink(missing_ok=True)  # onnx appends to a data file that is there
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data.name, size_threshold=1024,
    )  # fmt: skip
    return path


def gather(path: str | Path) -> None:
    """Rewrite the model at ``path`` as ``save`` writes it where its weights lie in several
    files beside it (torch's exporter writes one a tensor, named after it), and remove
    those files: a bundle holds a model and at most one weights file."""
    path = Path(path)
    locations = external_locations(path)
    if len(locations) < 2:
        return
    save(onnx.load(str(path)), path)  # the weights read into memory, then written out
    written = data_file(path).name  # (none where the model now fits inline)
    for location in locations:
        if location != written:
            (path.parent / location).unlink(missing_ok=True)


__all__ = ["INLINE_LIMIT", "external_locations", "gather", "save", "too_large"]
