"""Triton's per-model statistics as counted (the servicer encodes them; tests/serve's gRPC
tests read them back through tritonclient and perf_analyzer), and the metrics' HTTP port."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest

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
