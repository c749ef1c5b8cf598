"""What the server counts: Prometheus metrics for operators, Triton statistics for clients.

Both are fed from the same two events: a request finished (with its status code), and
a batch ran. Batches run on the request threads, so the statistics take a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import re
import socket
import socketserver
import sys
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, cast
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

import prometheus_client as prom

from quantgate import __version__
from quantgate.errors import ServeError, quoted
from quantgate.serve.batcher import Timing

# Latency buckets in seconds: a small model's sub-millisecond run (the digits model's
# requests fell in the first bucket at 0.5 ms) up to multi-second batches.
_LATENCY = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
    5.0, 10.0,
)  # fmt: skip
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)
HTTP_TIMEOUT_S = 10.0  # an idle connection to the metrics port is closed after it
# A connection's answer, once made, is sent within this (one write: a scrape's answer goes in
# milliseconds on any real network); a client that does not read it is cut
HTTP_WRITE_TIMEOUT_S = 2.0

_log = logging.getLogger(__name__)


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
        prom.Info(
            "quantgate_build",
            "The quantgate release serving (which replicas run which)",
            registry=r,
        ).info({"version": __version__})
        self.requests = prom.Counter(
            "quantgate_requests",
            "Inference requests answered, by gRPC status code",
            (*labels, "code"),
            registry=r,
        )
        self.refused = prom.Counter(
            "quantgate_refused_requests",
            "Requests answered UNAVAILABLE before they ran, by reason: queue_full (back off "
            "or add replicas), warming_up, shutting_down, timeout (the request's own timeout "
            "parameter ran out in the queue)",
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
        # Apart from the successes' (whose labels stay as they are), by code: a refusal in
        # microseconds and a DEADLINE_EXCEEDED after seconds in the queue are not one
        # distribution, and the slow failures are those a user waited for.
        self.failed_latency = prom.Histogram(
            "quantgate_failed_request_seconds",
            "Latency inside the server of the requests that failed, by gRPC status code",
            (*labels, "code"),
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
        self.queue_limit = prom.Gauge(
            "quantgate_queue_size_limit",
            "The requests a model's queue admits (--max-queue-size): beyond, refused "
            "UNAVAILABLE queue_full; quantgate_queue_depth against it is how full it is",
            labels,
            registry=r,
        )
        self.ready = prom.Gauge(
            "quantgate_ready",
            "1 while the server takes requests (warmed up, no stop asked), else 0: what "
            "/readyz answers",
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
            "Calls of any RPC on the request threads, running or waiting for one, and "
            "answers not yet taken by their clients: at "
            "quantgate_calls_in_flight_limit, new calls are refused (overload)",
            registry=r,
        )
        self.calls_in_flight_limit = prom.Gauge(
            "quantgate_calls_in_flight_limit",
            "The calls in flight beyond which a new one is refused UNAVAILABLE (twice the "
            "request threads)",
            registry=r,
        )
        self.streams_open = prom.Gauge(
            "quantgate_streams_open",
            "Streaming calls open, by kind: infer (ModelStreamInfer) or open (health Watch, "
            "reflection: no token needed)",
            ("kind",),
            registry=r,
        )
        self.streams_open_limit = prom.Gauge(
            "quantgate_streams_open_limit",
            "The streaming calls of a kind that may be open at once: beyond, a new one is "
            "refused RESOURCE_EXHAUSTED",
            ("kind",),
            registry=r,
        )
        self.streams_refused = prom.Counter(
            "quantgate_refused_streams",
            "Streaming calls refused RESOURCE_EXHAUSTED, as their kind's limit were open",
            ("kind",),
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
        self.load = prom.Gauge(
            "quantgate_model_load_seconds",
            "Seconds the model took to load: its bundle read and its sha256 checked, its "
            "session built, and its warm-up runs (final once quantgate_ready is 1)",
            labels,
            registry=r,
        )
        self.bundle_changed = prom.Gauge(
            "quantgate_bundle_changed_on_disk",
            "1 where the served model's bundle changed or went on disk since the server loaded "
            "it (it still serves what it loaded), else 0",
            labels,
            registry=r,
        )
        self.unserved_folders = prom.Gauge(
            "quantgate_repository_unserved_folders",
            "Folders of the served repository that the server does not serve (added since it "
            "started: a restart would open each, and not start where one cannot be served)",
            registry=r,
        )
        self.bundle_refused = prom.Gauge(
            "quantgate_bundle_refused_on_disk",
            "1 where a restart would not serve the model's bundle as it is on disk now (gone, "
            "a file changed, its gates failed: the server would not start with it), else 0",
            labels,
            registry=r,
        )

    def serve_http(
        self,
        port: int,
        host: str = "0.0.0.0",
        ready: Callable[[], bool] | None = None,
        model_ready: Callable[[str, str], bool] | None = None,
        *,
        host_flag: str = "--host",
    ) -> int:
        """Serve the metrics over HTTP at ``/metrics`` (a daemon thread; ``/`` redirects
        there), and with ``ready`` the probes ``/healthz``, ``/readyz`` and their KServe v2
        twins, with ``model_ready`` KServe v2's of a model (``metrics_app``); any other path
        is 404. Returns the bound port (the free one chosen when ``port`` is 0).

        ``host`` 0.0.0.0 (every address) listens on IPv4 and IPv6 both, as gRPC does on it
        (``[::]`` with IPV6_V6ONLY off), and on IPv4 alone where the host has no IPv6;
        ``http_address`` and ``http_families`` say which. ``host_flag``: the flag that
        set ``host``, named by the errors."""
        given = _hostport((host, port))
        try:
            binds = http_binds(host, port)
        except OSError as e:  # socket.gaierror: a name that does not resolve
            raise ServeError(
                f"cannot serve metrics on {given}: {host_flag} {host} does not resolve to an "
                f"address ({e.strerror or e}). Give a name or an address of this machine: "
                "0.0.0.0 for every interface, 127.0.0.1 for local clients."
            ) from e
        last: OSError | None = None
        for family, address, dual in binds:
            try:
                httpd = _HTTPServer(
                    address, family, dual, metrics_app(self.registry, ready, model_ready)
                )
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
                f"cannot serve metrics on {given}: {last.strerror or last}. Give {host_flag} "
                "an address of this machine, or 0.0.0.0 for every interface."
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
# Connections whose answer is made and being written, beside those: a client that sends a
# request and never reads the answer holds one for HTTP_WRITE_TIMEOUT_S at most, and one
# more is cut, oldest first. So the port holds HTTP_CONNECTIONS + HTTP_SENDING connections
# (a thread and a descriptor each) at most, however its clients behave.
HTTP_SENDING = 32
# The longest request line read (method, path and query): beyond, 414. A scrape's name[]
# filters fit many times over; a 64 KB query made each /metrics parse 3,400 filters.
HTTP_REQUEST_LINE = 4096
# /metrics requests waiting for (or sharing) a render at once: beyond, 503 with Retry-After
METRICS_WAITING = 8
METRICS_WAIT_S = 5.0  # a /metrics request that waited this long for a render: 503
# After a render of d seconds the next starts no sooner than METRICS_PACE * d later (at most
# 1 s): a flood of /metrics spends at most 1 / (1 + METRICS_PACE) of the time rendering
METRICS_PACE = 9.0
ALLOWED_METHODS = ("GET", "HEAD")
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
        # connections whose answer is made and being written, oldest first (HTTP_SENDING)
        self._sending: dict[socket.socket, None] = {}
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
            self.sending(environ.get(CONNECTION))
            return body

        return answer

    def sending(self, request) -> None:
        """``request``'s answer is made: its place among HTTP_CONNECTIONS is free, and it
        is written within HTTP_WRITE_TIMEOUT_S, as one of HTTP_SENDING connections at most:
        beyond, the one written longest (to a client that does not read) is cut."""
        if request is None:
            return
        cut = None
        with self._lock:
            self._open.pop(request, None)
            with contextlib.suppress(OSError):  # closed meanwhile
                request.settimeout(HTTP_WRITE_TIMEOUT_S)
            if len(self._sending) >= HTTP_SENDING:
                cut = next(iter(self._sending))
                del self._sending[cut]
            self._sending[request] = None
        if cut is not None:
            _log.debug("metrics port: an answer not read for a newer one's place was cut")
            with contextlib.suppress(OSError):  # gone already
                cut.shutdown(socket.SHUT_RDWR)  # its thread, in send, fails and ends

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._open.pop(request, None)
            self._sending.pop(request, None)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End every connection still waiting for its request (their threads, in recv, read
        the end) or writing its answer: a closed metrics port leaves no connection open."""
        with self._lock:
            waiting, self._open = [*self._open, *self._sending], {}
            self._sending = {}
        for connection in waiting:
            with contextlib.suppress(OSError):  # gone already
                connection.shutdown(socket.SHUT_RDWR)


CONNECTION = "quantgate.connection"  # the WSGI environ's key for the request's socket


class _Answer(ServerHandler):
    """wsgiref's answer to one request, whose errors go to quantgate's log, not stderr: a
    write that timed out or a client that went is no error (DEBUG); the app's own is."""

    environ: dict  # set by run (typeshed does not declare them)
    headers_sent: bool

    def handle_error(self) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # timed out, reset: nothing more to send it
            _log.debug("metrics port: answer to %s not sent: %r", self.environ["PATH_INFO"], error)
            return
        _log.error("metrics port: answering %s failed", self.environ["PATH_INFO"], exc_info=True)
        if not self.headers_sent:
            self.result = self.error_output(self.environ, self.start_response)
            self.finish_response()

    def log_exception(self, exc_info) -> None:
        pass  # handle_error logs it


def _handler() -> type:
    """wsgiref's request handler, silent (no line per request, no traceback), with
    HTTP_TIMEOUT_S (read when the server is made) on each connection's reads, and
    HTTP_WRITE_TIMEOUT_S on its answer's writes (_HTTPServer.sending)."""

    class Handler(WSGIRequestHandler):
        timeout = HTTP_TIMEOUT_S
        server: _HTTPServer

        def handle(self) -> None:
            try:
                self.answer()
            except OSError as e:  # timed out, or the client went: nothing to answer
                _log.debug("metrics port: connection ended: %r", e)
                self.close_connection = True

        def answer(self) -> None:
            # WSGIRequestHandler.handle, with HTTP_REQUEST_LINE and _Answer
            self.raw_requestline = self.rfile.readline(HTTP_REQUEST_LINE + 1)
            if len(self.raw_requestline) > HTTP_REQUEST_LINE:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414, f"request line over {HTTP_REQUEST_LINE} bytes")
                return
            if not self.parse_request():  # an error was answered
                return
            wfile = cast(IO[bytes], self.wfile)  # a socket writer, as wsgiref passes it
            answer = _Answer(
                self.rfile, wfile, self.get_stderr(), self.get_environ(), multithread=False
            )
            answer.request_handler = self  # type: ignore[attr-defined]  # as wsgiref's
            answer.run(self.server.get_app())

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


# KServe v2's model readiness: /v2/models/NAME/ready, /v2/models/NAME/versions/VERSION/ready
MODEL_READY_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/ready")


def metrics_app(
    registry: prom.CollectorRegistry,
    ready: Callable[[], bool] | None = None,
    model_ready: Callable[[str, str], bool] | None = None,
):
    """prometheus_client's WSGI app (content negotiation, gzip, ``name[]`` filters) at
    /metrics only: on its own it answers the metrics at any path, so a typo in a scrape
    config would look like success. ``/`` redirects to /metrics (scrapers follow redirects).

    With ``ready`` (the server's), the HTTP probes a kubelet can make where the gRPC port
    wants TLS or a client certificate: ``/healthz`` is 200 while the process serves HTTP
    (liveness), ``/readyz`` 200 when ``ready()`` (warmed up, not shutting down), else 503
    (readiness). ``/v2/health/live`` and ``/v2/health/ready``, the KServe v2 HTTP paths
    Triton serves (and probes copied from Triton's ask for), answer the same. With
    ``model_ready`` (name, version: "" for the newest), a model's KServe v2 readiness,
    ``/v2/models/NAME[/versions/VERSION]/ready``: 200 when it is served and ready, else 400,
    as Triton answers. Every other path is 404 and says where the metrics are.

    GET and HEAD only (HEAD: GET's headers, no body), on every path; any other method is
    405. /metrics is rendered by _Renders: a flood of it shares renders and is paced."""
    renders = _Renders(prom.make_wsgi_app(registry))
    text = ("Content-Type", "text/plain; charset=utf-8")

    def app(environ, start_response):
        method = environ.get("REQUEST_METHOD")
        if method not in ALLOWED_METHODS:
            allow = ", ".join(ALLOWED_METHODS)
            start_response("405 Method Not Allowed", [("Allow", allow), text])
            return [f"method {method} not allowed: {allow} only\n".encode()]
        status, headers, body = route(environ)
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [] if method == "HEAD" else [body]  # GET's headers, not its body

    def route(environ) -> tuple[str, list, bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == METRICS_PATH:
            answer = renders.answer(environ)
            if answer is None:  # too many waiting, or waited too long
                busy = [("Retry-After", "1"), text]
                return "503 Service Unavailable", busy, b"busy: too many /metrics requests\n"
            return answer
        if ready is not None and path in LIVE_PATHS:
            return "200 OK", [text], b"alive\n"
        if ready is not None and path in READY_PATHS:
            if ready():
                return "200 OK", [text], b"ready\n"
            return "503 Service Unavailable", [text], b"not ready: warming up or shutting down\n"
        if model_ready is not None and (asked := MODEL_READY_PATH.fullmatch(path)):
            name, version = _wsgi_text(asked[1]), _wsgi_text(asked[2] or "")
            if model_ready(name, version):
                return "200 OK", [text], b"ready\n"
            said = quoted(name) + (f" version {quoted(version)}" if version else "")
            not_ready = f"not ready: model {said} is not served, or the server is not ready\n"
            return "400 Bad Request", [text], not_ready.encode()
        if path == "/":
            query = environ.get("QUERY_STRING")
            where = METRICS_PATH + (f"?{query}" if query else "")
            body = f"quantgate's Prometheus metrics are at {METRICS_PATH}\n".encode()
            return "302 Found", [("Location", where), text], body
        body = f"not found: quantgate's Prometheus metrics are at {METRICS_PATH}\n".encode()
        return "404 Not Found", [text], body  # a new list: the server adds to it

    return app


def _wsgi_text(segment: str) -> str:
    """A path segment as its client wrote it: WSGI hands the path over percent-decoded and
    read as latin-1, so a model named "ünï" (UTF-8 on the wire) arrived as "Ã¼nÃ¯" and its
    probe answered not served. Bytes that are not UTF-8 stay as WSGI read them."""
    try:
        return segment.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return segment


class _Renders:
    """/metrics answers, rendered by prometheus_client's app one at a time, shared and
    paced, so that a flood of /metrics costs little more than one of /healthz (each render
    holds the GIL for milliseconds: a flood of them once tripled gRPC's latency).

    A request is answered by a render that began after it arrived (never an older answer:
    a scrape after a change sees it), of the same Accept, Accept-Encoding and query: the
    requests that arrive during a render share the next. After a render of d seconds the
    next begins METRICS_PACE * d later at the soonest. At most METRICS_WAITING requests
    wait at once, each METRICS_WAIT_S at most: beyond, ``answer`` is None (503)."""

    KEPT = 16  # answers kept for requests still waiting for them

    def __init__(self, app) -> None:
        self._app = app
        self._cond = threading.Condition()
        self._rendering = False
        self._next = 0.0  # time.monotonic() before which no render begins
        self._waiting = 0
        # (Accept, Accept-Encoding, query) -> (when its last render began, its answer)
        self._done: OrderedDict[tuple, tuple[float, tuple[str, list, bytes]]] = OrderedDict()

    def answer(self, environ) -> tuple[str, list, bytes] | None:
        key = tuple(environ.get(k, "") for k in ("HTTP_ACCEPT", "HTTP_ACCEPT_ENCODING"))
        key += (environ.get("QUERY_STRING", ""),)
        arrived = time.monotonic()
        deadline = arrived + METRICS_WAIT_S
        with self._cond:
            if self._waiting >= METRICS_WAITING:
                return None
            self._waiting += 1
            try:
                while True:
                    done = self._done.get(key)
                    if done is not None and done[0] >= arrived:
                        return done[1]  # a render that began after it arrived
                    now = time.monotonic()
                    if now >= deadline:
                        return None
                    if not self._rendering and now >= self._next:
                        self._rendering = True
                        break
                    wake = deadline if self._rendering else min(self._next, deadline)
                    self._cond.wait(wake - now)
            finally:
                self._waiting -= 1
        began = time.monotonic()
        answer = None
        try:
            answer = self._render(environ)
        finally:  # a render that raised lets the next waiter render
            with self._cond:
                ended = time.monotonic()
                self._rendering = False
                self._next = ended + min(1.0, METRICS_PACE * (ended - began))
                if answer is not None:
                    self._done[key] = (began, answer)
                    self._done.move_to_end(key)
                    while len(self._done) > self.KEPT:
                        self._done.popitem(last=False)
                self._cond.notify_all()
        return answer

    def _render(self, environ) -> tuple[str, list, bytes]:
        got: list = []
        get = {**environ, "REQUEST_METHOD": "GET"}  # HEAD: GET's headers (prometheus: 405)
        body = b"".join(self._app(get, lambda status, headers: got.extend((status, headers))))
        return got[0], list(got[1]), body


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
