"""--metrics-host: the metrics port's own address, apart from gRPC's --host (metrics on the
loopback for a sidecar while gRPC listens on every address, or the reverse)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.request

import pytest
from conftest import ServerProcess
from helpers import has_ipv6_loopback

from quantgate.errors import ConfigError
from quantgate.serve.config import ServeConfig

METRICS_URL = re.compile(r"metrics on http://(\S+):(\d+)/metrics")


def _connects(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` (a TCP connection is accepted)."""
    try:
        socket.create_connection((host, port), timeout=10).close()
    except ConnectionRefusedError:
        return False
    return True


def _ports(srv: ServerProcess) -> tuple[str, int, int]:
    """The metrics port's host and port as stdout prints them, and the gRPC port."""
    host, port = METRICS_URL.search("".join(srv.stdout)).groups()
    return host, int(port), int(srv.url.rsplit(":", 1)[1])


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this host has no IPv6 loopback")
@pytest.mark.parametrize(
    ("grpc_host", "metrics_host"), [("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "0.0.0.0")]
)
def test_the_metrics_port_listens_where_metrics_host_says(repo, grpc_host, metrics_host):
    """Each port where its own flag puts it, told apart by ::1, which 0.0.0.0 takes (IPv6
    too) and 127.0.0.1 does not."""
    srv = ServerProcess(repo / "classifier", "--host", grpc_host, "--metrics-port", "0",
                        "--metrics-host", metrics_host)  # fmt: skip
    try:
        printed, metrics, grpc = _ports(srv)
        assert printed == metrics_host, srv.stdout
        every = {"0.0.0.0": True, "127.0.0.1": False}
        assert _connects("::1", metrics) == every[metrics_host], (metrics_host, srv.log)
        assert _connects("::1", grpc) == every[grpc_host], (grpc_host, srv.log)
        answer = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/readyz", timeout=10)
        assert answer.status == 200
        said = f"Prometheus metrics on http://{'[::]' if every[metrics_host] else metrics_host}:"
        assert said in srv.log, srv.log
    finally:
        assert srv.terminate() == 0, srv.log


def _serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantgate", "-v", "serve", *flags, "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_metrics_host_that_cannot_be_listened_on_is_named_before_the_models_load(repo):
    """As --host is refused: the flag, the address and why, exit 2, no model loaded; and
    --metrics-host without a metrics port, which it would set nothing for."""
    bundle = str(repo / "classifier")
    for flags, says in (
        (("--metrics-host", "192.0.2.1"),  # TEST-NET-1: never an address of this machine
         "cannot serve metrics on 192.0.2.1:0: --metrics-host 192.0.2.1 is not an address of "
         "this machine"),
        (("--metrics-host", "no-such-host.invalid"),
         "--metrics-host no-such-host.invalid does not resolve to an address"),
    ):  # fmt: skip
        r = _serve(bundle, "--host", "127.0.0.1", "--metrics-port", "0", *flags)
        said = " ".join(r.stderr.split())
        assert r.returncode == 2 and says in said and "Traceback" not in said, r.stderr
        assert "loaded tiny-classifier" not in r.stderr, r.stderr
    r = _serve(bundle, "--metrics-host", "127.0.0.1")
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "give --metrics-port too" in said, r.stderr


def test_metrics_host_is_read_as_host_is():
    cfg = ServeConfig(path="b", metrics_port=9090, metrics_host="[::1]")
    assert (cfg.metrics_host, cfg.metrics_address(9090)) == ("::1", "[::1]:9090")
    assert ServeConfig(path="b", host="::", metrics_port=9090).metrics_address(1) == "[::]:1"
    with pytest.raises(ConfigError, match="--metrics-host is empty"):
        ServeConfig(path="b", metrics_port=9090, metrics_host="")
    with pytest.raises(ConfigError, match="give --metrics-port too"):
        ServeConfig(path="b", metrics_host="127.0.0.1")


def test_one_port_number_serves_both_on_two_addresses(repo):
    """The gRPC and metrics ports may share a number on addresses that share nothing
    (127.0.0.1 and 127.0.0.2, both this machine's loopback on Linux): refused only where
    the two could take one address (the same host, or every interface, or a name)."""
    for host, metrics in (("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "::1"),
                          ("localhost", "127.0.0.2")):  # fmt: skip
        with pytest.raises(ConfigError, match="is the gRPC --port too"):
            ServeConfig(path="b", host=host, port=8001, metrics_port=8001, metrics_host=metrics)
    ServeConfig(path="b", host="127.0.0.1", port=8001, metrics_port=8001, metrics_host="::1")
    with socket.socket() as s:  # a free port on 127.0.0.1; 127.0.0.2's is free with it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = ServerProcess(repo / "classifier", "--host", "127.0.0.1", "--port", str(port),
                        "--metrics-host", "127.0.0.2", "--metrics-port", str(port))  # fmt: skip
    try:
        printed, metrics, _ = _ports(srv)
        assert (printed, metrics) == ("127.0.0.2", port), srv.stdout
        answer = urllib.request.urlopen(f"http://127.0.0.2:{port}/readyz", timeout=10)
        assert answer.status == 200 and _connects("127.0.0.1", port)
    finally:
        assert srv.terminate() == 0, srv.log
