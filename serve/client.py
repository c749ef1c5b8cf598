"""A small client: numpy in, numpy out, over quantgate's own gRPC stubs.

    with Client("localhost:8001") as c:
        logits = c.infer("digits", {"input_ids": ids, "attention_mask": mask})["logits"]

It needs neither onnxruntime nor tritonclient (whose protobuf symbols would collide with
ours in one process). Server errors come back as quantgate's typed errors (BadRequest,
ModelNotFound, Unavailable, ...) carrying the server's message.

``request_inputs`` makes a request's arrays from token ids as lists (or arrays of another
dtype) by the model's metadata: cast exactly, and the attention mask and token types a
tokenizer would add.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from quantgate.errors import (
    BadRequest,
    ConfigError,
    DeadlineExceeded,
    InferenceFailed,
    QuantgateError,
    Unavailable,
)
from quantgate.protos import grpc_service_pb2 as pb
from quantgate.protos import grpc_service_pb2_grpc as pb_grpc
from quantgate.protos import model_config_pb2 as mc
from quantgate.serve import codec
from quantgate.serve.config import GRPC_TARGETS, token_problem, url_problem
from quantgate.serve.dtypes import NUMPY, cast_exact
from quantgate.serve.errors import from_status
from quantgate.serve.tls import CERT, KEY, check_pair, read_pem

RECEIVE_LIMIT = "grpc.max_receive_message_length"


class ConnectionFailed(Unavailable):
    """The client could not reach a gRPC server at its url (gRPC's UNAVAILABLE, raised by
    the channel, not answered by a server). ``cause`` is one of ``CAUSES``' keys, or
    "unknown"; ``what`` says what happened, without advice, for a caller (the CLI) that
    gives its own."""

    def __init__(self, message: str, cause: str, what: str):
        super().__init__(message)
        self.cause, self.what = cause, what
        # Nothing listens there now: run it again later (1). Otherwise the address or the
        # TLS flags given must change (2, bad input), as the message says.
        self.exit_code = 1 if cause == "refused" else 2


# gRPC's words for a request past the server's receive limit (sizes: the request's, the limit)
TOO_LARGE_REQUEST = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")

# What gRPC's details say when a channel cannot connect, by cause; the first that matches.
CAUSES: dict[str, re.Pattern] = {
    "unresolved": re.compile(r"errors resolving|DNS resolution failed|Domain name not found"),
    "refused": re.compile(r"Connection refused"),
    "untrusted": re.compile(r"CERTIFICATE_VERIFY_FAILED(?::\s*([^:()]+))?"),
    "hostname": re.compile(r"Peer name \S+ is not in peer certificate"),
    "not_tls": re.compile(r"WRONG_VERSION_NUMBER|packet length too long"),
    "not_grpc": re.compile(r"Failed parsing HTTP/2|Expected SETTINGS frame"),
    "closed": re.compile(r"Socket closed|Connection reset by peer|connection closed"),
}


@dataclass(frozen=True)
class ClientTLS:
    ca: Path | None = None  # PEM roots that signed the server; None: the system's
    cert: Path | None = None  # client certificate and key, for mutual TLS
    key: Path | None = None


def _credentials(tls: ClientTLS) -> grpc.ChannelCredentials:
    """``tls``'s files as gRPC's channel credentials, checked first as the server checks its
    own (``serve.tls``): a certificate without its key (or the reverse) made gRPC abort the
    whole process, and bad bytes fail every call later as though no server answered."""
    if (tls.cert is None) != (tls.key is None):
        given, missing = ("cert", "key") if tls.key is None else ("key", "cert")
        raise ConfigError(
            f"ClientTLS: a client {given} without its {missing}: mutual TLS needs both, the "
            "certificate and its private key"
        )

    def read(named: str, path: Path | None, marker: bytes) -> bytes | None:
        return None if path is None else read_pem(named, Path(path), marker, ConfigError)

    ca = read("the TLS CA certificate", tls.ca, CERT)
    cert = read("the TLS certificate", tls.cert, CERT)
    key = read("the TLS key", tls.key, KEY)
    if cert is not None and key is not None and tls.key is not None:
        check_pair(cert, key, cert=f"the certificate {tls.cert}", key=f"the TLS key {tls.key}",
                   key_file=Path(tls.key), error=ConfigError)  # fmt: skip
    return grpc.ssl_channel_credentials(ca, key, cert)


# The longest deadline gRPC sets: beyond (1e10 s), its deadline overflows into the past and
# every call fails at once, "Deadline Exceeded".
LONGEST_DEADLINE_S = 1e9


def deadline(timeout: float | None) -> float | None:
    """``timeout`` as a call's deadline: seconds > 0; None, infinity or more than
    ``LONGEST_DEADLINE_S`` (about 31 years) for none. gRPC reads 0 as no deadline and a
    negative one as one already passed: refused, as NaN is."""
    if timeout is None or timeout > LONGEST_DEADLINE_S:  # math.inf too
        return None
    if not timeout > 0:
        raise ConfigError(
            f"timeout: expected seconds > 0 (or None or math.inf, no deadline), found {timeout!r}"
        )
    return timeout


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
        if not isinstance(url, str):
            raise ConfigError(f"Client: url is HOST:PORT, a string; found {url!r}")
        if problem := url_problem(url):
            raise ConfigError(f"Client: url {url!r}: {problem}")
        if token and (problem := token_problem(token)):  # "" as None: no token, as before
            raise ConfigError(  # gRPC's own "Invalid metadata" named nothing
                f"Client: the token {problem}: a bearer token is printable ASCII without "
                "spaces (a token read from a file keeps its line break: strip it)"
            )
        options = list({RECEIVE_LIMIT: -1, **dict(options)}.items())
        if tls is None:
            self._channel = grpc.insecure_channel(url, options=options)
        else:
            self._channel = grpc.secure_channel(url, _credentials(tls), options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._url, self._tls = url, tls is not None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = deadline(timeout)
        self._closed = False
        self._max_batch_sizes: dict[tuple[str, str], int] = {}  # (model, version): Client.infer's

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def _call(self, method, request, timeout: float | None = None):
        if self._closed:  # gRPC says only "Cannot invoke RPC on closed channel!"
            raise ConfigError(f"this Client of {self._url} is closed: make another")
        timeout = self._timeout if timeout is None else deadline(timeout)
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            details = e.details() or ""
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                if failed := connection_failed(details, self._url, tls=self._tls):
                    raise failed from None
                if WENT_AWAY.search(details):  # gRPC's words, not the server's
                    raise Unavailable(
                        f"the server at {self._url} went away before answering ({details}): "
                        "it shut down (its --shutdown-grace ran out) or lost the connection. "
                        "Inference has no side effects: send it again, to another replica or "
                        "once this one is back."
                    ) from None
            # gRPC's own words, where no server answered in time (a server's say more)
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
                raise DeadlineExceeded(
                    f"no answer from {self._url} within the deadline of "
                    f"{timeout:g} s: the server is busy or the request slow "
                    "(give it longer: the call's timeout, `quantgate infer --timeout`), or what "
                    "listens there does not answer gRPC"
                ) from None
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and (
                m := TOO_LARGE_REQUEST.search(details)
            ):
                raise BadRequest(
                    f"the request is {int(m[1]):,} bytes, more than the server at {self._url} "
                    f"takes ({int(m[2]):,} bytes, its --max-request-bytes): send fewer rows "
                    "per request, or shorter ones"
                ) from None
            raise from_status(e.code(), details) from None

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

    def config(self, model: str, version: str | int = "") -> mc.ModelConfig:
        """The model's configuration as Triton gives it; quantgate's ``parameters`` add its
        task, the variant served (precision, file, sha256) and the execution provider."""
        request = pb.ModelConfigRequest(name=model, version=str(version))
        return self._call(self._stub.ModelConfig, request).config

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

        Rows past the model's max batch size (its ``config``, asked once per model and
        version) are sent in requests of that size, one after the other, each with the
        call's deadline, and their answers joined. The arrays returned are read-only views
        of the response's bytes (no copy) where one request was sent; ``.copy()`` one to
        change it in place.
        """
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"inputs: expected a mapping of input name to array, such as "
                f"{{'input_ids': ids}}, found {type(inputs).__name__}"
            )
        if isinstance(outputs, str):
            outputs = (outputs,)
        if classes and not outputs:
            raise BadRequest("classes needs the outputs to classify: name them in outputs")
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        lengths = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
        rows = lengths.pop() if len(lengths) == 1 else 0
        step = self._max_batch(model, version, rows)
        if not step:  # the server takes them whole, or says what is wrong with them
            return self._infer(model, arrays, version, outputs, classes, timeout)
        parts = [
            self._infer(model, {k: a[i : i + step] for k, a in arrays.items()}, version,
                        outputs, classes, timeout)
            for i in range(0, rows, step)
        ]  # fmt: skip
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _max_batch(self, model: str, version: str | int, rows: int) -> int:
        """The rows of one request where ``rows`` are more than ``model`` takes in one, else
        0. Only then is its ModelConfig asked (kept for the next call); a server without
        Triton's ModelConfig (another KServe v2 server's) is sent the rows whole."""
        if rows <= 1:
            return 0
        key = (model, str(version))
        if key not in self._max_batch_sizes:
            try:
                largest = self.config(model, version).max_batch_size
            except QuantgateError as e:
                if not str(e).startswith(grpc.StatusCode.UNIMPLEMENTED.name):
                    raise
                largest = 0
            self._max_batch_sizes[key] = largest  # 0: not batched, a request is the input
        largest = self._max_batch_sizes[key]
        return largest if 0 < largest < rows else 0

    def _infer(
        self,
        model: str,
        arrays: Mapping[str, np.ndarray],
        version: str | int,
        outputs: Sequence[str],
        classes: int,
        timeout: float | None,
    ) -> dict[str, np.ndarray]:
        request = pb.ModelInferRequest(model_name=model, model_version=str(version))
        for name, array in arrays.items():
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
        for name in outputs:
            output = request.outputs.add(name=name)
            if classes:
                output.parameters["classification"].int64_param = classes
        response = self._call(self._stub.ModelInfer, request, timeout)
        return _outputs(response, self._url)


class InputRefused(BadRequest):
    """An input ``request_inputs`` will not send as given. ``name`` is the input, ``cause``
    one of ``CAUSES``, and ``what`` says what is wrong without naming the input, for a
    caller (the CLI) that names it its own way."""

    CAUSES = ("unknown", "datatype", "ragged", "not_numbers", "rank", "inexact")

    def __init__(self, name: str, cause: str, what: str):
        super().__init__(f"input {name!r}: {what}")
        self.name, self.cause, self.what = name, cause, what


# What a tokenizer adds beside input_ids: every token attended, one segment.
_TOKENIZER_FILLS = (("attention_mask", np.ones_like), ("token_type_ids", np.zeros_like))


def request_inputs(
    metadata: pb.ModelMetadataResponse, given: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The inputs of one request to the model ``metadata`` describes (``Client.metadata``),
    made from ``given``: input name -> an array, or nested lists of numbers such as
    ``[[5, 7, 9]]``. Each becomes its input's datatype where every value fits it exactly
    (5.5 is never sent as 5, nor 300 as an INT8's 44). Where ``input_ids`` is given and the
    model also takes them, a missing ``attention_mask`` is all ones and a missing
    ``token_type_ids`` all zeros, as a tokenizer makes them.

    Raises ``InputRefused`` (a ``BadRequest``) for a name that is none of the model's
    inputs, a datatype this client cannot make (BYTES), rows of different lengths, values
    that are not numbers (true/false but for a BOOL input) or do not fit, and a value of
    another rank than the input's (one row without its batch axis); other shapes are the
    server's to check."""
    spec = {t.name: t for t in metadata.inputs}
    feeds = {}
    for name, value in given.items():
        if name not in spec:
            raise InputRefused(name, "unknown", f"the model's inputs are {sorted(spec)}")
        feeds[name] = _input_array(name, value, spec[name].datatype, len(spec[name].shape))
    if "input_ids" in feeds:
        for name, fill in _TOKENIZER_FILLS:
            if name in spec and name not in feeds:
                dtype = _numpy_dtype(name, spec[name].datatype)
                feeds[name] = fill(feeds["input_ids"], dtype=dtype)
    return feeds


def _numpy_dtype(name: str, datatype: str) -> np.dtype:
    """The numpy dtype of input ``name``'s KServe ``datatype`` (BYTES has none)."""
    if datatype not in NUMPY:
        raise InputRefused(name, "datatype", f"is {datatype}, which request_inputs cannot make")
    return NUMPY[datatype]


def _input_array(name: str, value: Any, datatype: str, rank: int) -> np.ndarray:
    """``value`` as an array of ``datatype`` (never rounded, never wrapped) and ``rank``."""
    _numpy_dtype(name, datatype)  # BYTES and other types the client cannot make: refused first
    try:
        array = np.asarray(value)
    except ValueError as e:
        raise InputRefused(
            name,
            "ragged",
            "its rows differ in length; the rows of a batch have one length (pad short rows "
            "with 0, and 0 in attention_mask)",
        ) from e
    if array.dtype.kind not in "biuf":  # strings, nulls, integers beyond 64 bits
        raise InputRefused(name, "not_numbers", f"expected numbers that fit {datatype}")
    if datatype != "BOOL" and (array.dtype.kind == "b" or _holds_bool(value)):
        # numpy makes [True, 1] the integers [1, 1]: a JSON true is no token id
        raise InputRefused(
            name, "not_numbers", f"expected numbers that fit {datatype}, not true/false"
        )
    if array.ndim != rank:  # one row without its batch, say, or a number alone
        expected = (
            f"{rank} dimension{'' if rank == 1 else 's'}, the first the batch"
            if rank
            else "a single value"
        )
        got = f"{array.ndim} dimension{'' if array.ndim == 1 else 's'}"
        raise InputRefused(name, "rank", f"expected {expected}, got {got}")
    try:
        return cast_exact(array, datatype)
    except ValueError as e:
        raise InputRefused(name, "inexact", str(e)) from e


def _holds_bool(value: Any) -> bool:
    """Whether nested lists ``value`` hold a bool anywhere (an array says it by its dtype)."""
    if isinstance(value, (list, tuple)):
        return any(_holds_bool(v) for v in value)
    return isinstance(value, (bool, np.bool_))


# What gRPC says of a call whose server stopped before it answered: cancelled at the end of
# its grace, or a connection closed under it.
WENT_AWAY = re.compile(r"Cancelling all calls|GOAWAY|Stream removed|Socket closed")


def connection_failed(details: str, url: str, *, tls: bool) -> ConnectionFailed | None:
    """The ConnectionFailed that gRPC's UNAVAILABLE ``details`` describe, for a channel to
    ``url`` (with ``tls`` or not); None where a server answered UNAVAILABLE itself (a full
    queue, a drain), which its own message explains."""
    cause = next((c for c, pattern in CAUSES.items() if pattern.search(details)), None)
    if "failed to connect" not in details and cause in (None, "closed"):
        return None  # a connection lost mid-call (a server going away) is no TLS mistake
    host = _host(url)
    verify = CAUSES["untrusted"].search(details)
    why = (verify.group(1) or "").strip() if verify else ""
    what, advice = {
        "unresolved": (
            f"cannot connect to {url}: the host {host} does not resolve to an address",
            "Check the host name in the url.",
        ),
        "refused": (
            f"cannot connect to {url}: nothing listens there (connection refused)",
            "Start a server with `quantgate serve BUNDLE`, or give the url of a running one.",
        ),
        "untrusted": (
            f"the server at {url} serves TLS with a certificate this client does not trust "
            f"(CERTIFICATE_VERIFY_FAILED{': ' + why if why else ''})",
            "Give the CA that signed it (a self-signed certificate is its own): "
            "Client(url, tls=ClientTLS(ca=Path('ca.pem'))).",
        ),
        "hostname": (
            f"the certificate of the server at {url} does not name {host}",
            "Connect by a name its certificate holds, or have it given one for this name.",
        ),
        "not_tls": (
            f"the server at {url} does not serve TLS: it answered the TLS handshake in "
            "plaintext (WRONG_VERSION_NUMBER)",
            "Connect without TLS: Client(url) with no tls.",
        ),
        "not_grpc": (
            f"the server at {url} answers HTTP/1, not gRPC (HTTP/2): it looks like a "
            "server's metrics port (serve --metrics-port), not its gRPC port (serve --port, "
            "8001 by default)",
            "Give the url of the gRPC port.",
        ),
        "closed": (
            f"the server at {url} closed the connection without answering"
            + ("" if tls else "; a server that serves TLS does so to a plaintext client"),
            "Connect with TLS: Client(url, tls=ClientTLS(ca=Path('ca.pem')))."
            if not tls
            else "If it asks for a client certificate (mutual TLS), give one: "
            "ClientTLS(ca=..., cert=Path('client.pem'), key=Path('client.key')); else see the "
            "server's log for why.",
        ),
        None: (
            f"cannot connect to {url} ({details})",
            "Check that a server runs there: `quantgate serve BUNDLE` starts one.",
        ),
    }[cause]
    return ConnectionFailed(f"{what}. {advice}", cause or "unknown", what)


def _host(url: str) -> str:
    """The host name in ``url``: HOST:PORT's, or that of one of gRPC's own targets
    (dns:///HOST:PORT, dns://RESOLVER/HOST:PORT, ipv4:ADDR:PORT)."""
    target = url
    if prefix := next((p for p in GRPC_TARGETS if url.startswith(p)), None):
        target = url[len(prefix) :]
        if target.startswith("//"):  # an authority: the resolver to ask, then the name
            target = target[2:].partition("/")[2]
    return target.rsplit(":", 1)[0] if ":" in target else target


def _outputs(response: pb.ModelInferResponse, url: str) -> dict[str, np.ndarray]:
    """The arrays of ``response``, in raw contents (as quantgate and Triton answer) or in
    typed ``contents`` (as other KServe v2 servers may). An answer that does not hold what
    it says (a shape its bytes do not fill, an unknown datatype, an output missing) is an
    InferenceFailed naming it, never numpy's error from deep inside the decoding."""
    raw, outputs = response.raw_output_contents, response.outputs
    try:
        if raw and len(raw) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs, but {len(raw)} raw_output_contents")
        return {t.name: _decode(t, raw[i] if raw else None) for i, t in enumerate(outputs)}
    except (ValueError, KeyError, BadRequest, InferenceFailed) as e:
        said = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise InferenceFailed(
            f"the answer of the server at {url} is malformed: {said}. It does not answer as "
            "the KServe v2 protocol says: check what serves that port"
        ) from None


def _decode(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes | None) -> np.ndarray:
    """One output, from its raw bytes, or (None) from its typed contents."""
    name, shape = tensor.name, tuple(tensor.shape)
    if tensor.datatype not in codec.DATATYPES and tensor.datatype != codec.BYTES:
        raise ValueError(f"output {name!r}: unknown datatype {tensor.datatype!r}")
    if any(d < 0 for d in shape):
        raise ValueError(f"output {name!r}: shape {list(shape)} has a negative dimension")
    if raw is None and tensor.datatype == codec.BYTES:  # typed: contents.bytes_contents
        items = list(tensor.contents.bytes_contents)
        return codec.bytes_array(items, shape, f"output {name!r}: contents.bytes_contents")
    if raw is None:  # typed contents: what a request's would be, with the same checks
        dtype_field = codec.DATATYPES[tensor.datatype][2]
        if not dtype_field:
            raise ValueError(
                f"output {name!r}: {tensor.datatype} travels only in raw contents, and the "
                "answer has none"
            )
        values = codec.typed_contents(f"output {name!r}", tensor, dtype_field, math.prod(shape))
        return values.reshape(shape)
    if tensor.datatype == codec.BYTES:
        return codec.decode_bytes(raw, shape)
    dtype = codec.DATATYPES[tensor.datatype][0]
    if len(raw) != math.prod(shape) * dtype.itemsize:
        raise ValueError(
            f"output {name!r}: {tensor.datatype} of shape {list(shape)} needs "
            f"{math.prod(shape) * dtype.itemsize} bytes, found {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
