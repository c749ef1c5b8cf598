"""The metrics port's probes on a real server: where it listens by default, and the KServe v2
health paths following readiness through a warm-up and a drain as /readyz does."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as tc
from bundles import counting
from conftest import ServerProcess
from helpers import has_ipv6_loopback, inputs, spawn

PROBES = ("/healthz", "/v2/health/live", "/readyz", "/v2/health/ready")
# KServe v2's model readiness, as Triton answers it: 200 ready, 400 otherwise
MODEL_READY = "/v2/models/slow/ready"


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_default_host_answers_probes_on_ipv4_and_ipv6(repo):
    """--host 0.0.0.0, the default (given here because ServerProcess passes 127.0.0.1):
    gRPC listens on every IPv4 and IPv6 address, and so does the metrics port, so an
    httpGet probe answers in an IPv6-only cluster too. The log says so."""
    srv = ServerProcess(repo / "classifier", "--host", "0.0.0.0", "--metrics-port", "0")
    try:
        port = re.search(r"metrics on http://\S+:(\d+)/metrics", "".join(srv.stdout)).group(1)
        grpc_port = srv.url.rpartition(":")[2]
        hosts = ["127.0.0.1"] + (["[::1]"] if has_ipv6_loopback() else [])
        for host in hosts:
            for path in PROBES:
                assert _status(f"http://{host}:{port}{path}") == 200, (host, path)
            with tc.InferenceServerClient(f"{host}:{grpc_port}") as c:
                assert c.is_server_ready(), host
    finally:
        assert srv.terminate() == 0, srv.log
    if socket.has_ipv6:
        assert re.search(
            rf"Prometheus metrics on http://\[::\]:{port}/metrics \(every IPv4 and IPv6 address\)",
            srv.log,
        ), srv.log
        assert re.search(rf"serving on 0\.0\.0\.0:{grpc_port} \(every IPv4 and IPv6", srv.log)


def _free_port() -> int:
    with socket.socket() as s:  # bound, read back, released: a tiny race, fine in tests
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_kserve_v2_ready_follows_readiness_through_warm_up_and_drain(tmp_path):
    """/v2/health/ready answers as /readyz does at every moment: 503 while the models warm
    up (the metrics port is up before them), 200 once ready, 503 through the drain; the
    liveness paths 200 throughout. A model's /v2/models/NAME/ready follows them, 400 where
    not ready, and is 400 for a model or version not served."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    starting = spawn(ServerProcess, counting(tmp_path / "slow", warm_up_steps=400_000), "--metrics-port",
                     str(port))  # fmt: skip

    def probed() -> dict[str, int]:
        return {path: _status(base + path) for path in (*PROBES, MODEL_READY)}

    warming = []  # what the probes said before the server said it was listening
    deadline = time.monotonic() + 60
    while not starting.done():
        assert time.monotonic() < deadline, "the server did not start"
        try:
            warming.append(probed())
        except urllib.error.URLError:  # the metrics port is not up yet
            time.sleep(0.01)
    srv, signalled = starting.result(), False
    try:
        assert "warm-up slow version 1" in srv.log
        # each answer read apart: at the moment it turns ready, /readyz may have said 503 and
        # /v2/health/ready then 200 (never the other way round), once
        not_yet = [p for p in warming if p["/readyz"] == 503]
        assert not_yet, f"no probe answered during the warm-up: {warming}"
        for p in warming:
            assert p["/healthz"] == p["/v2/health/live"] == 200, p
        for p in not_yet[:-1]:
            assert p["/v2/health/ready"] == 503 and p[MODEL_READY] == 400, p
        assert probed() == dict.fromkeys((*PROBES, MODEL_READY), 200)
        for path, status in {
            "/v2/models/slow/versions/1/ready": 200,
            "/v2/models/slow/versions/2/ready": 400,
            "/v2/models/other/ready": 400,
        }.items():
            assert _status(base + path) == status, path

        with tc.InferenceServerClient(srv.url) as c:
            long = {"input_ids": np.array([[3 * 10**6]]), "attention_mask": np.array([[1]])}
            c.async_infer("slow", inputs(long), callback=lambda result, error: None)
            deadline = time.monotonic() + 30
            while ": running a batch of" not in srv.log:  # the batcher's line (-v)
                assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log
                time.sleep(0.01)
            srv.proc.send_signal(signal.SIGTERM)
            signalled = True
            while "shutting down" not in srv.log:
                assert time.monotonic() < deadline, srv.log
                time.sleep(0.01)
            draining = probed()  # the request still runs: the drain, and the port, go on
            assert srv.proc.poll() is None, srv.log
            assert draining == {
                "/healthz": 200, "/v2/health/live": 200, "/readyz": 503, "/v2/health/ready": 503,
                MODEL_READY: 400,
            }, draining  # fmt: skip
    finally:
        if srv.proc.poll() is None and not signalled:
            srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(60)
    # the running request's client went with the channel: the drain ended there
    assert srv.proc.returncode == 0, srv.log


def test_a_signal_during_the_warm_up_is_never_said_ready(tmp_path):
    """SIGTERM while the models warm up: the server never turns SERVING, prints none of its
    ready lines (a script waiting for `listening on` would take it as up), and drains at
    once, exit 0."""
    bundle = counting(tmp_path / "slow", warm_up_steps=400_000)  # three runs of ~0.3 s
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantgate", "serve", str(bundle), "--port", "0", "--host",
         "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in proc.stderr:  # the first shape warmed: two more to go
            if "warm-up slow" in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out == "" and "serving on" not in err, (out, err)
    assert "SIGTERM: stopping before serving" in err and "shutting down" not in err, err
