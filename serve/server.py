"""The gRPC server: built by ``create_server``, run by ``run``.

    cfg = ServeConfig(path=Path("bundles/digits"), port=0)
    engine = Engine(load_repository(cfg), cfg)
    server, port, health, close_threads = create_server(cfg, engine)

``run(cfg)`` does all of it: load and verify the bundles, listen, warm up, report
SERVING, and on SIGTERM or SIGINT stop accepting, finish every admitted request, and
return (the process then exits 0).

It is gRPC's thread-pool server, not grpc.aio: every request has a thread, and a request
that finds the model idle runs it on that thread (see batcher.py). With an event loop
each request crossed to a worker thread and back, which cost a lone request about 0.3 ms
on 2 cores (docs/BENCHMARKS.md, "Serving" and "gRPC transport").
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import NamedTuple

import grpc
import prometheus_client as prom
import prometheus_client.metrics as prom_metrics
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from quantgate import bundle as qb
from quantgate import cpus, signals
from quantgate.bundle import CPU
from quantgate.errors import BadRequest, DrainIncomplete, ModelNotFound, ServeError
from quantgate.protos import grpc_service_pb2 as pb
from quantgate.serve import auth, codec, metrics, tls, watch
from quantgate.serve.config import ServeConfig
from quantgate.serve.engine import Engine
from quantgate.serve.errors import message_of, status_of
from quantgate.serve.interceptors import (
    AccessLog,
    Overload,
    RequestThreads,
    StreamLimit,
    access_log,
)
from quantgate.serve.repository import Repository, load_repository, unserved_folders
from quantgate.serve.servicer import UNSUPPORTED, InferenceServicer, unsupported

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _open_call(method: str) -> bool:
    """Whether anyone may make the call, token or not (``auth.is_open``)."""
    return auth.is_open(method, SERVICE)


# A queue delay past this (microseconds) is said at start: a lone request waits it out.
LONG_QUEUE_DELAY_US = 100_000

# Request threads beyond the queue: calls that wait in no queue (metadata, statistics) and
# the runners of the batches. (Health and reflection run on threads of their own.)
SPARE_THREADS = 16
# Threads for the calls open to anyone (probes, reflection) beyond their streams' budget
# (StreamLimit.open_limit), and for refusals (each some microseconds of Python).
OPEN_SPARE_THREADS = 8
REFUSAL_THREADS = 2
# gRPC's limit of calls in flight, as a multiple of Overload's: the room for refusals that
# wait for the refusals' threads during a burst
OVERLOAD_ROOM = 2
# Calls gRPC has received and the server has not yet taken up (a burst arrives faster than
# one thread takes calls up), beyond which gRPC cancels a call before any of quantgate sees
# it: CANCELLED, no detail, counted nowhere. gRPC's default drops them at random from 1,000
# waiting (measured: 32 of 1,500 calls sent at once, 685 of 3,000, to a model that answers
# in a millisecond); a fixed bound at its hard limit of 3,000 serves such bursts whole, and
# bounds the memory as gRPC's default does (a call's first message, up to its window).
PENDING_CALLS = 3000
# Once every admitted request is answered, how long the drain waits for the calls that hold
# none (a health Watch, a lingering connection) before it cuts them, within the grace.
LINGER_S = 1.0


def create_server(
    cfg: ServeConfig,
    engine: Engine,
    *,
    credentials: tls.Credentials | None = None,
    tokens: auth.Tokens | None = None,
) -> Built:
    """Build the server (not started) and bind its port. ``credentials`` and ``tokens``:
    the TLS ones and the bearer tokens already read from ``cfg`` (``run`` reads them before
    loading models, and watches their files), else read here and watched until
    ``close_threads``.

    Returns the server, the bound port (the free one chosen when ``cfg.port`` is 0), the
    health servicer, which reports NOT_SERVING until ``run`` marks it SERVING, and what
    ends the server's thread pools once it has stopped (gRPC does not own them), with the
    watches it started.

    Threads: one per unary request in flight and per open stream, from a pool as large as
    every model's queue plus spares, so that a full queue, not a lack of threads, is what
    refuses a request (UNAVAILABLE, at once); the requests of streams run on a second pool
    of that size. Calls beyond twice the pool in flight are refused UNAVAILABLE at once and
    counted (``Overload``); beyond twice that again, by gRPC (RESOURCE_EXHAUSTED, counted
    nowhere), should refusals not keep up. Inference streams beyond half the pool, health
    and reflection streams beyond a quarter (64 at most), are refused RESOURCE_EXHAUSTED by
    the server (``StreamLimit``). The calls open to anyone (health, ServerLive/Ready,
    reflection) run on threads of their own, their streams' budget plus OPEN_SPARE_THREADS,
    refused beyond twice that in flight; refusals run on REFUSAL_THREADS of their own.
    """
    # What the caller did not read is read here, both before either watch starts
    own_credentials = None
    if credentials is None and cfg.tls is not None:
        credentials = own_credentials = tls.Credentials(cfg.tls)
    own_tokens = tokens is None
    if own_tokens:
        tokens = auth.tokens(cfg)
    # Everything that runs threads, ended by close_threads (the last made, the first ended),
    # or at once should the server not be made
    made = contextlib.ExitStack()
    try:
        if own_credentials is not None:
            own_credentials.watch()
            made.callback(own_credentials.close)
        if own_tokens:
            made.callback(auth.watch_tokens(tokens))
        server, port, health_servicer = _built(cfg, engine, credentials, tokens, made)
    except BaseException:  # nothing listens: the threads made for it go too
        made.close()
        raise
    return Built(server, port, health_servicer, made.close)


def _built(
    cfg: ServeConfig,
    engine: Engine,
    credentials: tls.Credentials | None,
    tokens: auth.Tokens | None,
    made: contextlib.ExitStack,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """``create_server``'s server, bound, and its health servicer; each thread pool made
    is shut down by ``made``."""
    options = [
        ("grpc.max_receive_message_length", cfg.max_request_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a busy port is an error, not a silently shared one
        # calls arrived that the server has not yet taken up: a fixed bound, see PENDING_CALLS
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
        *_connection_age(cfg),
    ]
    threads = cfg.max_queue_size * len(list(engine.repository)) + SPARE_THREADS
    pool = RequestThreads(threads)
    streams = StreamLimit(threads // 2, engine.metrics, _open_call)
    # probes' and reflection's calls: their streams' budget, and unary calls beside them
    open_threads = streams.open_limit + OPEN_SPARE_THREADS
    open_pool = RequestThreads(open_threads, "grpc-open")
    refusals = futures.ThreadPoolExecutor(REFUSAL_THREADS, thread_name_prefix="refusal")
    servicer = InferenceServicer(engine, threads)
    for executor in (pool, open_pool, refusals, servicer.streams):
        # idle once the server has stopped: they end at once
        made.callback(executor.shutdown, wait=False, cancel_futures=True)

    overload = Overload(
        pool, 2 * threads, engine.metrics.overloaded.inc, refusals=refusals,
        open_threads=open_pool, open_limit=2 * open_threads, is_open=_open_call,
        unsent=lambda: servicer.unsent.count, access_log=cfg.access_log,
    )  # fmt: skip
    engine.metrics.calls_in_flight.set_function(overload.in_flight)
    engine.metrics.calls_in_flight_limit.set(overload.limit)
    interceptors: list[grpc.ServerInterceptor] = [streams]
    if tokens is not None:
        refused = engine.metrics.unauthenticated.inc
        # outside StreamLimit: a refused stream takes none of its places
        interceptors.insert(0, auth.BearerTokenAuth(SERVICE, tokens, refused, refusals))
    if cfg.access_log:  # outermost: it logs the calls the token check refuses, too
        interceptors.insert(0, AccessLog())
    interceptors.insert(0, overload)  # before all: its refusal must stay as it is made
    server = grpc.server(
        pool,
        options=options,
        interceptors=interceptors,
        # Calls waiting for a thread are bounded too: beyond, UNAVAILABLE at once (Overload);
        # and beyond what refusals can keep up with, RESOURCE_EXHAUSTED by gRPC.
        maximum_concurrent_rpcs=OVERLOAD_ROOM * overload.limit,
    )
    _add_inference_service(servicer, server)
    health_servicer = Health()
    _add_health_service(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server, _bind(cfg, server, credentials), health_servicer


# gRPC reads its durations as milliseconds in a C int; its largest is "never"
NEVER_MS = 2**31 - 1


def _connection_age(cfg: ServeConfig) -> list[tuple[str, int]]:
    """gRPC's options for ``cfg.max_connection_age_s`` (none when it is 0: off). gRPC sends
    a connection that old a GOAWAY, so that its client opens its next calls on a new one
    (through the load balancer: on any replica), then closes it once the grace has passed:
    the shutdown grace, the time a drain gives an admitted request, so that aging a
    connection cuts off no call that a drain would have let finish. gRPC's default grace,
    none, would let an open stream hold the old connection, and its replica, for ever."""
    if not cfg.max_connection_age_s:
        return []
    return [
        ("grpc.max_connection_age_ms", _ms(cfg.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", _ms(cfg.shutdown_grace_s)),
    ]


def _ms(seconds: float) -> int:
    """``seconds`` as gRPC's milliseconds: rounded up (0.0004 s is no "at once"), and at most
    NEVER_MS (``--shutdown-grace inf`` too: it overflowed an int, and the start crashed)."""
    return NEVER_MS if seconds >= NEVER_MS / 1000 else max(0, math.ceil(seconds * 1000))


class Built(NamedTuple):
    """``create_server``'s server, not started, and what goes with it."""

    server: grpc.Server
    port: int  # bound
    health: health.HealthServicer
    close_threads: Callable[[], None]  # ends the server's thread pools, once it has stopped


def _bind(cfg: ServeConfig, server: grpc.Server, credentials: tls.Credentials | None) -> int:
    """Bind ``server`` to ``cfg``'s address, over TLS with ``credentials``; the port bound
    (the free one chosen for port 0)."""
    address = cfg.address()
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials.server_credentials())
    except RuntimeError as e:  # gRPC says only "Failed to bind"; its log above says why
        raise ServeError(_cannot_listen(cfg, address)) from e
    if port == 0:
        raise ServeError(_cannot_listen(cfg, address))
    return port


def _cannot_listen(cfg: ServeConfig, address: str) -> str:
    """What to check when gRPC cannot bind ``address`` (it does not say which it was)."""
    checks = [f"--host {cfg.host} is an address of this machine"]
    if cfg.port:
        checks.insert(0, f"no other process uses port {cfg.port} (or pass --port 0 for a free one)")
    if 0 < cfg.port < 1024:
        checks.insert(1, f"this user may listen on port {cfg.port} (below 1024 needs root)")
    if cfg.tls is not None:
        checks.append(f"--tls-key {cfg.tls.key} is the private key of --tls-cert {cfg.tls.cert}")
    return f"cannot listen on {address}. Check that " + ", and that ".join(checks) + "."


def _check_ports(cfg: ServeConfig) -> None:
    """Refuse a --host or --port (or --metrics-host or --metrics-port) that cannot be
    listened on, with the one reason, before the models load: gRPC's failed bind does not
    say which it was. The binds themselves stay the authority: this probe only moves common
    mistakes earlier. A --metrics-port of 0 is probed too, for its host."""
    if problem := _bind_problem(cfg.host, cfg.port, "--port"):
        raise ServeError(f"cannot listen on {cfg.address()}: {problem}")
    if cfg.metrics_port is not None and (
        problem := _bind_problem(
            cfg.http_host,
            cfg.metrics_port,
            "--metrics-port",
            http=True,
            host_flag=cfg.http_host_flag,
        )
    ):
        raise ServeError(
            f"cannot serve metrics on {cfg.metrics_address(cfg.metrics_port)}: {problem}"
        )


def _bind_problem(
    host: str, port: int, flag: str, *, http: bool = False, host_flag: str = "--host"
) -> str | None:
    """Why a plain socket cannot listen on ``port`` (``flag``'s) at ``host`` (``host_flag``'s),
    in words that say what to do; None where it can. ``http``: bound as the metrics server
    binds it (``metrics.http_binds``: 0.0.0.0 is IPv6 and IPv4 both where the host has
    IPv6)."""
    try:
        if http:
            found = metrics.http_binds(host, port)
        else:
            found = [
                (family, address, False)
                for family, _, _, _, address in socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            ]
    except socket.gaierror as e:
        return (
            f"{host_flag} {host} does not resolve to an address ({e.strerror}). Give a name or "
            "an address of this machine: 0.0.0.0 for every interface, 127.0.0.1 for local "
            "clients"
        )
    for i, (family, address, dual) in enumerate(found):
        try:
            # As gRPC and the metrics server bind: a connection of the last server left in
            # TIME_WAIT does not take the port (SO_REUSEADDR); a process listening on it does.
            metrics.bind_socket(family, address, dual).close()
        except OSError as e:
            if http and e.errno in metrics.NO_FAMILY and i + 1 < len(found):
                continue  # no IPv6 here: the metrics server takes IPv4 alone
            if e.errno == errno.EADDRINUSE:
                return f"another process listens on it. Choose another {flag} (0 picks a free one)"
            if e.errno == errno.EADDRNOTAVAIL:
                return (
                    f"{host_flag} {host} is not an address of this machine ({e.strerror}). "
                    "Give one of its addresses, or 0.0.0.0 for every interface"
                )
            if e.errno == errno.EACCES:
                return f"ports below 1024 need root. Choose another {flag} (0 picks a free one)"
            return f"{e.strerror or e}"
        if http:  # the first that binds is the one the metrics server takes
            break
    return None


def _add_inference_service(servicer: InferenceServicer, server: grpc.Server) -> None:
    """Register the service as the generated ``add_..._to_server`` does, but with a
    serializer that passes already serialized responses through (ModelInfer answers are
    written by ``codec.encode_response`` with a single copy of the output tensors), the
    stream's messages passed in serialized (its reader parses them, so that one it cannot
    read ends the stream after the answers before it, not before), and a unary request that
    cannot be read answered INVALID_ARGUMENT (``_Unreadable``), not gRPC's INTERNAL."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                getattr(servicer, method.name), response_serializer=codec.serialize
            )
        else:
            handlers[method.name] = _reading(
                grpc.unary_unary_rpc_method_handler,
                getattr(servicer, method.name),
                getattr(pb, method.input_type.name),
                codec.serialize,
            )
    for name in UNSUPPORTED:  # Triton's RPCs that protos/ leaves out: a reason, not "not found"
        handlers[name] = grpc.unary_unary_rpc_method_handler(unsupported(name))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class Health(health.HealthServicer):
    """grpc_health's servicer, with List: grpc_health leaves it UNIMPLEMENTED, though the
    service it registers (and so reflection) names it. List answers every service's
    status as Check answers each; the server sets them all (``_set_health``), and never
    calls ``enter_graceful_shutdown``, whose statuses would not be seen here."""

    def __init__(self) -> None:
        super().__init__()
        # as the base starts: the server as a whole SERVING, until set otherwise
        self._listed: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._listed_lock = threading.Lock()

    def set(self, service: str, status) -> None:
        super().set(service, status)
        with self._listed_lock:  # not while holding the base's lock: no order to keep
            self._listed[service] = status

    def List(self, request, context):  # noqa: N802 (the RPC's name)
        with self._listed_lock:
            listed = dict(self._listed)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=s) for name, s in listed.items()}
        )


def _add_health_service(servicer: health.HealthServicer, server: grpc.Server) -> None:
    """grpc_health's service as ``health_pb2_grpc.add_HealthServicer_to_server`` registers
    it, but with its requests read as the inference service's are: bytes that are no
    request are INVALID_ARGUMENT, not INTERNAL and a traceback at ERROR (the service needs
    no token: anyone could fill the log)."""
    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    handlers = {}
    for method in service.methods:
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = _reading(
            make,
            getattr(servicer, method.name),
            getattr(health_pb2, method.input_type.name),
            getattr(health_pb2, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


class _Unreadable(NamedTuple):
    """A unary request that is no message of its type. gRPC's reader raising answered
    INTERNAL, which the docs keep for a server's failure, and logged a traceback at ERROR
    per request; read by ``parse``, which never raises, the request reaches the interceptors
    (the access log reads its fields: none here) and ``_reading``'s handler refuses it."""

    message_type: str
    error: str

    @classmethod
    def parse(cls, message_type, raw: bytes):
        try:
            return message_type.FromString(raw)
        except DecodeError as e:
            return cls(message_type.__name__, str(e))


def _reading(make: Callable, method: Callable, message_type, serialize: Callable):
    """``make``'s handler (``grpc.unary_unary_rpc_method_handler``, say) of ``method``, its
    requests read by ``_Unreadable.parse`` and an unreadable one answered INVALID_ARGUMENT."""

    def handle(request, context):
        if isinstance(request, _Unreadable):
            err = BadRequest(f"the request is no {request.message_type}: {request.error}")
            context.abort(status_of(err), message_of(err))
        return method(request, context)

    return make(
        handle,
        request_deserializer=functools.partial(_Unreadable.parse, message_type),
        response_serializer=serialize,
    )


def _set_health(servicer: health.HealthServicer, status) -> None:
    for name in ("", SERVICE):
        servicer.set(name, status)


def verify(cfg: ServeConfig) -> Repository:
    """What ``run`` would serve, loaded as it loads it (hashes, gates, variants, sessions)
    with its TLS files read, but no port bound: a repository checked before a rollout."""
    if cfg.tls is not None:
        tls.read(cfg.tls)
    auth.tokens(cfg)
    return load_repository(cfg)


def _loopback(host: str) -> bool:
    """Whether ``host`` is this machine alone (localhost, 127.0.0.0/8, ::1, and 127.0.0.1
    written as IPv6)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: it may resolve anywhere
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _settings(cfg: ServeConfig, engine: Engine) -> str:
    """What an operator checks first in the log: security, batching, threads."""
    security = "plaintext" if cfg.tls is None else "mutual TLS" if cfg.tls.client_ca else "TLS"
    authn = (
        "bearer token required"
        if cfg.auth_token
        else f"bearer token required (any in {cfg.auth_token_file}, read again when it changes)"
        if cfg.auth_token_file
        else "no authentication"
    )
    batching = (
        f"batches of up to {cfg.max_batch_size}, queue delay {cfg.max_queue_delay_us} us"
        if cfg.dynamic_batching
        else "no dynamic batching"
    )
    gpu = any(m.provider != CPU for m in engine.repository)
    return (
        f"{security}, {authn}; {batching}, queue {cfg.max_queue_size}; {cfg.instances} "
        f"instance(s) per model, ONNX Runtime threads: "
        f"{cpus.describe(cfg.intra_op_threads, gpu=gpu)}"
        + (f"; access log on (logger {access_log.name})" if cfg.access_log else "")
        + (
            f"; connections renewed after {cfg.max_connection_age_s:g} s (+-10%), their calls "
            f"in flight given {cfg.shutdown_grace_s:g} s"
            if cfg.max_connection_age_s
            else ""
        )
        + (  # an operator's SIGHUP would otherwise meet silence
            f"; {' and '.join(ignored)} ignored, inherited as ignored (nohup, a script's "
            "background job): SIGTERM stops it"
            if (ignored := signals.ignored())
            else ""
        )
    )


class _SecondSignal(BaseException):
    """A second stop signal: raised by the drain's waits (``_waited``), at a point of its
    own, never from the signal handler into whatever the main thread was running (inside
    gRPC's stop, that left gRPC's state half-changed, and its stop(0) then waited forever)."""


# How often the drain's waits look whether a second signal asked to stop at once, and the
# main thread's wait for the warm-up lets a signal's handler run.
HURRY_CHECK_S = 0.05


def _waited(wait: Callable[[float], bool], seconds: float | None, hurry: threading.Event) -> bool:
    """``wait(s)`` in slices of HURRY_CHECK_S until it returns True (True), ``seconds`` pass
    (None: no limit; False), or ``hurry`` is set (raises _SecondSignal)."""
    deadline = math.inf if seconds is None else time.monotonic() + seconds
    while not hurry.is_set():
        left = deadline - time.monotonic()
        if wait(max(0.0, min(HURRY_CHECK_S, left))):
            return True
        if time.monotonic() >= deadline and not hurry.is_set():
            return False
    raise _SecondSignal


def run(
    cfg: ServeConfig,
    *,
    on_ready: Callable[[int, Engine], None] | None = None,
    exit_on_second_signal: bool = False,
    stop: threading.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT/SIGHUP, or ``stop`` is set, then drain gracefully and
    return (main thread only: it installs the signal handlers). ``on_ready(port, engine)``
    is called once the server serves, on this thread. ``stop``, an event of the caller's: set
    (from any thread) it stops the server as a first signal does, and the server sets it
    when a signal asks it to stop, so that a loop in ``on_ready`` can wait on it. A second
    signal stops the server at once, and raises
    DrainIncomplete where admitted requests were left unanswered (it returns where none
    were: during the warm-up, say, which ends after the model run under way); while
    ``on_ready`` runs, the signal is raised into it. A third signal exits the process
    (``128 + signal``), as the second does with ``exit_on_second_signal`` (`quantgate
    serve`), as a server process is expected to.

    Raises DrainIncomplete when the grace ran out before every admitted request was
    answered: the operator learns that requests were cut off, from the log and the exit code.
    What it started (the port, the metrics port, its threads) is ended when it returns or
    raises: the ports closed, each thread told to end (gRPC's pool threads exit within a
    moment after, without a join).
    """
    if threading.current_thread() is not threading.main_thread():
        raise ServeError(
            "run() serves until a signal asks it to stop, so it must be called from the main "
            "thread (Python delivers signals there). Call it from the main thread, or run "
            "`quantgate serve` in a subprocess."
        )
    with _without_created_series():
        _run(cfg, on_ready, exit_on_second_signal, stop or threading.Event())


@contextlib.contextmanager
def _without_created_series() -> Iterator[None]:
    """The process's metrics without prometheus_client's `_created` timestamp per counter and
    histogram (a second series each, read by nothing docs/serving.md's metrics are for) while
    serving: a switch of the whole process, put back as it was for an embedding caller."""
    was_on = getattr(prom_metrics, "_use_created", True)
    prom.disable_created_metrics()
    try:
        yield
    finally:
        if was_on:
            prom.enable_created_metrics()


def _run(
    cfg: ServeConfig,
    on_ready: Callable[[int, Engine], None] | None,
    exit_on_second_signal: bool,
    stop: threading.Event,
) -> None:
    # A bad TLS file or a port in use is named before minutes of loading models.
    credentials = tls.Credentials(cfg.tls) if cfg.tls is not None else None
    tokens = auth.tokens(cfg)  # watched from the start of serving, below
    _check_ports(cfg)
    if cfg.max_queue_delay_us > LONG_QUEUE_DELAY_US:  # microseconds: a unit easily mistaken
        log.warning(
            "--max-queue-delay-us %d: a request alone in the queue waits %.3g s for others "
            "before it runs (the flag is in microseconds: 5000 is 5 ms)",
            cfg.max_queue_delay_us,
            cfg.max_queue_delay_us / 1e6,
        )
    engine = Engine(load_repository(cfg), cfg)
    bundles = _bundle_watch(cfg, engine)
    stopping = _Stopping(exit_on_second_signal, stop)

    with contextlib.ExitStack() as ended:  # each ended in turn, the last first
        # The files' watches end with the run (a program may call run() again and again)
        if credentials is not None:  # when the served certificate expires, and after renewals
            expiry = engine.metrics.tls_expiry.labels(str(credentials.tls.cert))
            credentials.watch(lambda material: expiry.set(material.expires.timestamp()))
            ended.callback(credentials.close)
        ended.callback(auth.watch_tokens(tokens))
        server, port, health_servicer, close_threads = create_server(
            cfg, engine, credentials=credentials, tokens=tokens
        )
        ended.callback(close_threads)  # after the drain, or a failed start
        _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        # SIGHUP too: the terminal that started the server closed. Its default would end
        # the process at once, admitted requests unanswered. A caller embedding run() gets
        # its own handlers back (signals.handling).
        ended.enter_context(signals.handling(stopping.on_signal))
        ended.enter_context(contextlib.closing(bundles.start()))
        try:
            _start(cfg, server, port, engine, health_servicer, on_ready, stopping.stop,
                   said_ready=stopping.said_ready, in_caller=stopping.in_caller)  # fmt: skip
            while not stopping.stop.wait(0.5):  # a short wait: signal handlers run between waits
                pass
            if not stopping.said_ready.is_set():
                log.info("%s: stopping before serving", stopping.first)
            elif not stopping.hurry.is_set():  # else the second signal's line says it
                log.info(
                    "%s: shutting down: no new requests; finishing admitted ones (grace %g s)",
                    stopping.first,
                    cfg.shutdown_grace_s,
                )
            stopping.drained.append(_drain(cfg, server, engine, health_servicer, stopping.hurry))
        except BaseException as e:  # failed while starting (a warm-up out of memory,
            # on_ready), or a second signal: nothing keeps listening on the port
            second = isinstance(e, _SecondSignal)
            # Looked at before gRPC cancels its calls (their batches then stop, and the
            # engine looks drained): a second signal that cuts nothing off is a stop, sooner
            # (a client that gave up on its own before, counted in cut_off, was not cut off)
            answered = second and engine.close(0)
            _stop_now(server, engine)
            if answered:
                stopping.drained.append(True)
            elif second:
                raise DrainIncomplete(
                    f"a second {stopping.received[-1]}: stopped without finishing admitted requests "
                    "(those whose clients still waited were cancelled)"
                ) from None
            else:
                raise
    if not stopping.drained[0]:
        cut = f" ({engine.cut_off} admitted request(s) cut off)" if engine.cut_off else ""
        raise DrainIncomplete(
            f"the shutdown grace of {cfg.shutdown_grace_s:g} s ran out with requests still "
            f"queued or running{cut}: those whose clients still waited were cancelled. Give the "
            "drain longer with --shutdown-grace (and the orchestrator's termination grace "
            "period more than that)"
        )
    if stopping.said_ready.is_set():
        log.info("stopped: every admitted request was answered")
    else:
        log.info("stopped")


def _bundle_watch(cfg: ServeConfig, engine: Engine) -> watch.BundleWatch:
    """The watch of the served bundles on disk, told into the metrics: served as loaded, a
    bundle that changes is said so once, not reloaded; a repository's folders not served
    are counted."""
    metrics = engine.metrics

    def on_change(model: tuple[str, str], changed: bool, refused: bool) -> None:
        metrics.bundle_changed.labels(*model).set(int(changed))
        metrics.bundle_refused.labels(*model).set(int(refused))

    root = Path(cfg.path).absolute()
    served = {(m.name, m.version) for m in engine.repository}
    return watch.BundleWatch(
        (m.served(cfg) for m in engine.repository),
        on_change=on_change,
        repository=(
            None
            if qb.is_bundle(root)
            else (root, functools.partial(unserved_folders, root, served))
        ),
        on_unserved=metrics.unserved_folders.set,
    )


class _Stopping:
    """What the stop signals (SIGTERM, SIGINT, SIGHUP) asked of a run, in ``on_signal``, its
    handler. The first sets ``stop``: the drain. A second hurries it (``hurry``: stop without
    waiting), raised into the caller's ``on_ready`` where that runs (``in_caller``), or with
    ``exit_on_second_signal`` (the CLI) exits the process; a third exits it. ``received``
    names them (``stop`` may be set by run()'s caller instead, as a first signal);
    ``drained`` holds the drain's answer once it has one; ``said_ready``: the server said it
    was ready, so it may have admitted requests."""

    def __init__(self, exit_on_second_signal: bool, stop: threading.Event):
        self.stop = stop
        self.hurry = threading.Event()
        self.in_caller = threading.Event()
        self.said_ready = threading.Event()
        self.received: list[str] = []
        self.drained: list[bool] = []
        self._exit = exit_on_second_signal

    @property
    def first(self) -> str:
        """What asked for the stop: the first signal's name, or the caller's ``stop``."""
        return self.received[0] if self.received else "stop set by run()'s caller"

    def on_signal(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if not self.stop.is_set():
            self.received.append(name)
            self.stop.set()
            if self.in_caller.is_set():  # the drain's line waits for on_ready: said now
                log.info("%s: the server stops once on_ready returns", name)
            return
        # The operator asked again: do not wait for the drain
        if self.drained:
            return  # the drain has ended: nothing left to cut
        if self._exit:
            if self.said_ready.is_set():
                log.warning("second %s: exiting without finishing admitted requests", name)
            else:
                log.warning("second %s: exiting now", name)
            os._exit(128 + signum)
        if self.received[1:]:  # a third: stopping at once did not end it (the caller's
            # on_ready ignored it, or a stop hangs): the last resort
            log.warning("third %s: exiting the process now", name)
            os._exit(128 + signum)
        self.received.append(name)
        if self.said_ready.is_set():
            log.warning("second %s: stopping without waiting for the drain", name)
        else:  # the warm-up's run under way cannot be cut short
            log.warning("second %s: stopping once the model run under way ends", name)
        self.hurry.set()  # the drain's next look stops the server: run()'s caller is told
        if self.in_caller.is_set():  # raised into the caller's on_ready (as Ctrl-C raises
            raise _SecondSignal  # into Python code), never into gRPC's or quantgate's own


def _stop_now(server: grpc.Server, engine: Engine) -> None:
    """The server stopped with no grace: its calls cancelled, its models closed."""
    server.stop(0).wait()
    engine.close(0)
    engine.metrics.close_http()


def _start(
    cfg: ServeConfig,
    server: grpc.Server,
    port: int,
    engine: Engine,
    health_servicer: health.HealthServicer,
    on_ready: Callable[[int, Engine], None] | None,
    stop: threading.Event,
    *,
    said_ready: threading.Event,
    in_caller: threading.Event,
) -> None:
    """Metrics, then the gRPC server, then the batchers; warm every model; report ready,
    unless ``stop`` was set meanwhile (a signal during the warm-up: no SERVING, no ready
    lines). The HTTP readiness probes say not ready from the moment ``stop`` is set, ahead
    of the drain's first step. ``said_ready`` is set once it reports ready, ``in_caller``
    while ``on_ready`` runs."""

    def ready() -> bool:
        return engine.ready and not stop.is_set()

    engine.metrics.ready.set_function(lambda: int(ready()))
    if cfg.metrics_port is not None:
        http = engine.metrics

        def model_ready(name: str, version: str) -> bool:
            try:
                engine.model(name, version)
            except (ModelNotFound, BadRequest):  # 400 either way, as Triton's HTTP port
                return False
            return ready()

        http.serve_http(cfg.metrics_port, cfg.http_host, ready=ready, model_ready=model_ready,
                        host_flag=cfg.http_host_flag)  # fmt: skip
        log.info(
            "Prometheus metrics on http://%s/metrics%s, and the probes /healthz, /readyz, "
            "/v2/health/live, /v2/health/ready, /v2/models/NAME/ready",
            http.http_address,
            f" ({http.http_families})" if http.http_families else "",
        )
    server.start()
    engine.start()
    if cfg.warmup:
        _warm_up(engine, stop)
    if stop.is_set():  # a signal during the warm-up: never said ready, drained at once
        return
    said_ready.set()
    engine.ready = True
    _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving on %s%s: %s", cfg.address(port), _grpc_families(cfg.host), _settings(cfg, engine)
    )
    if cfg.tls is None and (cfg.auth_token or cfg.auth_token_file) and not _loopback(cfg.host):
        log.warning(
            "bearer tokens cross the network in plaintext on %s: whoever can see the traffic "
            "can read them and use them. Serve over TLS (--tls-cert/--tls-key), or behind a "
            "proxy that terminates it",
            cfg.host,
        )
    if on_ready is not None:
        in_caller.set()
        try:
            on_ready(port, engine)
        finally:
            in_caller.clear()


def _warm_up(engine: Engine, stop: threading.Event) -> None:
    """``engine.warm_up`` on a thread of its own, the main thread waiting for it in short
    slices: Python runs signal handlers on the main thread between its own steps, never
    during a model run there, so a second signal, which `quantgate serve` exits on, waited
    for the run under way (seconds, for a large model on a CPU). A stop asked for ends the
    warm-up after that run."""
    failed: list[BaseException] = []
    halt = threading.Event()  # ``stop``, or the main thread interrupted: no more runs
    done = threading.Event()  # waited for, not the thread: an exception raised into
    # Thread.join on Python 3.11 marks a running thread as ended (it releases the thread's
    # own lock), and is_alive() is then False while it runs models on

    def warm() -> None:
        try:
            engine.warm_up(halt)
        except BaseException as e:  # out of memory, a model that fails: the start fails
            failed.append(e)
        finally:
            done.set()

    threading.Thread(target=warm, name="warm-up", daemon=True).start()
    try:
        while not done.wait(HURRY_CHECK_S):
            if stop.is_set() and not halt.is_set():
                halt.set()
                log.info("asked to stop: the warm-up ends after the model run under way")
    except BaseException:  # raised into the wait (an embedding caller's own signal handler,
        halt.set()  # a timeout's alarm): the thread ends with its run, never after run()
        while not done.is_set():
            with contextlib.suppress(BaseException):  # another, raised into this wait: the
                done.wait()  # first is the one told
        raise
    if failed:
        raise failed[0]


def _grpc_families(host: str) -> str:
    """What gRPC listens on for ``host`` 0.0.0.0, which it reads as every address: IPv6 too
    (``ss -ltn`` shows ``*:PORT``) where the host has IPv6. Nothing for any other host."""
    if host != metrics.ANY_IPV4:
        return ""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return f" ({metrics.IPV4_ONLY})"
    return f" ({metrics.DUAL_STACK})"


def _drain(
    cfg: ServeConfig,
    server: grpc.Server,
    engine: Engine,
    health_servicer: health.HealthServicer,
    hurry: threading.Event,
) -> bool:
    """Refuse new requests and answer the admitted ones within the grace; False when the
    grace ran out first.

    gRPC is told to stop first: it sends every connected client a GOAWAY, so their channels
    open new calls elsewhere (another endpoint behind the load balancer) instead of on this
    server's open connections, and it closes the port; calls it has already received run
    on. The engine, refusing from its start the requests those calls make (an open
    stream's too), decides whether the admitted ones were answered a moment before gRPC's
    grace ends: once gRPC cancels the calls still running, their batches stop (their
    clients are gone) and the engine would look drained. Calls that hold no request (a
    health Watch) are cut LINGER_S after the last admitted request is answered (they held
    the exit to the end of the grace: 25 s for an idle server with one Watch open), and are
    no request cut off.

    Raises _SecondSignal as soon as ``hurry`` is set (within HURRY_CHECK_S)."""
    _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    grace = cfg.shutdown_grace_s
    started = time.monotonic()
    # GOAWAY now; what still runs at the grace is cancelled (an endless grace as the longest
    # wait a thread can make: gRPC's own thread failed waiting an infinity)
    stopped = server.stop(min(grace, threading.TIMEOUT_MAX))
    drained = _waited(engine.close, max(0.0, grace - min(0.5, grace / 10)), hurry)
    if drained:
        # Every admitted request answered: what gRPC still waits for holds none (a health
        # Watch, as gRPC's client-side health checking keeps one open; a connection a client
        # or proxy keeps after the GOAWAY), and would hold the exit to the end of the grace.
        # A moment for calls refused meanwhile to be answered, then they are cut.
        left = grace - (time.monotonic() - started)
        if not _waited(stopped.wait, max(0.0, min(LINGER_S, left)), hurry):
            server.stop(0)
    _waited(stopped.wait, None, hurry)
    # Requests answered in that last moment: drained after all, unless gRPC cut one off
    # (a cut-off request counts; a batch stopped for it leaves the engine looking empty).
    drained = drained or (engine.cut_off == 0 and engine.close(0))
    engine.metrics.close_http()  # scraped until here: the drain shows in the metrics
    return drained
