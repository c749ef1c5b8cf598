"""What runs around every call of the server, before and after its handler.

    AccessLog       one line per call, when it ends (``--access-log``)
    Overload        calls beyond the server's limit in flight, refused UNAVAILABLE at once
    StreamLimit     streams open at once, capped per kind
    RequestThreads  gRPC's request threads, counting the calls handed to them

``server.create_server`` puts them in their order: Overload outermost (its refusal must stay
as it is made), then the access log (it logs the calls the token check refuses, too), the
token check (``auth.BearerTokenAuth``), and the stream limit.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from quantgate.errors import clipped
from quantgate.serve import metrics
from quantgate.serve.refusals import refusal
from quantgate.serve.servicer import CALL, CallRecord

access_log = logging.getLogger("quantgate.serve.access")


class AccessLog(grpc.ServerInterceptor):
    """One INFO line per RPC to the ``quantgate.serve.access`` logger, when the call ends.

    Its fields, as the message (``key=value``; the JSON log's message is only the method and
    the code) and as the record's own attributes (the JSON log's keys): method (the full
    gRPC path), model and version (the model that answered, else the one asked for), code
    (the gRPC status name), rows (of the requests answered; ``-`` when none was), latency_ms
    (handler start to the response, before gRPC sends it), peer, and request_id
    (ModelInfer's ``id``, when the client set one). A stream (ModelStreamInfer) is one line
    when it ends, with its requests and how many failed.

    Calls that end before any handler runs have no line: those gRPC refuses (an unknown
    method, an oversized message, calls beyond its limit of concurrent RPCs, which is
    twice the server's own: ``Overload`` logs the calls it refuses), and
    those cancelled or expired before a thread took them up; so has a stream cancelled
    before its first response (gRPC closes a generator that never started without running
    it).
    Installed only with ``--access-log``: without it a call pays nothing for it.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        # The services' handlers are the same objects call after call: wrap each once.
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        name, make = _KINDS[handler.request_streaming, handler.response_streaming]
        behavior = getattr(handler, name)

        def unary(request, context):
            record, start = _opened(context)
            token = CALL.set(record)
            code = None
            try:
                return behavior(request, context)
            except BaseException:
                code = "UNKNOWN"  # what gRPC answers for an exception without an abort
                raise
            finally:
                CALL.reset(token)
                _log_call(method, request, context, record, start, code)

        def streaming(request, context):
            record, start = _opened(context)
            token = CALL.set(record)
            try:
                responses = behavior(request, context)
            except BaseException:
                _log_call(method, request, context, record, start, "UNKNOWN", stream=True)
                raise
            finally:
                CALL.reset(token)
            return _logged(responses, method, request, context, record, start)

        return make(
            _runs_as(behavior, streaming if handler.response_streaming else unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _opened(context: grpc.ServicerContext) -> tuple[CallRecord, float]:
    """A call's record, with its peer taken now (gRPC says "" once a call has ended: one
    that passed its deadline while it ran), and its start."""
    record = CallRecord()
    record.peer = urllib.parse.unquote(context.peer())
    return record, time.perf_counter()


def _runs_as(behavior, wrapper):
    """``wrapper`` of ``behavior`` run where gRPC would run ``behavior``: on its own pool
    where it has one (a refusal's, which must not wait for a request thread)."""
    if (pool := getattr(behavior, "experimental_thread_pool", None)) is not None:
        wrapper.experimental_thread_pool = pool
    return wrapper


def _on_pool(handler: grpc.RpcMethodHandler, pool: futures.ThreadPoolExecutor):
    """``handler`` with its behaviour run on ``pool`` instead of the request threads."""
    name, make = _KINDS[handler.request_streaming, handler.response_streaming]
    behavior = getattr(handler, name)

    def run(request, context):
        return behavior(request, context)

    run.experimental_thread_pool = pool  # type: ignore[attr-defined]
    return make(
        run,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# (request streaming, response streaming) -> the handler's behaviour, and its maker
_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _logged(responses, method, request, context, record, start) -> Iterator:
    """``responses``, then the call's line: when they end, fail, or the call is cancelled
    (gRPC stops reading and closes this generator)."""
    code = None
    try:
        yield from responses
    except GeneratorExit:
        code = "CANCELLED"
        raise
    except BaseException:
        code = "UNKNOWN"
        raise
    finally:
        _log_call(method, request, context, record, start, code, stream=True)


def _log_call(method, request, context, record, start, code, *, stream=False) -> None:
    """The access log's line for a call that ended; ``code``: what it ended with when
    neither an abort (``context.code()``) nor the servicer (``record.code``) says."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    latency_ms = round((time.perf_counter() - start) * 1e3, 3)
    status = context.code()
    if status is not None:
        code = status.name
    elif code is None and stream and not context.is_active():  # ended by the client, or
        # its deadline, while the stream waited for its next request (the servicer returns)
        left = context.time_remaining()
        code = "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
    elif code is None:
        code = (None if stream else record.code) or "OK"
    fields = {
        "method": method,
        "model": ",".join(record.models) or _asked(request, "model_name", "name"),
        "version": ",".join(record.versions) or _asked(request, "model_version", "version"),
        "code": code,
        "rows": record.rows,
        "latency_ms": latency_ms,
        "peer": record.peer,  # taken at the start (_opened)
        "request_id": _asked(request, "id"),
    }
    if stream and method.endswith("/ModelStreamInfer"):
        fields.update(requests=record.requests, failed=record.failed)
    access_log.info(_Line(fields), extra=fields)


class _Line:
    """The access log's message: ``key=value`` pairs, built only when a formatter prints
    the message. The JSON log writes the fields as its keys, and as its message only
    ``brief()`` (the method and the code), not each field a second time."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{k}={_logfmt(v)}" for k, v in self.fields.items())

    def brief(self) -> str:
        return f"{self.fields['method'].rpartition('/')[2]} {self.fields['code']}"


class RequestThreads(futures.ThreadPoolExecutor):
    """gRPC's request threads, counting the calls handed to them that have not finished
    (running, or waiting for a thread): what gRPC's ``maximum_concurrent_rpcs`` counts of
    them, read by ``Overload``."""

    def __init__(self, threads: int, name: str = "grpc") -> None:
        super().__init__(threads, thread_name_prefix=name)
        self._lock = threading.Lock()
        self.in_flight = 0

    def submit(self, fn, /, *args, **kwargs):
        with self._lock:
            self.in_flight += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._finished()
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future=None) -> None:
        with self._lock:
            self.in_flight -= 1


class Overload(grpc.ServerInterceptor):
    """Beyond ``limit`` calls in flight (on the request threads, running or waiting for
    one, or answered and the answer not yet taken by the client: ``unsent``), a new call is
    answered UNAVAILABLE at once, as a full queue is (retryable, with
    backoff), and counted (``on_refusal``), with an access-log line where ``access_log``.
    gRPC's own limit (``maximum_concurrent_rpcs``) answers RESOURCE_EXHAUSTED instead, in
    code of its own that runs before any handler or interceptor could count the call; it
    stays, above this one, for refusals that cannot keep up with a burst.

    A refusal reads nothing of its call (a stream handler that never reads: a client that
    holds back its message cannot hold it up) and runs on ``refusals``, so it waits for no
    request thread.

    The calls open to anyone (``is_open``: probes and reflection, which need no token) run
    on threads of their own, ``open_threads``, with a limit of their own (twice as many in
    flight): a client without a token that holds such calls open, sending half a message,
    holds those threads, never a request thread; and probes are answered while inference
    is saturated."""

    def __init__(
        self,
        threads: RequestThreads,
        limit: int,
        on_refusal: Callable[[], None],
        *,
        refusals: futures.ThreadPoolExecutor,
        open_threads: RequestThreads,
        open_limit: int,
        is_open: Callable[[str], bool],
        unsent: Callable[[], int] = lambda: 0,
        access_log: bool = False,
    ):
        self.limit = limit
        self.unsent = unsent
        self._threads = threads
        self._open = open_threads
        self._open_limit = open_limit
        self._is_open = is_open
        self._on_refusal = on_refusal
        self._access_log = access_log
        self._refusals = refusals

    def intercept_service(self, continuation, details):
        if not self._is_open(details.method):
            if self.in_flight() < self.limit:
                return continuation(details)
            return self._refusal(
                details.method,
                f"the server is overloaded: {self.limit} calls are in flight, its limit. Retry "
                "with backoff, or add replicas",
            )
        if self._open.in_flight >= self._open_limit:
            return self._refusal(
                details.method,
                f"the server is busy: {self._open_limit} calls to its health, liveness and "
                "reflection methods are in flight, their limit. Retry with backoff",
            )
        handler = continuation(details)
        return None if handler is None else _on_pool(handler, self._open)

    def in_flight(self) -> int:
        """The calls this limit counts."""
        return self._threads.in_flight + self.unsent()

    def _refusal(self, method: str, message: str) -> grpc.RpcMethodHandler:
        def counted(context) -> None:
            self._on_refusal()
            if self._access_log:
                _log_call(method, None, context, *_opened(context), "UNAVAILABLE")

        return refusal(grpc.StatusCode.UNAVAILABLE, message, self._refusals, counted)


class StreamLimit(grpc.ServerInterceptor):
    """Streaming calls open at once, capped: beyond, RESOURCE_EXHAUSTED. Each holds a
    thread while it is open. ModelStreamInfer may take ``limit`` of them (half the request
    threads: unary calls keep the rest). Health Watch and reflection need no token, so they
    have a budget of their own, ``open_limit``, the smaller of ``OPEN_LIMIT`` and half of
    ``limit``, on the open calls' threads (``Overload``): a thousand idle Watch streams
    once took every thread. ``is_open`` tells those calls by their method. Each kind's
    open streams, limit and refusals are ``series`` of its (kind "infer" or "open")."""

    OPEN_LIMIT = 64

    def __init__(self, limit: int, series: metrics.Metrics, is_open: Callable[[str], bool]):
        self.limit = limit
        self._is_open = is_open
        self.open_limit = open_limit = max(1, min(self.OPEN_LIMIT, limit // 2))
        self._budgets = {
            opened: _Places(kind, places, series)
            for opened, kind, places in ((True, "open", open_limit), (False, "infer", limit))
        }

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        name, make = _KINDS[handler.request_streaming, handler.response_streaming]
        return make(
            self._budgets[self._is_open(details.method)].held(getattr(handler, name)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _Places:
    """One kind of stream's places (``StreamLimit``): how many may be open, and which are."""

    def __init__(self, kind: str, limit: int, series: metrics.Metrics):
        self._free = threading.BoundedSemaphore(limit)
        self._refusal = (
            f"{limit} streams of this kind are open, the server's limit: close idle ones"
        )
        series.streams_open_limit.labels(kind).set(limit)
        self._open = series.streams_open.labels(kind)
        self._refused = series.streams_refused.labels(kind)

    def held(self, behavior):
        """``behavior`` holding one of the places until its call ends."""

        def limited(request, context):
            if not self._free.acquire(blocking=False):
                self._refused.inc()
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._refusal)
            self._open.inc()
            if not context.add_callback(self._release):  # at the call's end, however
                self._release()  # it ended already
            return behavior(request, context)

        # No `experimental_non_blocking` copied from a health Watch: gRPC runs the wrapper
        # on a thread, as every stream here (run without one, a Watch refused here once
        # kept the server from stopping after its grace)
        return limited

    def _release(self) -> None:
        self._open.dec()
        self._free.release()


def _asked(request, *names: str) -> str | None:
    """The first of the request's fields ``names`` that is set (the request is a message of
    any service, bytes, or a stream's iterator: None when it has none of them)."""
    for name in names:
        if _has(type(request), name):  # type: ignore[arg-type]  # (a getattr that fails costs an exception)
            value = getattr(request, name)
            if value and isinstance(value, str):
                return _clip(value)
    return None


CLIP = 256  # characters of a client's string the access log keeps


def _clip(value: str) -> str:
    """A client's string as the access log writes it: a long one cut, its length said (an
    8 MB request id must not become an 8 MB log line)."""
    return clipped(value, CLIP)


@functools.cache
def _has(cls: type, name: str) -> bool:
    """Whether messages of ``cls`` have the field ``name`` (False for what is no message)."""
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return name in getattr(descriptor, "fields_by_name", ())


# A value written as it is in a ``key=value`` line: no spaces, quotes, ``=`` or backslashes.
_PLAIN = re.compile(r'[^\s"=\\]+')


def _logfmt(value) -> str:
    """A value of a ``key=value`` line: ``-`` for none, quoted (JSON escapes) when it has
    spaces, quotes, ``=`` or control characters, so a client's model name or request id
    cannot forge a line or a field."""
    if value is None:
        return "-"
    text = str(value)
    if type(value) is not str or (_PLAIN.fullmatch(text) and text.isprintable()):
        return text
    return json.dumps(text)
