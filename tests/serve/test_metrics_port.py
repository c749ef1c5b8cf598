"""The metrics port against clients that misbehave: readers that never read their answer, a
flood of /metrics, long queries, methods other than GET and HEAD. A real server on a real
socket, in the test process (quantgate.serve.metrics only)."""

from __future__ import annotations

import socket
import threading

import pytest
from helpers import until
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from quantgate.serve import metrics as m
from quantgate.serve.metrics import Metrics


class _Big(Collector):
    def collect(self):
        yield GaugeMetricFamily("t_big", "x" * 6_000_000, value=1)


def _big() -> tuple[Metrics, int, int]:
    """A metrics port whose /metrics is far larger than the kernel buffers a connection
    (4 MB at most), rendered in milliseconds (one series, its help text long): the metrics,
    the threads before it started, its port."""
    metrics = Metrics()
    metrics.registry.register(_Big())
    base = threading.active_count()
    return metrics, base, metrics.serve_http(0, "127.0.0.1", ready=lambda: True)


def _ask(port: int, request: bytes, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def _read(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(1 << 16):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    length = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
    return bool(length) and len(body) == int(length[0].split(b":")[1])


def _call(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with _ask(port, request) as s:
        answer = _read(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def test_readers_that_never_read_hold_a_bounded_number_of_threads(monkeypatch, capfd):
    """A client that sends GET /metrics and never reads held a thread and a descriptor in
    the answer's write for HTTP_TIMEOUT_S, its place already released: 300 of them took
    the server to 323 threads. Now at most HTTP_SENDING answers are written at once: a
    newer one cuts the oldest, and threads stay bounded; no traceback on stderr."""
    monkeypatch.setattr(m, "HTTP_TIMEOUT_S", 60.0)
    monkeypatch.setattr(m, "HTTP_WRITE_TIMEOUT_S", 60.0)  # only the bound cuts them
    monkeypatch.setattr(m, "METRICS_PACE", 0.0)
    monkeypatch.setattr(m, "HTTP_CONNECTIONS", 4)
    monkeypatch.setattr(m, "HTTP_SENDING", 4)
    metrics, base, port = _big()
    bound = m.HTTP_CONNECTIONS + m.HTTP_SENDING + 1  # + the accepting thread
    held = []
    try:
        for _ in range(m.HTTP_SENDING + m.HTTP_CONNECTIONS + 16):
            s = _ask(port, METRICS, rcvbuf=1024)
            assert s.recv(1, socket.MSG_PEEK) == b"H"  # its answer is being written
            held.append(s)
        until(lambda: threading.active_count() - base <= bound)
        assert _call(port, b"GET /healthz HTTP/1.0\r\n\r\n")[0] == 200
        assert not _complete(_read(held[0])), "the oldest unread answer was not cut"
        assert _complete(_read(held[-1])), "the newest answer was not sent whole"
    finally:
        for s in held:
            s.close()
        metrics.close_http()
    assert "Traceback" not in capfd.readouterr().err


def test_an_answer_not_read_is_cut_after_the_write_timeout(monkeypatch, capfd):
    """Once its answer is made, a connection has HTTP_WRITE_TIMEOUT_S to take it, not
    HTTP_TIMEOUT_S; the timeout is no traceback on stderr (wsgiref printed one each)."""
    monkeypatch.setattr(m, "HTTP_TIMEOUT_S", 60.0)
    monkeypatch.setattr(m, "HTTP_WRITE_TIMEOUT_S", 0.5)
    metrics, base, port = _big()
    try:
        with _ask(port, METRICS, rcvbuf=1024) as s:
            assert s.recv(1, socket.MSG_PEEK) == b"H"
            until(lambda: threading.active_count() == base + 1)  # its thread ended
            assert not _complete(_read(s))  # cut short
        assert _complete(_read(_ask(port, METRICS)))  # a reader gets it whole
    finally:
        metrics.close_http()
    assert "Traceback" not in capfd.readouterr().err


class _Renders(Collector):
    """Counts the registry's renders of /metrics."""

    def __init__(self) -> None:
        self.count = 0

    def collect(self):
        self.count += 1
        yield GaugeMetricFamily("t_renders", "renders", value=self.count)


def test_a_flood_of_metrics_shares_renders_and_probes_are_answered():
    """Each /metrics answer was rendered for it: a flood kept the process busy in Python
    and tripled gRPC's latency. Requests that arrive together now share a render (paced:
    METRICS_PACE), or are told 503 with Retry-After beyond METRICS_WAITING; the probes
    are answered throughout."""
    metrics = Metrics()
    renders = _Renders()
    metrics.registry.register(renders)
    port = metrics.serve_http(0, "127.0.0.1", ready=lambda: True)
    answers: list[int] = []
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            status, headers, _ = _call(port, METRICS)
            assert status == 200 or (status == 503 and headers["Retry-After"] == "1"), status
            answers.append(status)

    workers = [threading.Thread(target=flood, daemon=True) for _ in range(12)]
    try:
        for w in workers:
            w.start()
        until(lambda: len(answers) >= 300, timeout=60)
        for _ in range(10):
            assert _call(port, b"GET /healthz HTTP/1.0\r\n\r\n")[0] == 200
    finally:
        stop.set()
        for w in workers:
            w.join(30)
        metrics.close_http()
    assert answers.count(200) > 0
    assert renders.count < len(answers) / 3, (renders.count, len(answers))


def test_an_answer_is_never_older_than_its_request():
    """Shared renders are never stale: a scrape right after a change sees it."""
    metrics = Metrics()
    port = metrics.serve_http(0, "127.0.0.1", ready=lambda: True)
    try:
        for n in range(1, 21):
            metrics.unauthenticated.inc()
            status, _, body = _call(port, METRICS)
            assert status == 200
            assert f"quantgate_unauthenticated_requests_total {n}.0" in body.decode()
    finally:
        metrics.close_http()


def test_a_long_request_line_is_refused_414():
    """A 64 KB query of name[] filters was parsed on each request: 414 beyond
    HTTP_REQUEST_LINE, and a short filter works as before."""
    metrics = Metrics()
    port = metrics.serve_http(0, "127.0.0.1", ready=lambda: True)
    try:
        query = b"name[]=process_cpu&" * 3400
        status, _, _ = _call(port, b"GET /metrics?" + query + b" HTTP/1.1\r\n\r\n")
        assert status == 414
        name = b"quantgate_unauthenticated_requests_total"
        status, _, body = _call(port, b"GET /metrics?name[]=" + name + b" HTTP/1.0\r\n\r\n")
        assert status == 200 and name + b" 0.0" in body and b"quantgate_queue" not in body
    finally:
        metrics.close_http()


# /metrics filtered to a series that holds still: the whole page's process figures (CPU
# seconds, memory) change between the GET and the HEAD, and with them its length (3998
# bytes against 3986 once)
STEADY_METRICS = "/metrics?name[]=quantgate_unauthenticated_requests_total"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", STEADY_METRICS, "/", "/nope"])
def test_only_get_and_head_are_answered(path):
    """Any method answered /healthz 200 (DELETE, FOO); HEAD /metrics was 405."""
    metrics = Metrics()
    port = metrics.serve_http(0, "127.0.0.1", ready=lambda: True)
    try:
        for method in ("DELETE", "FOO", "OPTIONS", "PUT"):
            status, headers, _ = _call(port, f"{method} {path} HTTP/1.0\r\n\r\n".encode())
            assert (status, headers.get("Allow")) == (405, "GET, HEAD"), (method, headers)
        got, headers, body = _call(port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
        head, head_headers, nothing = _call(port, f"HEAD {path} HTTP/1.0\r\n\r\n".encode())
        assert head == got != 405 and nothing == b"", (head, got, nothing)
        assert head_headers["Content-Type"] == headers["Content-Type"]
        assert int(head_headers["Content-Length"]) == len(body) > 0
    finally:
        metrics.close_http()
