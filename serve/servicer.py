"""inference.GRPCInferenceService: protobuf in, numpy to the engine, protobuf out.

The servicer converts messages and maps errors to status codes; the engine does the
rest. Status codes follow Triton's:

    malformed request, wrong name/dtype/shape/byte size, batch too large  INVALID_ARGUMENT
    unknown model or version                                              NOT_FOUND
    queue full, warming up, shutting down                                 UNAVAILABLE
    the request's own `timeout` parameter ran out before it ran           UNAVAILABLE
    the call's deadline passed before the request ran                     DEADLINE_EXCEEDED
    client cancelled                                                      CANCELLED (by gRPC)
    request over --max-request-bytes (4 MiB)                              RESOURCE_EXHAUSTED (by gRPC)
    response over --max-message-bytes                                     RESOURCE_EXHAUSTED
    ONNX Runtime failed on a valid request                                INTERNAL
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar

import grpc
from google.protobuf.message import DecodeError

from quantgate import __version__
from quantgate.bundle import CUDA
from quantgate.errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    InferenceFailed,
    ModelNotFound,
    QuantgateError,
    Unavailable,
    quoted,
)
from quantgate.protos import grpc_service_pb2 as pb
from quantgate.protos import grpc_service_pb2_grpc as pb_grpc
from quantgate.protos import model_config_pb2 as mc
from quantgate.serve import codec
from quantgate.serve.batcher import Caller, bare
from quantgate.serve.engine import SHUTTING_DOWN, Engine, too_large
from quantgate.serve.errors import message_of, status_of
from quantgate.serve.metrics import DURATIONS, ModelStats
from quantgate.serve.repository import parse_version
from quantgate.serve.runtime import Model

log = logging.getLogger(__name__)

EXTENSIONS = ("classification", "model_configuration", "statistics")
# A call cancelled this close to its deadline is counted as DEADLINE_EXCEEDED: the client's
# own deadline fires first and cancels the call, before the deadline the server derived from
# it (as the call's headers arrived). Measured: 5-15 ms earlier, 20 concurrent requests on
# 2 cores; a 1 ms slack counted a third of those deadlines as CANCELLED.
DEADLINE_SLACK_S = 0.05
# gRPC reports a call without a deadline as one some billions of years away.
NO_DEADLINE_S = 1e9
# How often an idle stream looks whether the server is shutting down (ModelStreamInfer).
STREAM_POLL_S = 0.25
STREAM_WINDOW = 64  # a stream's answers computed and not yet sent; beyond, it reads no more
_SHUTDOWN = object()  # in a stream's answers: it is idle and the server is going away


class CallRecord:
    """What the access log says of a call beyond what gRPC knows, filled in by the servicer
    as the call runs: the model and version that answered, the rows, and for a request
    answered without an abort (cancelled, or past its deadline) its status code. A stream
    counts its requests (on the stream's threads, hence the lock)."""

    __slots__ = ("models", "versions", "rows", "code", "requests", "failed", "peer", "_lock")

    def __init__(self) -> None:
        self.models: dict[str, None] = {}  # in the order first seen (a stream may name several)
        self.versions: dict[str, None] = {}
        self.rows: int | None = None  # None: no request of the call ran to an answer
        self.code: str | None = None
        self.requests = self.failed = 0
        self.peer: str | None = None  # the client's address, taken when the call opens
        self._lock = threading.Lock()

    def request(self, model: Model | None, code: str, rows: int) -> None:
        """One inference request of the call ended with ``code``."""
        with self._lock:
            self.requests += 1
            self.code = code
            if model is not None:
                self.models[model.name] = self.versions[model.version] = None
            if code == "OK":
                self.rows = (self.rows or 0) + rows
            else:
                self.failed += 1


# The call's record while its handler runs (interceptors.AccessLog sets it); None: no access log.
CALL: ContextVar[CallRecord | None] = ContextVar("quantgate_call", default=None)


def _within_the_model(request: pb.ModelInferRequest, model: Model) -> None:
    """Refuse a request naming far more inputs or outputs than the model has, before any
    of them is read: thousands of empty entries are a few kilobytes on the wire and
    seconds of Python (the counts are known without reading them). A few too many are
    read, and the checks that follow name what is wrong with them."""
    for what, sent, has in (
        ("inputs", len(request.inputs), model.inputs),
        ("outputs", len(request.outputs), model.outputs),
    ):
        if sent > 2 * len(has) + 8:
            names = ", ".join(repr(t.name) for t in has)
            raise BadRequest(
                f"request names {sent} {what}; model {model.name!r} has {len(has)}: {names}"
            )


def _caller(context: grpc.ServicerContext) -> Caller:
    """The call's Caller, cancelled when gRPC ends the call (cancelled, expired or
    answered), or at once where the call has already ended."""
    caller = Caller()
    if not context.add_callback(caller.cancel):  # False: the call is over, no callback
        caller.cancel()
    return caller


def _time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds until the call's deadline; None when it has none."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE_S else left


PLATFORM = "onnxruntime_onnx"
NOT_READY = "the server is warming up or shutting down"

_NO_SHARED_MEMORY = "shared memory is not supported: " + codec.USE_THE_MESSAGES
# Triton's RPCs this server does not offer (ServerMetadata lists none of their extensions),
# and what to do instead: answered UNIMPLEMENTED with it, not gRPC's "Method not found!".
UNSUPPORTED = {
    "RepositoryModelLoad": "models load once, at start: add the bundle to the repository and "
    "restart `quantgate serve`",
    "RepositoryModelUnload": "models load once, at start: remove the bundle from the "
    "repository and restart `quantgate serve`",
    "SystemSharedMemoryStatus": _NO_SHARED_MEMORY,
    "SystemSharedMemoryRegister": _NO_SHARED_MEMORY,
    "SystemSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryStatus": _NO_SHARED_MEMORY,
    "CudaSharedMemoryRegister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "TraceSetting": "tracing is not supported: per-model timing is in ModelStatistics, and in "
    "the Prometheus metrics (--metrics-port)",
    "LogSettings": "log settings cannot change while serving: restart it as "
    "`quantgate -v serve ...` for verbose logs",
}


def unsupported(method: str):
    """A handler for Triton's RPC ``method`` that answers UNIMPLEMENTED and says why."""
    message = f"{method} is not supported by quantgate: {UNSUPPORTED[method]}"

    def handler(request: bytes, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return handler


def _aborts(method):
    """Turn quantgate errors raised by a unary handler into their status codes."""

    @functools.wraps(method)
    def handler(self, request, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except QuantgateError as e:
            context.abort(status_of(e), message_of(e))

    return handler


class Unsent:
    """Answers to unary calls made and not yet taken by their clients: gRPC holds an answer
    until the client's flow control lets it go, after the request thread is free. A client
    that never reads had the server hold every answer it asked for (a review's raw HTTP/2
    client: 76 answers, 1 GB), uncounted by the calls in flight. ``Overload`` counts these
    too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def hold(self, caller: Caller) -> None:
        """Count one answer of ``caller`` until its call ends (sent, cancelled, expired)."""
        with self._lock:
            self.count += 1
        if not caller.at_end(self._release):
            self._release()

    def _release(self) -> None:
        with self._lock:
            self.count -= 1


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, stream_threads: int):
        """The requests of open streams run on a pool of ``stream_threads``, each on a
        thread of its own so that requests of one stream can share a batch (unary requests
        run on gRPC's request threads). At most that many are in flight: a stream that
        sends faster than they are answered waits, and gRPC's flow control slows its
        client."""
        self._engine = engine
        self.unsent = Unsent()
        self.streams = ThreadPoolExecutor(stream_threads, thread_name_prefix="stream")
        self._stream_slots = threading.BoundedSemaphore(stream_threads)

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self._engine.ready)

    @_aborts  # a version that is no number: INVALID_ARGUMENT, as Triton answers it
    def ModelReady(self, request, context):
        try:
            self._engine.model(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._engine.ready)

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="quantgate", version=__version__, extensions=EXTENSIONS
        )

    @_aborts
    def ModelMetadata(self, request, context):
        m = self._engine.model(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=m.name,
            # the one asked for, else every version (Triton's answer)
            versions=[m.version] if request.version else self._engine.repository.versions(m.name),
            platform=PLATFORM,
            inputs=[
                tensor(name=t.name, datatype=codec.datatype(t.dtype), shape=t.shape)
                for t in m.inputs
            ],
            outputs=[
                tensor(name=t.name, datatype=codec.datatype(t.dtype), shape=t.shape)
                for t in m.outputs
            ],
        )

    @_aborts
    def ModelConfig(self, request, context):
        m = self._engine.model(request.name, request.version)
        return pb.ModelConfigResponse(config=self._config(m))

    @_aborts
    def ModelStatistics(self, request, context):
        if request.name:
            m = self._engine.model(request.name, request.version)
            models = (
                [m]
                if request.version
                else [
                    self._engine.model(m.name, v) for v in self._engine.repository.versions(m.name)
                ]
            )
        else:  # every model's, as Triton's; a version that is no number is still refused
            parse_version(request.version)
            models = list(self._engine.repository)
        return pb.ModelStatisticsResponse(
            model_stats=[_statistics(self._engine.stats[(m.name, m.version)]) for m in models]
        )

    def RepositoryIndex(self, request, context):
        # Every model of the repository is served (a folder that cannot be refuses the
        # start), so all share the server's state. The one repository has no name: a request
        # for a named one is refused, as Triton refuses it, not answered with this one.
        if request.repository_name:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"repository {quoted(request.repository_name)}: this server serves one model "
                "repository, which has no name; leave repository_name empty",
            )
        ready = self._engine.ready
        if request.ready and not ready:
            return pb.RepositoryIndexResponse()
        state = {"state": "READY"} if ready else {"state": "UNAVAILABLE", "reason": NOT_READY}
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(name=m.name, version=m.version, **state) for m in self._engine.repository]
        )

    def ModelInfer(self, request, context):
        caller = _caller(context)
        response, err = self._infer(request, _time_left(context), caller, CALL.get())
        if err is not None and not isinstance(err, Cancelled):  # Cancelled: nobody listens
            context.abort(status_of(err), message_of(err))
        if response is not None:
            self.unsent.hold(caller)
        return response

    def ModelStreamInfer(
        self, messages: Iterator[bytes], context
    ) -> Iterator[bytes | pb.ModelStreamInferResponse]:
        # The call's record is read here, as the call starts: the generator below runs
        # later, and its requests on the stream's threads.
        return self._stream(messages, context, CALL.get())

    def _stream(
        self, messages: Iterator[bytes], context, record: CallRecord | None
    ) -> Iterator[bytes | pb.ModelStreamInferResponse]:
        """Requests run concurrently (so they can share batches); answers keep request order.

        A failed request is answered in the stream with ``error_message``, as Triton does,
        and the stream stays open; a stream opened with Triton's header ``triton_grpc_error:
        true`` ends instead, with the error's status code. A message that is no ModelInferRequest ends the call with
        INVALID_ARGUMENT once the answers before it are sent (the server registers this
        method with serialized messages in, so that reading them is this reader's job).
        When the stream ends early, requests it queued and nobody will read are dropped.
        """
        caller = _caller(context)
        left = _time_left(context)  # the stream's deadline: it cuts off the requests running
        ends = None if left is None else time.perf_counter() + left
        status_codes = any(  # errors end the stream with their status (Triton's header)
            key == "triton_grpc_error" and value.lower() == "true"
            for key, value in context.invocation_metadata()
        )
        # a request's answer (or why it has none), _SHUTDOWN, or None: the stream ended
        answers: queue.SimpleQueue[Future | BaseException | object | None] = queue.SimpleQueue()
        # Answers computed and not yet sent: a client that sends and never reads would
        # otherwise have the server hold every answer (3 GB in 34 s, in a review).
        unsent = threading.Semaphore(STREAM_WINDOW)

        def room() -> bool:
            """Wait for the client to take answers; False once the call is over."""
            while not unsent.acquire(timeout=STREAM_POLL_S):
                if caller.gone or self._engine.closing.is_set():
                    return False
            return True

        def read() -> None:
            try:
                for n, message in enumerate(messages, 1):
                    # The call is over, or the server is going away: the stream reads no
                    # more, sends the answers it owes, then ends UNAVAILABLE. A client that
                    # keeps sending would otherwise hold the drain for the whole grace,
                    # each request answered "shutting down" on a stream left open.
                    if self._engine.closing.is_set() or not room():
                        answers.put(_SHUTDOWN)
                        return
                    try:
                        request = pb.ModelInferRequest.FromString(message)
                    except DecodeError as e:
                        answers.put(BadRequest(f"stream message {n} is no ModelInferRequest: {e}"))
                        return
                    self._stream_slots.acquire()
                    # The stream's own deadline, if any, ends the whole call; requests get none
                    # (it only tells a request cut off by it from one cancelled).
                    answer = self.streams.submit(
                        self._infer, request, None, caller, record, codec.STREAM_FRAMING, ends
                    )
                    answer.add_done_callback(lambda _: self._stream_slots.release())
                    answers.put(answer)
            except BaseException as e:  # noqa: BLE001 - the answers loop re-raises it
                answers.put(e)
            finally:
                answers.put(None)  # the answers loop below must never wait forever

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        while (answer := self._next(answers)) is not None:
            if answer is _SHUTDOWN:
                context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            if isinstance(answer, BaseException):
                if caller.gone:  # the call is over (cancelled, or ended by gRPC)
                    return
                if isinstance(answer, QuantgateError):
                    context.abort(status_of(answer), message_of(answer))
                raise answer
            response, err = answer.result()
            if err is None:
                yield codec.stream_response(response)
            elif status_codes and not isinstance(err, Cancelled):
                context.abort(status_of(err), message_of(err))
            elif not isinstance(err, Cancelled):
                yield pb.ModelStreamInferResponse(
                    error_message=f"{status_of(err).name}: {message_of(err)}",
                    infer_response=pb.ModelInferResponse(id=response.id, parameters=codec.FINAL),
                )
            del response, err, answer  # not held while the next one is awaited
            unsent.release()  # sent: room for one more

    def _next(self, answers: queue.SimpleQueue):
        """The stream's next answer, in the order of its requests. An idle stream (every
        answer sent) ends once the server shuts down, with UNAVAILABLE: left open it would
        hold the drain for the whole grace, and its client would learn nothing until then."""
        while True:
            try:
                return answers.get(timeout=STREAM_POLL_S)
            except queue.Empty:
                if self._engine.closing.is_set():
                    return _SHUTDOWN

    def _infer(
        self,
        request: pb.ModelInferRequest,
        timeout: float | None,
        caller: Caller,
        record: CallRecord | None = None,
        framing: int = 0,
        call_ends: float | None = None,
    ) -> tuple[bytes, None] | tuple[pb.ModelInferResponse, QuantgateError]:
        """One request -> (the serialized response, None), or (a response carrying only the
        id, the error). Every request is counted once, however it ends (and noted in
        ``record``, the access log's record of the call, when there is one). ``call_ends``:
        a stream's deadline (``time.perf_counter()``), which ``timeout`` is not for its
        requests: a request the stream's end cuts off then counts as DEADLINE_EXCEEDED."""
        start = time.perf_counter()
        response = pb.ModelInferResponse(id=request.id)
        model: Model | None = None
        own = None  # the request's timeout parameter, in seconds, where it set the deadline
        try:
            model = self._engine.model(request.model_name, request.model_version)
            _within_the_model(request, model)
            # the request's own timeout, where it is sooner than the call's deadline
            if (own := codec.request_timeout(request)) is not None and (
                timeout is None or own < timeout
            ):
                timeout = own
            else:
                own = None
            feeds = codec.decode_inputs(request)
            wanted = codec.requested_outputs(request)
            # the outputs answered as tensors (not top classes): their size is known before
            tensors = tuple(n for n, count in wanted.items() if not count) if wanted else None
            outputs, timing, rows = self._engine.infer(
                model, feeds, tuple(wanted), tensors=tensors, timeout=timeout, caller=caller
            )
            if any(wanted.values()):  # Triton's classification extension: top classes
                outputs = {
                    name: codec.classify(
                        name, a, wanted[name], batched=model.batched, labels=model.labels_of(name)
                    )
                    if wanted.get(name)
                    else a
                    for name, a in outputs.items()
                }
            response.model_name = model.name
            response.model_version = model.version
            encoded = codec.encode_response(response, outputs)
            # ``framing``: what a stream wraps the answer in, which counts against the limit
            if len(encoded) + framing > self._engine.cfg.max_message_bytes:
                raise too_large(
                    len(encoded), self._engine.cfg.max_message_bytes, codec.wire_sizes(outputs)
                )
        except Cancelled as e:
            # gRPC ends a call both when the client gives up and at its deadline
            elapsed = time.perf_counter() - start
            code = grpc.StatusCode.CANCELLED
            # at most a quarter of a short deadline: cancelled at 10 of 20 ms is no deadline
            if timeout is not None and elapsed >= timeout - min(DEADLINE_SLACK_S, timeout / 4):
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            elif call_ends is not None and time.perf_counter() >= call_ends - DEADLINE_SLACK_S:
                code = grpc.StatusCode.DEADLINE_EXCEEDED  # a stream's, which the call's end cut off
            self._finished(record, model, request.model_name, code.name, elapsed)
            return response, bare(e)  # held by a stream until sent: not its frames too
        except QuantgateError as e:
            if isinstance(e, DeadlineExceeded) and own is not None and model is not None:
                e = _timeout_expired(model.name, own)
            self._finished(record, model, request.model_name, status_of(e).name, time.perf_counter() - start,
                           reason=getattr(e, "reason", ""))  # fmt: skip
            return response, bare(e)
        except Exception as e:  # a bug, not the client's fault: answer it, keep serving
            what = f"request {request.id!r} to model {request.model_name!r} failed"
            failed = InferenceFailed.logged(what, e, log, trace=True)
            self._finished(
                record, model, request.model_name, "INTERNAL", time.perf_counter() - start
            )
            return response, failed
        self._finished(
            record, model, request.model_name, "OK", time.perf_counter() - start, timing, rows
        )
        return encoded, None

    def _finished(
        self,
        record: CallRecord | None,
        model: Model | None,
        asked: str,
        code: str,
        seconds: float,
        timing=None,
        rows=0,
        reason="",
    ):
        """Count one request; ``asked`` is the model it named (``model`` is None where it
        names none served, or a version not served)."""
        self._engine.finished(model, code, seconds, timing, rows, reason, asked=asked)
        if record is not None:
            record.request(model, code, rows)

    def _config(self, m: Model) -> mc.ModelConfig:
        cfg = self._engine.cfg
        drop = 1 if m.batched else 0  # Triton's dims leave out the batch dimension

        def dims(shape):
            return list(shape[drop:])

        config = mc.ModelConfig(
            name=m.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=m.max_batch_size,
            input=[
                mc.ModelInput(name=t.name, data_type=codec.config_type(t.dtype), dims=dims(t.shape))
                for t in m.inputs
            ],
            output=[
                mc.ModelOutput(
                    name=t.name, data_type=codec.config_type(t.dtype), dims=dims(t.shape)
                )
                for t in m.outputs
            ],
            instance_group=[
                mc.ModelInstanceGroup(
                    name=f"{m.name}_0",
                    kind=mc.ModelInstanceGroup.KIND_GPU
                    if m.provider == CUDA
                    else mc.ModelInstanceGroup.KIND_CPU,
                    count=cfg.instances,
                )
            ],
            default_model_filename=m.variant.file,
            parameters={
                "task": mc.ModelParameter(string_value=m.bundle.manifest.task),
                "precision": mc.ModelParameter(string_value=m.variant.precision),
                "execution_provider": mc.ModelParameter(string_value=m.provider),
                "variant_file": mc.ModelParameter(string_value=m.variant.file),
                "variant_sha256": mc.ModelParameter(string_value=m.variant.sha256),
                "sequence_padding": mc.ModelParameter(
                    string_value=str(m.sequence_axis is not None).lower()
                ),
            },
        )
        if m.max_sequence:  # dims say -1; longer requests are refused with this number
            config.parameters["max_sequence_length"].string_value = str(m.max_sequence)
        if cfg.dynamic_batching and m.batched:
            config.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
            policy = config.dynamic_batching.default_queue_policy
            policy.max_queue_size = cfg.max_queue_size
            policy.allow_timeout_override = True  # a request's `timeout` is honoured
        return config


def _timeout_expired(model: str, timeout: float) -> Unavailable:
    """A request to ``model`` whose own ``timeout`` parameter ran out while it was queued,
    answered as Triton answers it: UNAVAILABLE "Request timeout expired", which a Triton
    client may retry (a call's gRPC deadline stays DEADLINE_EXCEEDED: its client has given
    up)."""
    return Unavailable(
        f"Request timeout expired: model {model!r}: its `timeout` parameter "
        f"({timeout * 1e6:.0f} µs) ran out while it was queued; give it a longer timeout, or where the server is busy, "
        "the model more capacity (replicas, --instances)",
        reason="timeout",
    )


def _statistics(stats: ModelStats) -> pb.ModelStatistics:
    """Triton's ModelStatistics message for one model's counters."""
    s = stats.snapshot()

    def duration(d) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=s.name,
        version=s.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(**{k: duration(getattr(s, k)) for k in DURATIONS}),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=duration(d[0]),
                compute_infer=duration(d[1]),
                compute_output=duration(d[2]),
            )
            for size, d in sorted(s.batches.items())
        ],
    )
