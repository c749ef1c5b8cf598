"""More calls in flight than the server's limit: answered UNAVAILABLE at once, counted and
logged, where gRPC's own limit answered RESOURCE_EXHAUSTED that nothing counted."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import grpc
import pytest
from conftest import ServerProcess

SERVICE = "/inference.GRPCInferenceService/"
QUEUE = 4  # --max-queue-size: request threads 4 x 1 model + 16 spare = 20, limit 40
LIMIT = 2 * (QUEUE + 16)


def _metric(srv: ServerProcess, name: str) -> float:
    url = re.search(r"metrics on (http://\S+/metrics)", "".join(srv.stdout)).group(1)
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_calls_beyond_the_limit_are_refused_unavailable_counted_and_logged(repo):
    """LIMIT calls held in flight (each a ModelInfer whose client holds back its message:
    half wait for it on a request thread, half for a thread), then every new call, of any
    RPC, is refused UNAVAILABLE at once, as a full queue is, and counted; once they end, the
    server serves again. Counted by the server as the client saw them."""
    srv = ServerProcess(
        repo / "classifier", "--max-queue-size", str(QUEUE), "--metrics-port", "0", "--access-log"
    )
    release = threading.Event()

    def held_back():  # the message a client never sends (until the test ends)
        release.wait(60)
        return
        yield

    channel = grpc.insecure_channel(srv.url)
    held = []
    try:
        live = channel.unary_unary(SERVICE + "ServerLive")  # bytes in, bytes out: no protos
        infer = channel.stream_unary(SERVICE + "ModelInfer")
        assert live(b"", timeout=10) == b"\x08\x01"  # live: true
        held = [infer.future(held_back(), timeout=60) for _ in range(LIMIT)]
        refusals = []
        deadline = time.monotonic() + 60
        while not refusals:  # until the server has taken every held call up
            assert time.monotonic() < deadline, "no call was refused"
            try:
                live(b"", timeout=2)
            except grpc.RpcError as e:
                # one that came before the held calls were all in waits for a thread, in
                # flight too, until its deadline
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    refusals.append(e)
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(SERVICE + "ModelInfer")(b"", timeout=10)
        refusals.append(refused.value)
        # the saturation an operator sees: at the limit (the scrape is HTTP, no call)
        assert _metric(srv, "quantgate_calls_in_flight") == LIMIT
        assert _metric(srv, "quantgate_calls_in_flight_limit") == LIMIT
        for e in refusals:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
            assert e.details() == (
                f"the server is overloaded: {LIMIT} calls are in flight, its limit. Retry "
                "with backoff, or add replicas"
            )

        release.set()  # the held calls end (no message: refused), and it serves again
        ended = [f.exception(timeout=30) for f in held]
        # a poll that reached the server before the last held calls took a place of theirs
        refused_held = [e for e in ended if e.code() == grpc.StatusCode.UNAVAILABLE]
        assert all(e.details() == refusals[0].details() for e in refused_held), refused_held
        assert {e.code() for e in ended} <= {
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED
        }, ended  # fmt: skip
        assert live(b"", timeout=10) == b"\x08\x01"
        assert _metric(srv, "quantgate_overloaded_calls_total") == len(refusals) + len(refused_held)
    finally:
        release.set()
        channel.close()
        assert srv.terminate() == 0, srv.log
    lines = re.findall(r"quantgate\.serve\.access: method=(\S+) .*code=UNAVAILABLE", srv.log)
    assert lines.count(SERVICE + "ModelInfer") == 1 + len(refused_held), srv.log
    assert lines.count(SERVICE + "ServerLive") == len(refusals) - 1, srv.log
