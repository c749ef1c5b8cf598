"""Tensors between the wire and numpy: KServe v2 datatypes, raw contents, typed contents.

Inputs are accepted as ``raw_input_contents`` (what tritonclient and perf_analyzer send)
or as typed ``contents``; outputs always go back raw (little-endian, row-major), the only
form tritonclient decodes. An output asked for with ``class_count`` (Triton's
classification extension) goes back as BYTES: its top classes as strings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quantgate.errors import BadRequest, InferenceFailed
from quantgate.protos import grpc_service_pb2 as pb
from quantgate.protos import model_config_pb2 as mc
from quantgate.serve.config import MAX_CLASS_COUNT
from quantgate.serve.dtypes import NUMPY, cast_exact, datatype

# The InferTensorContents field that carries each datatype in typed form (not raw).
# FP16 has none: it travels raw only, as in Triton.
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
# KServe v2 datatype -> (numpy dtype, Triton's model-config enum, typed contents field).
DATATYPES: dict[str, tuple[np.dtype, mc.DataType, str]] = {
    name: (dtype, mc.DataType.Value(f"TYPE_{name}"), _CONTENTS.get(name, ""))
    for name, dtype in NUMPY.items()
}


# Strings (the classification extension's answers): raw, each element its length (uint32,
# little-endian), then its bytes.
BYTES = "BYTES"


def config_type(dtype: np.dtype) -> mc.DataType:
    """Triton's model-config DataType enum value for a numpy dtype."""
    return DATATYPES[datatype(dtype)][1]


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors as numpy arrays (zero-copy views of raw contents).

    Checks what can be checked without the model: known datatype, non-negative shape,
    byte size matching shape, one raw buffer per input (all inputs raw or all typed), no
    input named twice, no shared memory. Raises BadRequest naming the input and what was
    expected.
    """
    raw = request.raw_input_contents
    for tensor in request.inputs:
        if tensor.parameters:  # (most requests have none: no call, no message made)
            _check_tensor_parameters(f"input {tensor.name!r}", tensor.parameters, {})
        if raw and tensor.HasField("contents"):
            raise BadRequest(
                f"input {tensor.name!r} has typed contents but the request also carries "
                "raw_input_contents; send every input one way: all in raw_input_contents "
                "(one buffer per input, in the order of `inputs`) or all in contents"
            )
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; "
            "send one raw buffer per input, in the order of `inputs`"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise BadRequest(f"input {name!r} appears twice in the request; send it once")
        if tensor.datatype == "BYTES":  # text sent to a text model, most likely
            raise BadRequest(
                f"input {name!r}: BYTES (strings) are not taken: the server runs the model on "
                "numeric tensors, a text model on token ids. Tokenize on the client: "
                "`quantgate infer -t TEXT --bundle BUNDLE` does, with the bundle's tokenizer"
            )
        if tensor.datatype not in DATATYPES:
            raise BadRequest(
                f"input {name!r}: unsupported datatype {tensor.datatype!r}; "
                f"expected one of {', '.join(DATATYPES)}"
            )
        dtype, _, field = DATATYPES[tensor.datatype]
        shape = tuple(tensor.shape)
        if shape and min(shape) < 0:
            raise BadRequest(
                f"input {name!r}: shape {list(shape)} has a negative dimension; a request's "
                "shape is that of the tensor it sends, each dimension 0 or more (-1 marks a "
                "variable axis in ModelMetadata, not in a request)"
            )
        count = math.prod(shape)
        if raw:
            data = raw[i]
            if len(data) != count * dtype.itemsize:
                raise BadRequest(
                    f"input {name!r}: {len(data)} bytes of raw contents, expected "
                    f"{count * dtype.itemsize} for {tensor.datatype} of shape {list(shape)}"
                )
            array = np.frombuffer(data, dtype=dtype)
        else:
            array = typed_contents(f"input {name!r}", tensor, field, count)
        try:
            arrays[name] = array.reshape(shape)
        except ValueError as e:  # e.g. a zero-size shape whose other dims overflow
            raise BadRequest(
                f"input {name!r}: shape {list(shape)} is larger than any array can be (numpy: "
                f"{e}); send the shape of the contents the request carries"
            ) from e
    return arrays


def requested_outputs(request: pb.ModelInferRequest) -> dict[str, int]:
    """The outputs the request asks for (empty: all of them), each with the number of
    classes Triton's classification extension asks of it (0: the tensor itself).

    Refuses what the server cannot do rather than answer something else: shared memory, a
    class count that is no positive integer, one output asked for in two ways.
    """
    wanted: dict[str, int] = {}
    for output in request.outputs:
        count = _class_count(output) if output.parameters else 0  # most requests: none
        if wanted.setdefault(output.name, count) != count:
            raise BadRequest(
                f"output {output.name!r} is requested twice, as the tensor and as its top "
                "classes (or with two class counts); one response holds it once: ask for it "
                "one way"
            )
    return wanted


def classify(
    name: str,
    array: np.ndarray,
    count: int,
    *,
    batched: bool,
    labels: Sequence[str] = (),
) -> np.ndarray:
    """Triton's classification extension: the ``count`` largest values of each row of an
    output, largest first, as strings ``"value:index"``, floats with 6 decimals as Triton
    prints them. A row is everything after the batch axis, flattened.

    ``labels``, the model's class names, are added (``"value:index:label"``) to an output
    whose rows hold one value per class: the classifier's logits, not its other outputs.
    Returns a BYTES tensor (an object array of bytes) of shape (batch, min(count, row)), or
    (min(count, row),) for a model without a batch axis.
    """
    if array.dtype.kind not in "iuf":
        raise BadRequest(
            f"output {name!r} is {datatype(array.dtype)}: classification needs numbers; "
            "request it without class_count"
        )
    if batched and array.ndim:
        rows = array.reshape(len(array), math.prod(array.shape[1:]))
    else:
        rows = array.reshape(1, array.size)
    top = _largest_first(rows)[:, :count]
    values = np.take_along_axis(rows, top, axis=1)
    text = "{:.6f}".format if array.dtype.kind == "f" else str
    named = len(labels) == rows.shape[1]
    strings = np.empty(top.size, dtype=object)
    strings[:] = [
        f"{text(v)}:{i}:{labels[i]}".encode() if named else f"{text(v)}:{i}".encode()
        for v, i in zip(values.ravel().tolist(), top.ravel().tolist(), strict=True)
    ]
    shaped = strings.reshape(top.shape)
    return shaped if batched and array.ndim else shaped[0]


def _largest_first(rows: np.ndarray) -> np.ndarray:
    """Each row's indices by value, largest first; equal values in index order, NaN last.

    Sorting the reversed row ascending and reading the result backwards keeps integers
    exact (negating them would overflow unsigned ones; float64 rounds int64 above 2**53).
    """
    if rows.dtype.kind == "f":
        rows = np.where(np.isnan(rows), -np.inf, rows)
    backwards = np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1]
    return rows.shape[1] - 1 - backwards


# A request's parameters (Triton's), and what this server does with each: what it cannot
# honour is refused, so that a client does not believe it was.
_SEQUENCE = (
    "sequence batching is not supported: the models served here are stateless and every "
    "request stands alone; send it without sequence_id, sequence_start and sequence_end"
)
_REQUEST_PARAMETERS = {
    "timeout": "microseconds the request may wait for its turn (as its gRPC deadline)",
    "priority": "0 only: requests are served first come, first served",
    "triton_enable_empty_final_response": "for decoupled models; every answer here is final",
}


MAX_TIMEOUT_US = 86_400 * 10**6  # a request's timeout parameter: a day at most


def request_timeout(request: pb.ModelInferRequest) -> float | None:
    """The request's ``timeout`` parameter in seconds (Triton's, sent in microseconds;
    None where absent or 0); a BadRequest for any parameter the server cannot honour:
    sequences, a priority, a key it does not know."""
    timeout = None
    for key, p in request.parameters.items():
        kind = p.WhichOneof("parameter_choice")
        value: Any = getattr(p, kind) if kind else None
        if key.startswith("sequence_"):
            raise BadRequest(f"request parameter {key!r}: {_SEQUENCE}")
        if key == "timeout":
            if kind not in ("int64_param", "uint64_param") or not 0 <= value <= MAX_TIMEOUT_US:
                raise BadRequest(
                    "request parameter 'timeout' must be a whole number of microseconds "
                    f"from 0 to {MAX_TIMEOUT_US} (a day), found {str(p).strip() or 'nothing'}; "
                    "leave it out for no timeout"
                )
            timeout = value / 1e6 if value else None
        elif key == "priority":
            if kind not in ("int64_param", "uint64_param") or value != 0:
                raise BadRequest(
                    f"request parameter 'priority' {value!r}: this server has one priority "
                    "level and serves requests first come, first served; leave it unset"
                )
        elif key not in _REQUEST_PARAMETERS:
            understood = "; ".join(f"{k}: {what}" for k, what in _REQUEST_PARAMETERS.items())
            raise BadRequest(
                f"request parameter {key!r} is not one this server honours ({understood}); "
                "leave it out"
            )
    return timeout


# What to do instead of shared memory, which this server does not offer (its RPCs and its
# parameters alike).
USE_THE_MESSAGES = (
    "send inputs in the request (raw_input_contents) and read outputs from the response"
)


_OUTPUT_PARAMETERS = {"classification": "the number of top classes to return"}
# Said by HTTP clients of the protocol; over gRPC every tensor travels as bytes already.
_IGNORED_TENSOR_PARAMETERS = ("binary_data",)


def _class_count(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    """The classes an output's parameters ask for (0: the tensor itself), once they are
    parameters the server honours."""
    where = f"output {output.name!r}"
    _check_tensor_parameters(where, output.parameters, _OUTPUT_PARAMETERS)
    if "classification" not in output.parameters:
        return 0
    p = output.parameters["classification"]
    if (
        p.WhichOneof("parameter_choice") != "int64_param"
        or not 1 <= p.int64_param <= MAX_CLASS_COUNT
    ):
        raise BadRequest(
            f"{where}: parameter 'classification' must be an int64 from 1 to "
            f"{MAX_CLASS_COUNT} (the number of classes to return), found "
            f"{str(p).strip() or 'nothing'}"
        )
    return p.int64_param


def _check_tensor_parameters(
    where: str, parameters: Mapping[str, pb.InferParameter], understood: Mapping[str, str]
) -> None:
    """A BadRequest for a tensor's parameter the server would not honour: shared memory, or
    one it does not know (rather than answer as if it had been honoured)."""
    if any(key.startswith("shared_memory_") for key in parameters):
        raise BadRequest(
            f"{where}: shared memory (parameter 'shared_memory_region') is not supported; "
            + USE_THE_MESSAGES
        )
    for key in parameters:
        if key not in understood and key not in _IGNORED_TENSOR_PARAMETERS:
            known = "; ".join(f"{k}: {what}" for k, what in understood.items())
            raise BadRequest(
                f"{where}: parameter {key!r} is not one this server honours"
                + (f" ({known})" if known else " (a tensor here takes none)")
                + "; leave it out"
            )


def typed_contents(where: str, tensor, field: str, count: int) -> np.ndarray:
    """A tensor sent in ``contents`` (the typed repeated fields) instead of raw bytes: an
    input of a request, or an output of another server's answer (``where`` names it)."""
    if not field:
        raise BadRequest(
            f"{where}: {tensor.datatype} has no typed contents field; send it in raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        raise BadRequest(
            f"{where}: values in contents.{others[0]}, but datatype "
            f"{tensor.datatype} travels in contents.{field}; send them there, or set the "
            "datatype that matches the values"
        )
    if len(values) != count:
        raise BadRequest(
            f"{where}: {len(values)} values in contents.{field}, "
            f"expected {count} for {tensor.datatype} of shape {list(tensor.shape)}"
        )
    try:  # the wire type is wider: refuse, never wrap
        return cast_exact(np.asarray(values), tensor.datatype)
    except ValueError as e:
        raise BadRequest(f"{where}: in contents.{field}, {e}") from e


def _tag(message, field: str) -> bytes:
    """The wire tag of a length-delimited (wire type 2) ``field`` of ``message``, by the
    field number grpc_service.proto gives it: one byte, for numbers below 16."""
    number = message.DESCRIPTOR.fields_by_name[field].number
    assert number < 16, (message.DESCRIPTOR.name, field, number)
    return bytes([number << 3 | 2])


_RAW_OUTPUT_TAG = _tag(pb.ModelInferResponse, "raw_output_contents")  # bytes, 6
_INFER_RESPONSE_TAG = _tag(pb.ModelStreamInferResponse, "infer_response")  # message, 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_response(response: pb.ModelInferResponse, outputs: dict[str, np.ndarray]) -> bytes:
    """``response`` with ``outputs`` appended as raw contents, serialized.

    The tensors are written straight after the serialized header fields, each as one
    ``raw_output_contents`` field: one copy of the output bytes instead of three (tobytes,
    into the message, serialize), which for MiniLM's 196 KB of hidden states is most of
    what encoding a response costs. Protobuf parsers accept fields in any order, so the
    bytes decode to the same message as appending the contents and serializing.
    """
    arrays = []
    for name, array in outputs.items():
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = BYTES if array.dtype == object else datatype(array.dtype)
        tensor.shape.extend(array.shape)
        if array.dtype == object:
            arrays.append(memoryview(encode_bytes(array)))
        else:
            arrays.append(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)
    chunks = [response.SerializeToString()]
    for data in arrays:
        chunks += (_RAW_OUTPUT_TAG, _varint(data.nbytes), data)
    return b"".join(chunks)


def wire_sizes(outputs: dict[str, np.ndarray]) -> dict[str, int]:
    """Each output's bytes in a response: a BYTES tensor's length-prefixed strings, not
    its object array's pointers (Triton's classification answers)."""
    return {
        name: len(encode_bytes(a)) if a.dtype == object else a.nbytes for name, a in outputs.items()
    }


def encode_bytes(array: np.ndarray) -> bytes:
    """A BYTES tensor's raw contents: row-major, each element length-prefixed."""
    return b"".join(len(b).to_bytes(4, "little") + b for b in array.reshape(-1))


def decode_bytes(raw: bytes, shape: Sequence[int]) -> np.ndarray:
    """The elements of a BYTES tensor's raw contents, as an object array of ``bytes``."""
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        n = int.from_bytes(raw[pos : pos + 4], "little")
        if pos + 4 + n > len(raw):  # n >= 0 (unsigned): also when under 4 bytes remain
            raise InferenceFailed(
                f"BYTES contents end inside element {len(items)}: {len(raw)} bytes, element "
                f"at byte {pos} says {n} long"
            )
        items.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return bytes_array(items, shape, "BYTES contents")


def bytes_array(items: Sequence[bytes], shape: Sequence[int], where: str) -> np.ndarray:
    """``items`` as an object array of ``shape``; InferenceFailed where they do not fill it
    (``where`` names them)."""
    if len(items) != math.prod(shape):
        raise InferenceFailed(
            f"{where} hold {len(items)} elements, shape {list(shape)} needs {math.prod(shape)}"
        )
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(tuple(shape))


# Triton marks every answer in a stream with whether it is the request's last (a decoupled
# model may send several); here each is, and a Triton client that reads until the flag
# (``parameters["triton_final_response"].bool_param``) would otherwise wait forever. A
# serialized map entry of ModelInferResponse.parameters, appended to a response's bytes:
# protobuf reads a message's fields in any order, and the map's entries wherever they are.
FINAL = {"triton_final_response": pb.InferParameter(bool_param=True)}
_FINAL_ENTRY = pb.ModelInferResponse(parameters=FINAL).SerializeToString()

# What stream_response adds to a response: its field's tag and length (a varint of at most
# 5 bytes for any message gRPC sends), and the final flag.
STREAM_FRAMING = len(_INFER_RESPONSE_TAG) + 5 + len(_FINAL_ENTRY)


def stream_response(infer_response: bytes) -> bytes:
    """A serialized ModelStreamInferResponse carrying an already serialized response,
    marked as the request's final answer."""
    n = len(infer_response) + len(_FINAL_ENTRY)
    return b"".join((_INFER_RESPONSE_TAG, _varint(n), infer_response, _FINAL_ENTRY))


def serialize(message) -> bytes:
    """gRPC response serializer that passes bytes from ``encode_response`` through."""
    return message if isinstance(message, bytes) else message.SerializeToString()
