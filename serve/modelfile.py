"""A variant's model file, read once: the bytes whose sha256 is checked against the
manifest are the bytes ONNX Runtime builds the session from.

Checking the file by its path and then handing ONNX Runtime the path would let a bundle
replaced in between (a re-export renames a new folder into place) be served unchecked.
``read_verified`` reads the file into memory, hashes that copy and returns it with the
file's stamp (``watch.file_stamp``); ``unchanged`` says whether the path still names that
file, for what must still read it by path (``tables.index_limits``, and a model whose
weights are ONNX external data: ``external_data``).

This module never imports torch or quantgate.quantize: a serving host has neither.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from quantgate.errors import BundleError
from quantgate.serve.watch import file_stamp, stamp


def read_verified(path: Path, sha256: str) -> tuple[bytes, tuple[int, int, int]]:
    """The file's bytes, once their sha256 is ``sha256``, and the stamp of the file read.
    BundleError where it cannot be read or its bytes are not the manifest's."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        raise BundleError(
            f"cannot read {path} ({e.strerror or e}), though it was read when the bundle was "
            "verified: the bundle was changed or removed while the server started. Start it "
            "again."
        ) from e
    if (digest := hashlib.sha256(data).hexdigest()) != sha256:
        raise BundleError(
            f"{path} has sha256 {digest[:12]}..., the manifest read expects {sha256[:12]}...: the "
            "file was changed after export (restore it from the original bundle, or re-create "
            "it with `quantgate export`), or the bundle was replaced while the server started "
            "(a re-export: start it again to serve the new one)."
        )
    return data, file_stamp(st)


def unchanged(path: Path, read: tuple[int, int, int]) -> None:
    """BundleError unless ``path`` still names the file ``read_verified`` read (its stamp
    ``read``): what read it again by path read the bytes that were checked."""
    if stamp([path]) != (read,):
        raise BundleError(
            f"{path} was replaced while the server loaded it (a re-export?): what was "
            "verified may not be what was read. Start the server again."
        )


def release(session) -> None:
    """Drop the model bytes an ``onnxruntime.InferenceSession`` built from bytes keeps for
    its life (to build itself again in ``set_providers``, which the server never calls):
    the whole file, held twice over with ONNX Runtime's own copy of the weights."""
    if isinstance(getattr(session, "_model_bytes", None), bytes):
        session._model_bytes = None


# Where ONNX protobuf messages hold tensors, by field number (onnx.proto; checked against
# onnx's own descriptors in tests/serve/test_modelfile.py): message -> {field: message}.
_MODEL, _TRAINING, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _SPARSE, _TENSOR = range(8)
_HOLDS: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},  # attribute
    # t, g, tensors, graphs, sparse_tensor, sparse_tensors
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto (defaults)
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
}
_EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 13, 14, 1  # TensorProto's fields; EXTERNAL


def external_data(data: bytes) -> tuple[bool, set[str]]:
    """Whether the serialized ONNX model ``data`` keeps any tensor's values in a file
    beside it (ONNX external data: a TensorProto with ``data_location`` EXTERNAL or
    ``external_data`` entries), anywhere ONNX Runtime reads tensors from (initializers,
    attributes, subgraphs, functions), and the files it names (each entry's ``location``,
    relative to the model's folder).

    A walk of the protobuf wire format that steps over the tensors' values unread (no copy
    of the model, no parse of its weights: milliseconds). Bytes that are not a model answer
    (False, set()): ONNX Runtime then says what is wrong with them."""
    buf = memoryview(data)
    todo = [(_MODEL, 0, len(buf))]
    external, locations = False, set()
    try:
        while todo:
            kind, i, end = todo.pop()
            holds = _HOLDS.get(kind, {})
            while i < end:
                key, i = _varint(buf, i)
                field, wire = key >> 3, key & 7
                if wire == 0:
                    value, i = _varint(buf, i)
                    if kind == _TENSOR and field == _DATA_LOCATION and value == _EXTERNAL:
                        external = True
                elif wire == 2:
                    size, i = _varint(buf, i)
                    if kind == _TENSOR and field == _EXTERNAL_DATA:
                        external = True
                        entry = _entry(buf[i : i + size])
                        if entry.get("location") is not None:
                            locations.add(entry["location"])
                    if field in holds:
                        todo.append((holds[field], i, i + size))
                    i += size
                elif wire == 1:
                    i += 8
                elif wire == 5:
                    i += 4
                else:  # groups (3, 4): not in ONNX's messages
                    return False, set()
    except (IndexError, UnicodeDecodeError):  # truncated, or no model
        return False, set()
    return external, locations


def _entry(buf: memoryview) -> dict[str, str]:
    """A StringStringEntryProto (key = 1, value = 2) as {key: value}."""
    got: dict[int, str] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        if key & 7 != 2:
            raise IndexError  # not the entry's own wire types: no model
        size, i = _varint(buf, i)
        if i + size > len(buf):
            raise IndexError
        got[key >> 3] = bytes(buf[i : i + size]).decode()
        i += size
    return {got[1]: got.get(2, "")} if 1 in got else {}


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
