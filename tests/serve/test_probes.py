"""The metrics port's probes on a real server: where it listens by default."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request

import tritonclient.grpc as tc
from conftest import ServerProcess

PROBES = ("/healthz", "/readyz")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_the_default_host_answers_probes_on_ipv4_and_ipv6(repo):
    """--host 0.0.0.0, the default (given here because ServerProcess passes 127.0.0.1):
    gRPC listens on every IPv4 and IPv6 address, and so does the metrics port, so an
    httpGet probe answers in an IPv6-only cluster too. The log says so."""
    srv = ServerProcess(repo / "classifier", "--host", "0.0.0.0", "--metrics-port", "0")
    try:
        port = re.search(r"metrics on http://\S+:(\d+)/metrics", "".join(srv.stdout)).group(1)
        grpc_port = srv.url.rpartition(":")[2]
        hosts = ["127.0.0.1"] + (["[::1]"] if _has_ipv6_loopback() else [])
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
