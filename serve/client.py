"""A small client: numpy in, numpy out, over quantgate's own gRPC stubs.

    with Client("localhost:8001") as c:
        logits = c.infer("digits", {"input_ids": ids, "attention_mask": mask})["logits"]

It needs neither onnxruntime nor tritonclient (whose protobuf symbols would collide with
ours in one process). Server errors come back as quantgate's typed errors (BadRequest,
ModelNotFound, Unavailable, ...) carrying the server's message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from quantgate.errors import BadRequest, ConfigError
from quantgate.protos import grpc_service_pb2 as pb
from quantgate.protos import grpc_service_pb2_grpc as pb_grpc
from quantgate.serve import codec
from quantgate.serve.errors import from_status

RECEIVE_LIMIT = "grpc.max_receive_message_length"


@dataclass(frozen=True)
class ClientTLS:
    ca: Path | None = None  # PEM roots that signed the server; None: the system's
    cert: Path | None = None  # client certificate and key, for mutual TLS
    key: Path | None = None


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the TLS file {path}: {e.strerror or e}") from e


class Client:
    """A connection to a KServe v2 / Triton server (``url``: host:port). ``token`` is sent as
    ``authorization: Bearer TOKEN`` on every call; ``tls`` opens a TLS channel (mutual
    with a client certificate); ``timeout`` (seconds) is each call's deadline unless the call
    gives its own. Close it, or use it in a ``with`` block."""

    def __init__(
        self,
        url: str = "localhost:8001",
        *,
        token: str | None = None,
        tls: ClientTLS | None = None,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ):
        """``options``: gRPC channel arguments, e.g. ``[("grpc.keepalive_time_ms", n)]``.

        Answers of any size are received (gRPC's own default stops at 4 MiB): the server's
        ``--max-message-bytes`` (64 MiB by default) is the limit, and a hidden-state output
        passes 4 MiB at 16 rows of 256 tokens. ``options`` can set a lower one."""
        options = list({RECEIVE_LIMIT: -1, **dict(options)}.items())
        if tls is None:
            self._channel = grpc.insecure_channel(url, options=options)
        else:
            creds = grpc.ssl_channel_credentials(_read(tls.ca), _read(tls.key), _read(tls.cert))
            self._channel = grpc.secure_channel(url, creds, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_status(e.code(), e.details()) from None

    def live(self) -> bool:
        return self._call(self._stub.ServerLive, pb.ServerLiveRequest()).live

    def ready(self) -> bool:
        return self._call(self._stub.ServerReady, pb.ServerReadyRequest()).ready

    def statistics(self, model: str = "", version: str | int = "") -> pb.ModelStatisticsResponse:
        """Triton's per-model counters: cumulative count and nanoseconds of each phase."""
        request = pb.ModelStatisticsRequest(name=model, version=str(version))
        return self._call(self._stub.ModelStatistics, request)

    def metadata(self, model: str, version: str | int = "") -> pb.ModelMetadataResponse:
        """The model's inputs and outputs: names, datatypes, shapes (-1: any size)."""
        request = pb.ModelMetadataRequest(name=model, version=str(version))
        return self._call(self._stub.ModelMetadata, request)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: str | int = "",
        outputs: str | Sequence[str] = (),
        classes: int = 0,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (input name -> array); every output unless
        ``outputs`` names one or some. ``version``: the newest unless given.

        ``classes`` > 0 asks for each named output's top classes instead of the tensor
        (Triton's classification extension): an array of ``b"value:index:label"`` strings.

        The arrays returned are read-only views of the response's bytes (no copy);
        ``.copy()`` one to change it in place.
        """
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"inputs: expected a mapping of input name to array, such as "
                f"{{'input_ids': ids}}, found {type(inputs).__name__}"
            )
        if isinstance(outputs, str):
            outputs = (outputs,)
        request = pb.ModelInferRequest(model_name=model, model_version=str(version))
        for name, value in inputs.items():
            array = np.asarray(value)
            if array.dtype.byteorder == ">":  # (this package runs on little-endian hosts)
                array = array.astype(array.dtype.newbyteorder("<"))  # the wire's order, exactly
            try:
                datatype = codec.datatype(array.dtype)
            except KeyError:
                raise BadRequest(
                    f"input {name!r}: numpy dtype {array.dtype} has no KServe datatype; "
                    f"send one of {', '.join(codec.DATATYPES)} (for example "
                    "array.astype(np.float32))"
                ) from None
            request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        if classes and not outputs:
            raise BadRequest("classes needs the outputs to classify: name them in outputs")
        for name in outputs:
            output = request.outputs.add(name=name)
            if classes:
                output.parameters["classification"].int64_param = classes
        response = self._call(self._stub.ModelInfer, request, timeout)
        return {
            t.name: _decode(t, raw)
            for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }


def _decode(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes) -> np.ndarray:
    if tensor.datatype == codec.BYTES:
        return codec.decode_bytes(raw, tensor.shape)
    return np.frombuffer(raw, dtype=codec.DATATYPES[tensor.datatype][0]).reshape(
        tuple(tensor.shape)
    )
