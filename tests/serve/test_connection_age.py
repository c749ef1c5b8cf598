"""--max-connection-age: a connection that old is sent a GOAWAY, its client reconnects
(through a load balancer: to any replica) without losing a call, and the calls in flight on
the old connection get --shutdown-grace to finish."""

from __future__ import annotations

import math
import queue
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import ServerProcess
from h2raw import Unread
from helpers import batch, inputs, until

from quantgate.errors import ConfigError
from quantgate.serve.config import ServeConfig

AGE = "1"  # seconds: gRPC jitters it by +-10%
NO_ERROR = 0x0  # HTTP/2's error code of a GOAWAY that asks the client to go, not one of failure
SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"
PEER = re.compile(r"method=(\S+) .*peer=(\S+)")


@pytest.fixture(scope="module")
def aging(repo) -> Iterator[ServerProcess]:
    """A server whose connections are renewed every second, its access log on (each line
    names the client's address and port: a new connection, a new port)."""
    srv = ServerProcess(repo / "classifier", "--max-connection-age", AGE, "--access-log")
    yield srv
    assert srv.terminate() == 0, srv.log


def _peers(srv: ServerProcess, method: str, since: int = 0) -> list[str]:
    """The client addresses of ``method``'s calls in ``srv``'s access log, from character
    ``since`` of the log, in order."""
    return [peer for m, peer in PEER.findall(srv.log[since:]) if m == method]


def _port(srv: ServerProcess) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def test_an_old_connection_is_sent_a_goaway_and_none_without_the_age(aging, repo):
    """Seen on the wire: a GOAWAY with no error, to a client that made no call and asked for
    nothing; a server with --max-connection-age 0 (off) sends none in that time and twice
    more."""
    off = ServerProcess(repo / "classifier", "--max-connection-age", "0")
    try:
        aged, kept = Unread("127.0.0.1", _port(aging)), Unread("127.0.0.1", _port(off))
        try:
            until(aged.goaway.is_set, timeout=30)
            assert aged.goaways[0] == NO_ERROR, aged.goaways
            time.sleep(2 * float(AGE))
            assert not kept.goaway.is_set(), kept.goaways
        finally:
            aged.close()
            kept.close()
    finally:
        assert off.terminate() == 0, off.log


def test_a_clients_calls_all_succeed_across_its_reconnects(aging):
    """A plain gRPC channel calling without a pause: each GOAWAY moves its next calls to a
    new connection (a new client port in the server's log), and not one call fails."""
    import grpc

    since = len(aging.log)
    with grpc.insecure_channel(aging.url) as channel:
        live = channel.unary_unary(SERVER_LIVE)
        calls = 0

        def renewed_twice() -> bool:
            nonlocal calls
            live(b"", timeout=10)  # raises on any status but OK
            calls += 1
            return len(set(_peers(aging, SERVER_LIVE, since))) >= 3

        until(renewed_twice, timeout=60)
    until(lambda: len(_peers(aging, SERVER_LIVE, since)) == calls)  # every call logged
    codes = re.findall(r"/ServerLive .*?code=(\S+)", aging.log[since:])
    assert codes == ["OK"] * calls, codes


def test_a_stream_open_when_its_connection_ages_goes_on_within_the_grace(aging):
    """An admitted call is not cut when its connection is renewed: a ModelStreamInfer stream
    opened before the GOAWAY answers after it, while the channel's new calls run on the new
    connection (--shutdown-grace, 25 s by default, is the old one's grace)."""
    import tritonclient.grpc as tc

    since = len(aging.log)
    answers: queue.Queue = queue.Queue()
    rng = np.random.default_rng(0)
    with tc.InferenceServerClient(aging.url) as client:
        client.start_stream(lambda result, error: answers.put(error))

        def asked() -> None:
            client.async_stream_infer("tiny-classifier", inputs(batch(rng, 1, 8)))
            assert answers.get(timeout=30) is None

        asked()
        # the channel's unary calls show the first connection, then a new one
        until(lambda: client.is_server_live() and len(set(_peers(aging, SERVER_LIVE, since))) >= 2,
              timeout=60)  # fmt: skip
        asked()  # on the connection told to go away
        client.stop_stream()
    until(lambda: _peers(aging, "/inference.GRPCInferenceService/ModelStreamInfer", since))
    (stream,) = _peers(aging, "/inference.GRPCInferenceService/ModelStreamInfer", since)
    lives = _peers(aging, SERVER_LIVE, since)
    assert len(set(lives)) >= 2 and stream != lives[-1], (stream, lives)
    assert "requests=2 failed=0" in aging.log[since:], aging.log[since:]


def test_a_stream_still_open_when_the_grace_runs_out_is_ended(repo):
    """The grace is --shutdown-grace, not gRPC's own (none: an open stream would hold the old
    connection, and its replica, for ever): with a grace of 1 s, a stream kept open is
    ended UNAVAILABLE some 2 s after it opened (the age, then the grace)."""
    import tritonclient.grpc as tc

    srv = ServerProcess(repo / "classifier", "--max-connection-age", AGE, "--shutdown-grace", "1")
    try:
        answers: queue.Queue = queue.Queue()
        rng = np.random.default_rng(0)
        with tc.InferenceServerClient(srv.url) as client:
            client.start_stream(lambda result, error: answers.put(error))
            client.async_stream_infer("tiny-classifier", inputs(batch(rng, 1, 8)))
            assert answers.get(timeout=30) is None  # answered, and left open
            ended = answers.get(timeout=30)  # no grace of its own: it never would be
            assert "max connection age" in str(ended), ended
            client.stop_stream()
    finally:
        assert srv.terminate() == 0, srv.log


@pytest.mark.parametrize("age", [-1.0, math.nan, math.inf])
def test_an_age_that_is_no_number_of_seconds_is_refused(age):
    with pytest.raises(ConfigError, match="max_connection_age_s is the seconds after which"):
        ServeConfig(path="b", max_connection_age_s=age)
    assert ServeConfig(path="b").max_connection_age_s == 0  # off unless asked


def test_a_grace_without_end_beside_a_connection_age_starts(repo):
    """--shutdown-grace inf (a drain that waits for every request) is gRPC's grace for an
    aged connection too: its milliseconds overflowed an int, and the start crashed with a
    traceback (exit 1). A grace that is no number is refused."""
    srv = ServerProcess(
        repo / "classifier", "--max-connection-age", "300", "--shutdown-grace", "inf"
    )
    assert srv.terminate() == 0, srv.log
    assert "Traceback" not in srv.log, srv.log
    for grace in (-1.0, math.nan):
        with pytest.raises(ConfigError, match="shutdown_grace_s is the seconds admitted"):
            ServeConfig(path="b", shutdown_grace_s=grace)


def test_the_cli_refuses_a_negative_age():
    r = subprocess.run(
        [sys.executable, "-m", "quantgate", "serve", "b", "--max-connection-age", "-1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "Invalid value for '--max-connection-age'" in r.stderr, r.stderr
