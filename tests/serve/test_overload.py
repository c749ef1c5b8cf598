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
    half wait for it on a request thread, half for a thread), then every new call of the
    inference service is refused UNAVAILABLE at once, as a full queue is, and counted, while
    the probes, on threads of their own, are answered; once they end, the server serves
    again. Counted by the server as the client saw them."""
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
        metadata = channel.unary_unary(SERVICE + "ServerMetadata")
        infer = channel.stream_unary(SERVICE + "ModelInfer")
        assert live(b"", timeout=10) == b"\x08\x01"  # live: true
        held = [infer.future(held_back(), timeout=60) for _ in range(LIMIT)]
        refusals = []
        deadline = time.monotonic() + 60
        while not refusals:  # until the server has taken every held call up
            assert time.monotonic() < deadline, "no call was refused"
            try:
                metadata(b"", timeout=2)
            except grpc.RpcError as e:
                # one that came before the held calls were all in waits for a thread, in
                # flight too, until its deadline
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    refusals.append(e)
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(SERVICE + "ModelInfer")(b"", timeout=10)
        refusals.append(refused.value)
        assert live(b"", timeout=10) == b"\x08\x01"  # a probe: on threads of its own
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
    assert lines.count(SERVICE + "ServerMetadata") == len(refusals) - 1, srv.log


def _held_calls(channel, method: str, n: int, release: threading.Event, metadata=()):
    """``n`` calls of ``method`` whose client sends half of them: no message, until
    ``release`` (a stream into a unary method: the server waits for its one message)."""

    def held_back():
        release.wait(60)
        return
        yield

    call = channel.stream_unary(SERVICE + method)
    return [call.future(held_back(), timeout=60, metadata=metadata) for _ in range(n)]


def test_calls_without_a_token_hold_no_request_thread(repo):
    """With --token, a client without one sent calls and held back their messages: each
    held a request thread until its message came (refused only then), so 544 of them on one
    connection refused every authenticated call, and buffered up to 4 MB each. Now refused
    at once, unread, on threads of their own; the open calls (probes), held the same way,
    take threads of their own too, never the inference service's."""
    srv = ServerProcess(
        repo / "classifier", "--max-queue-size", str(QUEUE), "--metrics-port", "0",
        "--auth-token", "s3cret",
    )  # fmt: skip
    release = threading.Event()
    channel = grpc.insecure_channel(srv.url)
    token = (("authorization", "Bearer s3cret"),)
    try:
        metadata = channel.unary_unary(SERVICE + "ServerMetadata")
        # no token: refused at once, though the message never comes
        refused = _held_calls(channel, "ModelInfer", 3 * LIMIT, release)
        for call in refused:
            e = call.exception(timeout=30)
            assert e is not None and e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        assert _metric(srv, "quantgate_unauthenticated_requests_total") == 3 * LIMIT
        # open calls held by a client without a token: on the open calls' threads
        held = _held_calls(channel, "ServerLive", 3 * LIMIT, release)
        deadline = time.monotonic() + 60
        while not any(f.done() for f in held):  # beyond their limit: refused
            assert time.monotonic() < deadline, "no held open call was refused"
            time.sleep(0.05)
        assert _metric(srv, "quantgate_calls_in_flight") == 0  # no request thread taken
        assert metadata(b"", timeout=10, metadata=token)  # the inference service answers
        with pytest.raises(grpc.RpcError) as e:  # a probe, held out by the held ones
            channel.unary_unary(SERVICE + "ServerLive")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            "calls to its health, liveness and reflection methods are in flight, their limit"
            in (e.value.details())
        )
    finally:
        release.set()
        channel.close()
        assert srv.terminate() == 0, srv.log


def test_answers_a_client_never_reads_count_as_calls_in_flight(repo):
    """gRPC holds an answer until the client's flow control lets it go, after the request
    thread is free: a client that announced no window had the server hold answer after
    answer (1 GB in a review), uncounted. Each is now a call in flight until taken: at the
    limit, new calls are refused, and once the client goes they are released."""
    from h2raw import Unread
    from tritonclient.grpc import service_pb2 as pb

    srv = ServerProcess(repo / "classifier", "--max-queue-size", str(QUEUE), "--metrics-port", "0")
    ask = pb.ModelInferRequest(model_name="tiny-classifier")
    for name, values in (("input_ids", [1, 2, 3]), ("attention_mask", [1, 1, 1])):
        tensor = ask.inputs.add(name=name, datatype="INT64", shape=[1, 3])
        tensor.contents.int64_contents.extend(values)
    channel = grpc.insecure_channel(srv.url)
    infer = channel.unary_unary(SERVICE + "ModelInfer")
    unread = Unread("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
    try:
        assert infer(ask.SerializeToString(), timeout=10)  # answered: the request is good
        deadline = time.monotonic() + 60
        while _metric(srv, "quantgate_calls_in_flight") < LIMIT:  # some are refused queue_full
            assert time.monotonic() < deadline, _metric(srv, "quantgate_calls_in_flight")
            for _ in range(4):
                unread.call(SERVICE + "ModelInfer", ask.SerializeToString())
            time.sleep(0.1)
        unread.call(SERVICE + "ModelInfer", ask.SerializeToString())  # refused: overloaded
        with pytest.raises(grpc.RpcError) as refused:
            infer(ask.SerializeToString(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "calls are in flight, its limit" in refused.value.details()
        assert _metric(srv, "quantgate_overloaded_calls_total") >= 1
        unread.close()  # the client goes: its answers with it
        deadline = time.monotonic() + 60
        while _metric(srv, "quantgate_calls_in_flight") > 0:
            assert time.monotonic() < deadline, _metric(srv, "quantgate_calls_in_flight")
            time.sleep(0.05)
        assert infer(ask.SerializeToString(), timeout=10)
    finally:
        unread.close()
        channel.close()
        assert srv.terminate() == 0, srv.log
