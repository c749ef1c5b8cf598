"""Triton's per-model statistics as counted (the servicer encodes them; tests/serve's gRPC
tests read them back through tritonclient and perf_analyzer), and the metrics' HTTP port."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from helpers import until

from quantgate.serve.batcher import Timing
from quantgate.serve.metrics import DURATIONS, Metrics, ModelStats


def test_a_snapshot_is_consistent_and_stays_as_taken():
    stats = ModelStats("classifier", "1")
    stats.batch_done(2, Timing(0, 10, 100, 1))
    stats.request_done(True, 500, 2, Timing(7, 10, 100, 1))
    stats.request_done(False, 30, 1, None)
    snap = stats.snapshot()
    assert (snap.name, snap.version, snap.inference_count, snap.execution_count) == (
        "classifier", "1", 2, 1
    )  # fmt: skip
    assert (snap.success.count, snap.success.ns, snap.fail.count, snap.fail.ns) == (1, 500, 1, 30)
    assert (snap.queue.ns, snap.compute_infer.ns) == (7, 100)
    assert [(d.count, d.ns) for d in snap.batches[2]] == [(1, 10), (1, 100), (1, 1)]

    stats.batch_done(2, Timing(0, 10, 100, 1))  # counting goes on; the snapshot does not move
    stats.request_done(True, 500, 2, Timing(7, 10, 100, 1))
    assert snap.success.count == 1 and snap.batches[2][1].count == 1
    assert snap.execution_count == 1 and stats.execution_count == 2
    assert all(getattr(snap, k) is not getattr(stats, k) for k in DURATIONS)


def test_a_snapshot_taken_while_requests_count_is_never_torn():
    """Every request adds to success and queue together: a snapshot sees both or neither."""
    stats, stop = ModelStats("m", "1"), threading.Event()

    def count():
        while not stop.is_set():
            stats.request_done(True, 1, 1, Timing(1, 0, 0, 0))

    workers = [threading.Thread(target=count) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        for _ in range(2000):
            s = stats.snapshot()
            assert s.success.count == s.queue.count == s.inference_count
    finally:
        stop.set()
        for w in workers:
            w.join()


class _Watched:
    """A lock that tells when a second thread finds it taken (``contended``)."""

    def __init__(self) -> None:
        self._lock, self.contended = threading.Lock(), threading.Event()

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


class _HeldTiming:
    """A Timing whose queue_ns is read only once ``release`` is set: request_done stops
    half-way through its counting (success counted, queue not yet), its lock held."""

    input_ns = infer_ns = output_ns = 0

    def __init__(self) -> None:
        self.reading, self.release = threading.Event(), threading.Event()

    @property
    def queue_ns(self) -> int:
        self.reading.set()
        self.release.wait(10)
        return 1


def test_a_snapshot_waits_for_a_request_counted_half_way():
    """Forced: a request is half counted when the snapshot is taken. The snapshot must
    wait for the writer's lock and see the whole request, not success without queue."""
    stats = ModelStats("m", "1", _lock=_Watched())
    timing = _HeldTiming()
    snap: list[ModelStats] = []
    writer = threading.Thread(target=stats.request_done, args=(True, 1, 1, timing))
    reader = threading.Thread(target=lambda: snap.append(stats.snapshot()))
    writer.start()
    try:
        assert timing.reading.wait(10)
        reader.start()
        # the snapshot either waits for the lock, or ran through without taking it
        until(lambda: stats._lock.contended.is_set() or snap)
    finally:
        timing.release.set()
        writer.join(10)
        if reader.ident is not None:  # started
            reader.join(10)
    s = snap[0]
    assert (s.success.count, s.queue.count, s.inference_count) == (1, 1, 1), (
        "a torn snapshot: the request's success without its queue time"
    )


def _get(url: str) -> tuple[int, dict, str]:
    """One GET, redirects not followed: (status, headers, body)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def test_the_release_and_sub_millisecond_latencies_are_in_the_metrics():
    """Which replicas run which release (during a rollout); and a small model's requests,
    all below the first bucket's 0.5 ms before, told apart."""
    from prometheus_client import generate_latest

    from quantgate import __version__

    metrics = Metrics()
    metrics.latency.labels("m", "1").observe(0.0002)
    text = generate_latest(metrics.registry).decode()
    assert f'quantgate_build_info{{version="{__version__}"}} 1.0' in text
    assert 'quantgate_request_seconds_bucket{le="0.0001",model="m",version="1"} 0.0' in text
    assert 'quantgate_request_seconds_bucket{le="0.00025",model="m",version="1"} 1.0' in text


def test_the_metrics_port_answers_metrics_at_slash_metrics_only():
    """prometheus_client's own server answers the metrics at any path: a scrape config's
    typo, or a probe of /healthz, would look like success."""
    metrics = Metrics()
    metrics.requests.labels("m", "1", "OK").inc()
    port = metrics.serve_http(0, "127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        status, headers, body = _get(f"{base}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain"), headers
        assert 'quantgate_requests_total{code="OK",model="m",version="1"} 1.0' in body, body

        status, headers, body = _get(f"{base}/metrics?name[]=quantgate_requests_total")
        assert status == 200 and "quantgate_requests_total{" in body, body
        assert "quantgate_queue_depth" not in body, body  # prometheus_client's filter works

        status, headers, body = _get(f"{base}/?name[]=x")
        assert status == 302 and headers["Location"] == "/metrics?name[]=x", (status, headers)
        assert "/metrics" in body

        # no readiness to report (`ready` not given): no probes either
        for path in ("/healthz", "/readyz", "/metrics/", "/metricsx", "/favicon.ico", "/x/metrics"):
            status, _, body = _get(base + path)
            assert status == 404, (path, status, body)
            assert "metrics are at /metrics" in body, body
        # a client that follows redirects gets the metrics from /
        text = urllib.request.urlopen(base + "/", timeout=10).read().decode()
        assert "quantgate_requests_total{" in text
    finally:
        metrics.close_http()
    assert metrics.http_port is None
    with pytest.raises(urllib.error.URLError):  # closed: the port no longer answers
        urllib.request.urlopen(f"{base}/metrics", timeout=5)


def test_the_probes_say_alive_and_whether_the_server_is_ready():
    metrics, ready = Metrics(), threading.Event()
    port = metrics.serve_http(0, "127.0.0.1", ready=ready.is_set)
    base = f"http://127.0.0.1:{port}"
    try:
        assert _get(f"{base}/healthz")[::2] == (200, "alive\n")
        assert _get(f"{base}/readyz")[::2] == (503, "not ready: warming up or shutting down\n")
        ready.set()  # warmed up
        assert _get(f"{base}/readyz")[::2] == (200, "ready\n")
        ready.clear()  # draining
        assert _get(f"{base}/readyz")[0] == 503 and _get(f"{base}/healthz")[0] == 200
    finally:
        metrics.close_http()


def test_an_idle_connection_to_the_metrics_port_is_closed(monkeypatch, capfd):
    """Each open connection holds a thread and a file descriptor: one that sends nothing
    must not keep them, and its end is no traceback in the server's log."""
    import socket

    from quantgate.serve import metrics as m

    monkeypatch.setattr(m, "HTTP_TIMEOUT_S", 0.5)
    metrics = Metrics()
    port = metrics.serve_http(0, "127.0.0.1", ready=lambda: True)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
            idle.sendall(b"GET /metr")  # and nothing more
            assert idle.recv(1024) == b""  # closed by the server, within the 10 s
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200  # and it serves on
    finally:
        metrics.close_http()
    assert "Traceback" not in capfd.readouterr().err


def test_the_kserve_v2_health_paths_answer_as_healthz_and_readyz():
    """/v2/health/live and /v2/health/ready, which Triton serves on its HTTP port and probes
    copied from Triton ask for: the same answers as /healthz and /readyz, readiness included."""
    metrics, ready = Metrics(), threading.Event()
    port = metrics.serve_http(0, "127.0.0.1", ready=ready.is_set)
    base = f"http://127.0.0.1:{port}"

    def probes() -> dict[str, tuple[int, str]]:
        paths = ("/healthz", "/v2/health/live", "/readyz", "/v2/health/ready")
        return {p: _get(base + p)[::2] for p in paths}

    alive, ok = (200, "alive\n"), (200, "ready\n")
    not_ready = (503, "not ready: warming up or shutting down\n")
    try:
        assert probes() == {  # warming up
            "/healthz": alive, "/v2/health/live": alive, "/readyz": not_ready,
            "/v2/health/ready": not_ready,
        }  # fmt: skip
        ready.set()
        assert probes() == {
            "/healthz": alive, "/v2/health/live": alive, "/readyz": ok, "/v2/health/ready": ok,
        }  # fmt: skip
        ready.clear()  # draining
        assert probes()["/v2/health/ready"] == not_ready
        assert _get(base + "/v2/health")[0] == 404  # only the two paths
    finally:
        metrics.close_http()


def test_a_models_ready_path_reads_its_name_as_utf_8():
    """A repository folder named "ünï" is served, but WSGI hands the path over read as
    latin-1: its probe asked for "Ã¼nÃ¯", and a kubelet never saw it ready."""
    metrics, asked = Metrics(), []

    def model_ready(name: str, version: str) -> bool:
        asked.append((name, version))
        return name == "ünï"

    port = metrics.serve_http(0, "127.0.0.1", ready=lambda: True, model_ready=model_ready)
    base = f"http://127.0.0.1:{port}/v2/models"
    try:
        assert _get(f"{base}/%C3%BCn%C3%AF/ready")[0] == 200
        assert _get(f"{base}/%C3%BCn%C3%AF/versions/%C3%A9/ready")[0] == 200
        assert _get(f"{base}/%FF/ready")[0] == 400  # not UTF-8: as it came, and not served
        assert asked == [("ünï", ""), ("ünï", "é"), ("\xff", "")]
    finally:
        metrics.close_http()


def _held(port: int, n: int, request: bytes = b"") -> list:
    """``n`` connections to the metrics port, each having sent ``request`` and nothing more
    (idle, or a request begun and never finished), in the order they were opened."""
    import socket

    held = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if request:
            s.sendall(request)
        held.append(s)
    return held


def _closed_by_server(s) -> bool:
    """Whether the server closed ``s``: an end of stream (or a reset) within 10 s."""
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def _kept(s) -> bool:
    """Whether ``s`` is open now (nothing to read, no end of stream). The server closes a
    connection for a newer one before it serves the newer one: once that is answered,
    this tells at once."""
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.settimeout(10)


def test_idle_connections_cannot_keep_a_probe_out(monkeypatch, capfd):
    """The metrics port holds HTTP_CONNECTIONS connections at once. Idle ones filling it (a
    client that connects and sends nothing, or half a request) once made every probe fail
    (RemoteDisconnected) until they timed out, so anyone who reached the port could fail
    the pod's liveness probe. A new connection now closes the one that has waited longest
    for its request, and only it."""
    from quantgate.serve import metrics as m
    from quantgate.serve.metrics import HTTP_CONNECTIONS

    monkeypatch.setattr(m, "HTTP_TIMEOUT_S", 120.0)  # none closed for being idle meanwhile
    metrics = Metrics()
    port = metrics.serve_http(0, "127.0.0.1", ready=lambda: True)
    base = f"http://127.0.0.1:{port}"
    held = _held(port, 2, b"GET /metr")  # half a request: still waiting for the rest
    held += _held(port, HTTP_CONNECTIONS - 2)  # nothing sent
    try:
        for i, path in enumerate(("/healthz", "/readyz", "/v2/health/live", "/metrics")):
            assert _get(base + path)[0] == 200, path  # in place of the longest idle
            assert _closed_by_server(held[i]), f"connection {i} was kept"
            assert _kept(held[i + 1]), f"connection {i + 1} was closed"
            held += _held(port, 1)  # the place the probe left, taken again
        assert _get(base + "/healthz")[0] == 200
        assert all(_kept(s) for s in held[5:]), "a newer idle one was closed"
    finally:
        for s in held:
            s.close()
        metrics.close_http()
    assert "Traceback" not in capfd.readouterr().err


def test_a_connection_being_answered_is_never_closed_for_a_newer_one(monkeypatch):
    """A request read is answered, however many connections come after it; and when every
    place holds a request being answered, a new connection is the one refused."""
    from quantgate.serve import metrics as m
    from quantgate.serve.metrics import HTTP_CONNECTIONS

    monkeypatch.setattr(m, "HTTP_TIMEOUT_S", 120.0)

    answering, release = threading.Semaphore(0), threading.Event()

    def ready() -> bool:  # /readyz's answer waits here: its connection is being answered
        answering.release()
        return release.wait(30)

    metrics = Metrics()
    port = metrics.serve_http(0, "127.0.0.1", ready=ready)
    readyz = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
    held: list = []
    try:
        [first] = held = _held(port, 1, readyz)
        assert answering.acquire(timeout=10)
        held += _held(port, HTTP_CONNECTIONS + 3)  # idle: the last 4 close the oldest 4
        assert all(_closed_by_server(s) for s in held[1:5])
        assert _kept(first) and all(_kept(s) for s in held[5:])
        for s in held[1:]:
            s.close()
        busy = _held(port, HTTP_CONNECTIONS - 1, readyz)  # every other place answering
        held += busy
        for _ in busy:
            assert answering.acquire(timeout=10)
        [late] = _held(port, 1, readyz)
        held.append(late)
        assert _closed_by_server(late)  # unanswered: nothing it could close
        release.set()
        for s in (first, *busy):
            s.settimeout(10)
            assert s.recv(64).startswith(b"HTTP/1.0 200 OK"), "a request was not answered"
    finally:
        release.set()
        for s in held:
            s.close()
        metrics.close_http()


def test_0000_listens_on_ipv6_too_and_falls_back_to_ipv4_without_it(monkeypatch):
    """0.0.0.0, the default --host, is every address: IPv6 too, as gRPC reads it; a host
    without IPv6 gets IPv4 alone, and the server says which it took."""
    import errno
    import socket

    from quantgate.serve import metrics as m

    metrics = Metrics()
    metrics.serve_http(0, "0.0.0.0", ready=lambda: True)
    try:
        if socket.has_ipv6:
            assert metrics.http_address.startswith("[::]:"), metrics.http_address
            assert metrics.http_families == "every IPv4 and IPv6 address"
        port = metrics.http_port
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        metrics.close_http()

    bind = m.bind_socket

    def no_ipv6(family, address, dual):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return bind(family, address, dual)

    monkeypatch.setattr(m, "bind_socket", no_ipv6)
    metrics = Metrics()
    metrics.serve_http(0, "0.0.0.0", ready=lambda: True)
    try:
        assert metrics.http_address == f"0.0.0.0:{metrics.http_port}"
        assert metrics.http_families == "every IPv4 address; this host has no IPv6"
        assert _get(f"http://127.0.0.1:{metrics.http_port}/healthz")[0] == 200
    finally:
        metrics.close_http()
    # an explicit address keeps its meaning: IPv4 loopback only
    metrics = Metrics()
    metrics.serve_http(0, "127.0.0.1")
    try:
        assert metrics.http_address == f"127.0.0.1:{metrics.http_port}"
        assert metrics.http_families is None
    finally:
        metrics.close_http()


def test_a_head_request_gets_headers_only():
    """HTTP forbids a body in the answer to HEAD (a probe or a curl -I may ask so)."""
    import socket

    metrics = Metrics()
    port = metrics.serve_http(0, "127.0.0.1", ready=lambda: True)
    try:
        for method, status, body in (("HEAD", b"200", b""), ("GET", b"200", b"alive\n")):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(f"{method} /healthz HTTP/1.0\r\n\r\n".encode())
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            head, _, got = answer.partition(b"\r\n\r\n")
            assert head.split()[1] == status and got == body, (method, answer)
    finally:
        metrics.close_http()


def test_closing_the_port_ends_the_connections_waiting_on_it():
    """An idle connection, or one halfway through its request, is ended when the metrics
    port closes, not left open (a thread and a descriptor each) for HTTP_TIMEOUT_S."""
    import socket

    metrics = Metrics()
    port = metrics.serve_http(0, "127.0.0.1", ready=lambda: True)
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)  # under HTTP_TIMEOUT_S
    half = socket.create_connection(("127.0.0.1", port), timeout=5)
    half.sendall(b"GET /heal")
    until(lambda: len(metrics._httpd._open) == 2)  # both accepted
    metrics.close_http()
    for s in (idle, half):
        with s:
            assert s.recv(100) == b""  # the server's end: no answer, and not kept open
