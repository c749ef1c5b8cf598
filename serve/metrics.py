"""What the server counts: Prometheus metrics for operators, Triton statistics for clients.

Both are fed from the same two events: a request finished (with its status code), and
a batch ran. Batches run on the request threads, so the statistics take a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import socket
import socketserver
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import prometheus_client as prom

from quantgate.errors import ServeError
from quantgate.serve.batcher import Timing

# Latency buckets in seconds: sub-millisecond overheads up to multi-second batches.
_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)
HTTP_TIMEOUT_S = 10.0  # an idle connection to the metrics port is closed after it


class Metrics:
    """Prometheus metrics in their own registry (several servers may share a process)."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        # The process's memory, CPU, open files and start time, as prometheus_client's
        # default registry has them (this one is the server's own).
        prom.ProcessCollector(registry=self.registry)
        prom.PlatformCollector(registry=self.registry)
        self.http_port: int | None = None  # where serve_http listens; None: not serving
        self.http_address: str | None = None  # "host:port" it listens on ("[::]:9090")
        self.http_families: str | None = None  # for 0.0.0.0: which families that takes
        self._httpd: _HTTPServer | None = None
        labels = ("model", "version")
        r = self.registry
        self.requests = prom.Counter(
            "quantgate_requests",
            "Inference requests answered, by gRPC status code",
            (*labels, "code"),
            registry=r,
        )
        self.refused = prom.Counter(
            "quantgate_refused_requests",
            "Requests answered UNAVAILABLE before they ran, by reason: queue_full (back off "
            "or add replicas), warming_up, shutting_down",
            (*labels, "reason"),
            registry=r,
        )
        self.latency = prom.Histogram(
            "quantgate_request_seconds",
            "Request latency inside the server (successes)",
            labels,
            buckets=_LATENCY,
            registry=r,
        )
        self.queue = prom.Histogram(
            "quantgate_queue_seconds",
            "Time from admission to the start of its batch",
            labels,
            buckets=_LATENCY,
            registry=r,
        )
        self.compute = prom.Histogram(
            "quantgate_compute_seconds",
            "Assemble + session.run + split, per batch",
            labels,
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = prom.Histogram(
            "quantgate_batch_size",
            "Rows per executed batch",
            labels,
            buckets=_BATCH,
            registry=r,
        )
        self.queue_depth = prom.Gauge(
            "quantgate_queue_depth",
            "Requests admitted and waiting",
            labels,
            registry=r,
        )
        self.unauthenticated = prom.Counter(
            "quantgate_unauthenticated_requests",
            "Calls refused for a missing or invalid bearer token (no model is read from them)",
            registry=r,
        )
        self.overloaded = prom.Counter(
            "quantgate_overloaded_calls",
            "Calls refused UNAVAILABLE before they were read, as more calls were in flight "
            "than the server's limit (twice its request threads): overload, retry with backoff",
            registry=r,
        )
        self.calls_in_flight = prom.Gauge(
            "quantgate_calls_in_flight",
            "Calls of any RPC on the request threads, running or waiting for one: at "
            "quantgate_calls_in_flight_limit, new calls are refused (overload)",
            registry=r,
        )
        self.calls_in_flight_limit = prom.Gauge(
            "quantgate_calls_in_flight_limit",
            "The calls in flight beyond which a new one is refused UNAVAILABLE (twice the "
            "request threads)",
            registry=r,
        )
        self.tls_expiry = prom.Gauge(  # a series only where TLS is on
            "quantgate_tls_cert_expiry_timestamp_seconds",
            "When the served TLS certificate chain's first certificate expires (Unix time)",
            ("file",),
            registry=r,
        )
        self.model = prom.Gauge(
            "quantgate_model_info",
            "1 for each served model: the variant and provider chosen",
            (*labels, "precision", "provider", "file"),
            registry=r,
        )
        self.bundle_changed = prom.Gauge(
            "quantgate_bundle_changed_on_disk",
            "1 where the served model's bundle changed or went on disk since the server loaded "
            "it (it still serves what it loaded: restart it to serve the new one), else 0",
            labels,
            registry=r,
        )

    def serve_http(
        self, port: int, host: str = "0.0.0.0", ready: Callable[[], bool] | None = None
    ) -> int:
        """Serve the metrics over HTTP at ``/metrics`` (a daemon thread; ``/`` redirects
        there), and with ``ready`` the probes ``/healthz``, ``/readyz`` and their KServe v2
        twins (``metrics_app``); any other path is 404. Returns the bound port (the free one
        chosen when ``port`` is 0).

        ``host`` 0.0.0.0 (every address) listens on IPv4 and IPv6 both, as gRPC does on it
        (``[::]`` with IPV6_V6ONLY off), and on IPv4 alone where the host has no IPv6;
        ``http_address`` and ``http_families`` say which."""
        given = _hostport((host, port))
        try:
            binds = http_binds(host, port)
        except OSError as e:  # socket.gaierror: a name that does not resolve
            raise ServeError(
                f"cannot serve metrics on {given}: --host {host} does not resolve to an "
                f"address ({e.strerror or e}). Give a name or an address of this machine: "
                "0.0.0.0 for every interface, 127.0.0.1 for local clients."
            ) from e
        last: OSError | None = None
        for family, address, dual in binds:
            try:
                httpd = _HTTPServer(address, family, dual, metrics_app(self.registry, ready))
            except OSError as e:
                if e.errno not in NO_FAMILY:
                    tried = f" (as {_hostport(address)}, IPv4 and IPv6)" if dual else ""
                    raise ServeError(
                        f"cannot serve metrics on {given}{tried}: {e.strerror or e}. "
                        "Choose another --metrics-port (0 picks a free one)."
                    ) from e
                last = e  # this family is not on this host: try the next
                continue
            break
        else:  # every family (http_binds gives one at least) is not on this host
            assert last is not None
            raise ServeError(
                f"cannot serve metrics on {given}: {last.strerror or last}. Give --host an "
                "address of this machine, or 0.0.0.0 for every interface."
            ) from last
        threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
        self._httpd = httpd
        self.http_port = httpd.server_port
        self.http_address = _hostport((address[0], self.http_port))
        self.http_families = DUAL_STACK if dual else IPV4_ONLY if host == ANY_IPV4 else None
        return self.http_port

    def close_http(self) -> None:
        """Stop serving the metrics over HTTP (nothing when serve_http was not called)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_connections()
            self._httpd.server_close()
            self._httpd, self.http_port = None, None
            self.http_address = self.http_families = None


METRICS_PATH = "/metrics"
# Connections to the metrics port open at once. At the limit a new one is admitted by closing
# the one that has waited longest without sending its request; only when every one is being
# answered is the new one closed unanswered.
HTTP_CONNECTIONS = 32
ANY_IPV4 = "0.0.0.0"
# what 0.0.0.0 listens on, as the log says it (the metrics port's and gRPC's)
DUAL_STACK = "every IPv4 and IPv6 address"
IPV4_ONLY = "every IPv4 address; this host has no IPv6"
# bind()'s answers where the address family is not on this host (a kernel without IPv6, or
# IPv6 switched off): the next family is tried
NO_FAMILY = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL})


def http_binds(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple, bool]]:
    """Where ``serve_http`` listens for ``host``, in the order it tries: (family, address,
    dual-stack). 0.0.0.0 is every address, as gRPC reads it: ``[::]`` taking IPv4 as well,
    then 0.0.0.0 alone for a host without IPv6. Any other host is its first address, as
    given (127.0.0.1 is IPv4 only, ``::`` what the system makes of it: IPv4 too on Linux
    unless net.ipv6.bindv6only is set). Raises socket.gaierror for a name that
    does not resolve."""
    if host == ANY_IPV4:
        binds: list[tuple[socket.AddressFamily, tuple, bool]]
        binds = [(socket.AF_INET, (ANY_IPV4, port), False)]
        if socket.has_ipv6:
            binds.insert(0, (socket.AF_INET6, ("::", port, 0, 0), True))
        return binds
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = found[0]
    return [(family, address, False)]


def bind_socket(family: int, address: tuple, dual: bool) -> socket.socket:
    """A TCP socket bound to ``address`` as the metrics server binds it (SO_REUSEADDR: a
    connection left in TIME_WAIT does not hold the port), IPv6 taking IPv4 too when
    ``dual`` (otherwise an IPv6 socket is as the system makes it). Not listening yet."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _hostport(address: tuple) -> str:
    host = address[0]
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


class _HTTPServer(socketserver.ThreadingMixIn, WSGIServer):
    """The metrics port: a thread per connection, one request per connection (wsgiref),
    no line per request, at most HTTP_CONNECTIONS connections open.

    Each open connection holds a thread and a file descriptor, so they are bounded; idle
    ones once kept them for ever (a thousand took the process's descriptors, and gRPC's new
    connections with them). A connection that sends nothing for HTTP_TIMEOUT_S is closed.
    At the limit, a new connection is admitted by closing the one that has waited longest
    for its request (as nginx and Apache reclaim idle keep-alive connections), so idle
    connections, however many, cannot keep a kubelet's probe out; a connection whose request
    has been read is answered, never closed for a newer one."""

    daemon_threads = True
    # socketserver's listen backlog is 5: a burst of connections beyond it waited for the
    # kernel's SYN retransmit, a second
    request_queue_size = 128

    def __init__(self, address: tuple, family: socket.AddressFamily, dual: bool, app) -> None:
        self.address_family = family  # read by TCPServer.__init__
        self._dual = dual
        self._lock = threading.Lock()
        # open connections, oldest first -> True once its request is read (being answered)
        self._open: dict[socket.socket, bool] = {}
        super().__init__(address, _handler())
        self.set_app(app)

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = bind_socket(self.address_family, self.server_address, self._dual)
        self.server_address = self.socket.getsockname()
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), port  # not getfqdn: no DNS lookup
        self.setup_environ()

    def process_request(self, request, client_address) -> None:
        with self._lock:
            if len(self._open) >= HTTP_CONNECTIONS:
                idle = next((c for c, answering in self._open.items() if not answering), None)
                if idle is None:  # every one is being answered: this one is not
                    socketserver.TCPServer.shutdown_request(self, request)
                    return
                del self._open[idle]
                with contextlib.suppress(OSError):  # gone already
                    idle.shutdown(socket.SHUT_RDWR)  # its thread, in recv, reads the end
            self._open[request] = False
        super().process_request(request, client_address)

    def answering(self, request) -> bool:
        """Mark ``request``'s connection as being answered: False when it was closed
        meanwhile to admit a newer one (its request then goes unanswered)."""
        with self._lock:
            if request not in self._open:
                return False
            self._open[request] = True
            return True

    def get_app(self):
        """The app, releasing a connection's place once its answer is made, before it is
        sent: the client that reads it and connects again finds the place free (one
        request per connection: what is left of it is the write and the close)."""
        app = super().get_app()
        assert app is not None  # set_app ran in __init__

        def answer(environ, start_response):
            body = app(environ, start_response)
            with self._lock:
                self._open.pop(environ.get(CONNECTION), None)
            return body

        return answer

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End every connection still waiting for its request (their threads, in recv, read
        the end): a closed metrics port leaves no connection open for HTTP_TIMEOUT_S."""
        with self._lock:
            waiting, self._open = list(self._open), {}
        for connection in waiting:
            with contextlib.suppress(OSError):  # gone already
                connection.shutdown(socket.SHUT_RDWR)


CONNECTION = "quantgate.connection"  # the WSGI environ's key for the request's socket


def _handler() -> type:
    """wsgiref's request handler, silent (no line per request), with HTTP_TIMEOUT_S (read
    when the server is made) on each connection's reads and writes."""

    class Handler(WSGIRequestHandler):
        timeout = HTTP_TIMEOUT_S
        server: _HTTPServer

        def handle(self) -> None:
            try:
                super().handle()
            except OSError:  # timed out, or the client went: nothing to answer
                self.close_connection = True

        def get_environ(self) -> dict:
            return {**super().get_environ(), CONNECTION: self.request}

        def parse_request(self) -> bool:
            # the request line and headers are read: from here on it is answered
            return super().parse_request() and self.server.answering(self.request)

        def log_message(self, format, *args) -> None:  # noqa: A002 - the base's name
            pass

    return Handler


# The probes: quantgate's own paths, and KServe v2's (Triton's HTTP port), the same answers
LIVE_PATHS = frozenset({"/healthz", "/v2/health/live"})
READY_PATHS = frozenset({"/readyz", "/v2/health/ready"})


def metrics_app(registry: prom.CollectorRegistry, ready: Callable[[], bool] | None = None):
    """prometheus_client's WSGI app (content negotiation, gzip, ``name[]`` filters) at
    /metrics only: on its own it answers the metrics at any path, so a typo in a scrape
    config would look like success. ``/`` redirects to /metrics (scrapers follow redirects).

    With ``ready`` (the server's), the HTTP probes a kubelet can make where the gRPC port
    wants TLS or a client certificate: ``/healthz`` is 200 while the process serves HTTP
    (liveness), ``/readyz`` 200 when ``ready()`` (warmed up, not shutting down), else 503
    (readiness). ``/v2/health/live`` and ``/v2/health/ready``, the KServe v2 HTTP paths
    Triton serves (and probes copied from Triton's ask for), answer the same. Every other
    path is 404 and says where the metrics are."""
    metrics = prom.make_wsgi_app(registry)
    text = ("Content-Type", "text/plain; charset=utf-8")

    def app(environ, start_response):
        body = route(environ, start_response)
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else body  # headers only

    def route(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        if path == METRICS_PATH:
            return metrics(environ, start_response)
        if ready is not None and path in LIVE_PATHS:
            start_response("200 OK", [text])
            return [b"alive\n"]
        if ready is not None and path in READY_PATHS:
            if ready():
                start_response("200 OK", [text])
                return [b"ready\n"]
            start_response("503 Service Unavailable", [text])
            return [b"not ready: warming up or shutting down\n"]
        if path == "/":
            query = environ.get("QUERY_STRING")
            where = METRICS_PATH + (f"?{query}" if query else "")
            start_response("302 Found", [("Location", where), text])
            return [f"quantgate's Prometheus metrics are at {METRICS_PATH}\n".encode()]
        start_response("404 Not Found", [text])  # a new list: the server adds to it
        return [f"not found: quantgate's Prometheus metrics are at {METRICS_PATH}\n".encode()]

    return app


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, n: int = 1) -> None:
        self.count += n
        self.ns += ns


DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class ModelStats:
    """Triton's per-model statistics (the ModelStatistics RPC, read by perf_analyzer)."""

    name: str
    version: str
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, list[_Duration]] = field(
        default_factory=lambda: defaultdict(lambda: [_Duration(), _Duration(), _Duration()])
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request_done(self, ok: bool, total_ns: int, rows: int, timing: Timing | None) -> None:
        with self._lock:
            (self.success if ok else self.fail).add(total_ns)
            if ok and timing is not None:
                self.inference_count += rows
                self.last_inference_ms = int(time.time() * 1000)
                self.queue.add(timing.queue_ns)
                self.compute_input.add(timing.input_ns)
                self.compute_infer.add(timing.infer_ns)
                self.compute_output.add(timing.output_ns)

    def batch_done(self, rows: int, timing: Timing) -> None:
        with self._lock:
            self.execution_count += 1
            for d, ns in zip(
                self.batches[rows],
                (timing.input_ns, timing.infer_ns, timing.output_ns),
                strict=True,
            ):
                d.add(ns)

    def snapshot(self) -> ModelStats:
        """A consistent copy: request threads go on counting into this one."""
        with self._lock:
            copied = {name: dataclasses.replace(getattr(self, name)) for name in DURATIONS}
            batches = {k: [dataclasses.replace(d) for d in v] for k, v in self.batches.items()}
            return dataclasses.replace(self, **copied, batches=batches, _lock=threading.Lock())
