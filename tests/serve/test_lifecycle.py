"""Overload, graceful shutdown, auth and TLS: each on its own server subprocess."""

from __future__ import annotations

import contextlib
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pki
import pytest
import tritonclient.grpc as tc
from bundles import counting
from conftest import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import Reference, batch, inputs, metric, queue_depth
from tritonclient.utils import InferenceServerException

ATOL = 1e-4


def test_overload_answers_unavailable_at_once(tmp_path):
    bundle = counting(tmp_path / "slow")
    srv = ServerProcess(bundle, "--max-queue-size", "4", "--metrics-port", "0")
    try:
        reference = Reference(bundle)
        rng = np.random.default_rng(0)
        requests = [batch(rng, 8, 64) for _ in range(30)]
        results = _overflow(srv, requests, queued=4)
        refused = [e for _, e in results if e is not None]
        assert len(refused) == len(requests) - 4, refused[:3]  # all but the 4 queued
        for e in refused:
            assert e.status() == "StatusCode.UNAVAILABLE" and "queue full" in e.message(), e
        for (got, e), feeds in zip(results, requests, strict=True):
            if e is None:
                np.testing.assert_allclose(got, reference(feeds), atol=ATOL)
        with tc.InferenceServerClient(srv.url) as c:  # and it still serves
            got = c.infer("slow", inputs(requests[0])).as_numpy("counted")
        np.testing.assert_allclose(got, reference(requests[0]), atol=ATOL)
        # an operator tells a full queue from a warm-up or a drain: each refusal by reason
        url = re.search(r"metrics on (http://\S+/metrics)", "".join(srv.stdout)).group(1)
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        counted = {
            reason: float(n)
            for reason, n in re.findall(
                r'^quantgate_refused_requests_total\{[^}]*reason="(\w+)"[^}]*\} (\S+)$', text, re.M
            )
        }
        assert counted == {
            "queue_full": len(refused),
            "warming_up": 0,
            "shutting_down": 0,
            "timeout": 0,
        }, text
    finally:
        assert srv.terminate() == 0, srv.log


def test_sigterm_finishes_admitted_requests_and_exits_0(repo):
    """Requests queued when SIGTERM arrives all complete; later ones are refused; exit 0."""
    # A batching delay far beyond the test: the requests wait in the queue until the drain
    # lets every batcher stop waiting for company, whatever the machine's load.
    srv = ServerProcess(
        repo / "classifier", "--max-queue-delay-us", "30000000", "--metrics-port", "0"
    )
    reference = Reference(repo / "classifier")
    rng = np.random.default_rng(1)
    admitted = [batch(rng, 1, 10 + i) for i in range(8)]
    answers: list[queue.Queue] = [queue.Queue() for _ in admitted]
    stop, late_errors, late_ok = threading.Event(), [], [0]

    def keep_sending() -> None:  # load that continues through the shutdown
        with tc.InferenceServerClient(srv.url) as c:
            while not stop.is_set():
                feeds = batch(rng, 1, 12)
                try:
                    got = c.infer("tiny-classifier", inputs(feeds)).as_numpy("logits")
                    np.testing.assert_allclose(got, reference(feeds), atol=ATOL)
                    late_ok[0] += 1
                except InferenceServerException as e:
                    late_errors.append(e)
                    time.sleep(0.01)

    with tc.InferenceServerClient(srv.url) as c:
        for q, feeds in zip(answers, admitted, strict=True):
            c.async_infer(
                "tiny-classifier",
                inputs(feeds),
                callback=lambda result, error, q=q: q.put((result, error)),
            )
        _until(lambda: queue_depth(srv) == 8, srv)  # admitted, waiting for company
        load = threading.Thread(target=keep_sending)
        load.start()
        _until(lambda: queue_depth(srv) == 9, srv)  # and the load's first request
        code = srv.terminate()
        stop.set()
        load.join()
        results = [q.get(timeout=30) for q in answers]
    assert code == 0, srv.log
    for (result, error), feeds in zip(results, admitted, strict=True):
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("logits"), reference(feeds), atol=ATOL)
    assert late_ok[0] >= 1  # the load's request that was queued at the signal
    # What came after the signal never ran half-way: refused by the server or by gRPC
    # (UNAVAILABLE), or cut by gRPC's stop before it ran (CANCELLED, grpc/grpc#41785).
    statuses = {e.status() for e in late_errors}
    assert statuses <= {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}, late_errors[:5]


def test_sigterm_refuses_new_requests_on_a_stream_already_open(repo):
    """A stream opened before SIGTERM gets its answers; a request it sends after the signal
    is refused in the stream (UNAVAILABLE), and the server exits 0 once the stream ends."""
    srv = ServerProcess(repo / "classifier")
    reference = Reference(repo / "classifier")
    rng = np.random.default_rng(2)
    before, after = batch(rng, 1, 9), batch(rng, 1, 11)
    answers: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(srv.url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("tiny-classifier", inputs(before), request_id="before")
        result, error = answers.get(timeout=30)
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("logits"), reference(before), atol=ATOL)
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not any("shutting down" in line for line in srv.stderr):
            assert time.monotonic() < deadline, srv.log
            time.sleep(0.05)
        c.async_stream_infer("tiny-classifier", inputs(after), request_id="after")
        _, error = answers.get(timeout=30)
        c.stop_stream()
    assert error is not None and "UNAVAILABLE" in str(error), error
    assert srv.proc.wait(60) == 0, srv.log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_and_a_closed_terminal_drain_as_sigterm_does(repo, sig):
    srv = ServerProcess(repo / "classifier")
    with tc.InferenceServerClient(srv.url) as c:
        assert c.infer("tiny-classifier", inputs(batch(np.random.default_rng(4), 1, 9)))
    srv.proc.send_signal(sig)
    assert srv.proc.wait(60) == 0, srv.log
    assert f"{sig.name}: shutting down" in srv.log, srv.log
    assert "stopped: every admitted request was answered" in srv.log


def test_an_idle_stream_ends_at_sigterm_instead_of_holding_the_drain(repo):
    """A client keeps a stream open, answered and idle. At SIGTERM the stream ends with
    UNAVAILABLE that says the server is going away, and the server exits 0 long before its
    grace (600 s here) runs out: the idle stream does not hold the drain."""
    srv = ServerProcess(repo / "classifier", "--shutdown-grace", "600")
    answers: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(srv.url) as c:
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        c.async_stream_infer("tiny-classifier", inputs(batch(np.random.default_rng(3), 1, 9)))
        assert answers.get(timeout=30)[1] is None
        srv.proc.send_signal(signal.SIGTERM)
        _, error = answers.get(timeout=60)
        code = srv.proc.wait(60)
        c.stop_stream()
    assert code == 0 and "stopped: every admitted request was answered" in srv.log, srv.log
    assert "UNAVAILABLE" in str(error) and "shutting down" in str(error), error


def test_a_stream_that_keeps_sending_ends_at_sigterm_instead_of_holding_the_drain(repo):
    """A client sends on its stream every 50 ms through SIGTERM. The stream reads no more
    once the server shuts down, sends the answers it owes, and ends UNAVAILABLE; the server
    exits 0 long before its grace (600 s here). Before, each later request was answered
    "shutting down" in a stream left open until the grace ran out."""
    srv = ServerProcess(repo / "classifier", "--shutdown-grace", "600")
    answers: queue.Queue = queue.Queue()
    feeds = inputs(batch(np.random.default_rng(5), 1, 9))
    stop = threading.Event()

    def keep_sending(c) -> None:
        while not stop.is_set():
            try:
                c.async_stream_infer("tiny-classifier", feeds)
            except InferenceServerException:  # the stream has ended
                return
            time.sleep(0.05)

    with tc.InferenceServerClient(srv.url) as c:
        c.start_stream(callback=lambda result, error: answers.put(error))
        sender = threading.Thread(target=keep_sending, args=(c,), daemon=True)
        sender.start()
        assert answers.get(timeout=30) is None  # answered while serving
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(60)  # before: the 600 s grace
        stop.set()
        sender.join(10)
        c.stop_stream()
    errors = []
    while not answers.empty():
        if (error := answers.get()) is not None:
            errors.append(str(error))
    assert code == 0 and "stopped: every admitted request was answered" in srv.log, srv.log
    assert errors and all("UNAVAILABLE" in e and "shutting down" in e for e in errors), errors
    assert len(errors) <= 3, errors  # the stream's end, not an answer per request sent since


RUNNING = ": running a batch of"  # the batcher's debug line (ServerProcess runs -v)


def _running(srv: ServerProcess, send) -> None:
    """``send()`` a request, and return once its batch runs: a request that takes seconds
    then holds the model, or a drain, however loaded the machine."""
    before = srv.log.count(RUNNING)
    send()
    deadline = time.monotonic() + 30
    while srv.log.count(RUNNING) <= before:
        assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log
        time.sleep(0.01)


# input_ids=[[10**10]]: hours of loop steps, until its client goes (its run is then stopped)
ENDLESS = {"input_ids": np.array([[10**10]]), "attention_mask": np.array([[1]])}


def _overflow(srv: ServerProcess, requests: list[dict], queued: int) -> list:
    """Overload made certain, on the slow bundle served with --max-queue-size ``queued``:
    a request that would run for hours holds the model's only runner slot while every
    request is sent at once, so ``queued`` of them wait in the queue and the rest must be
    refused; those answers come while the model is still held (at once: no refused request
    waited for a slot). Then the holding client goes, its run is stopped, and the queued
    requests run. Returns (result array or None, error) per request, in order."""
    answers: list[queue.Queue] = [queue.Queue() for _ in requests]
    held: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(srv.url) as c:
        with tc.InferenceServerClient(srv.url) as holder:
            _running(
                srv,
                lambda: holder.async_infer(
                    "slow", inputs(ENDLESS), callback=lambda result, error: held.put(error)
                ),
            )
            for q, feeds in zip(answers, requests, strict=True):
                c.async_infer(
                    "slow",
                    inputs(feeds),
                    callback=lambda result, error, q=q: q.put((result, error)),
                )
            refused = len(requests) - queued

            def answered() -> int:
                return sum(q.qsize() for q in answers)

            _until(lambda: answered() >= refused, srv)
            assert answered() == refused and held.empty(), (answered(), srv.log)
        # the holder's channel is closed: its call is cancelled, and its run stopped
        results = [q.get(timeout=60) for q in answers]
    return [(None if e else r.as_numpy("counted"), e) for r, e in results]


def test_a_second_sigterm_does_not_wait_for_the_drain(tmp_path):
    """A request that would run for hours holds the drain open; the operator's second
    signal ends the process then and there, with 128 + SIGTERM, the request unanswered."""
    srv = ServerProcess(counting(tmp_path / "slow"))
    held: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(srv.url) as c:
        _running(
            srv,
            lambda: c.async_infer(
                "slow", inputs(ENDLESS), callback=lambda result, error: held.put((result, error))
            ),
        )
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not any("shutting down" in line for line in srv.stderr):
            assert time.monotonic() < deadline, srv.log
            time.sleep(0.05)
        assert srv.proc.poll() is None and held.empty(), srv.log  # draining: it still runs
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(20)  # well inside the 25 s grace the drain may take
        result, error = held.get(timeout=30)  # the connection ended with the process
    assert code == 128 + signal.SIGTERM, srv.log
    assert result is None and error.status() == "StatusCode.UNAVAILABLE", error  # unanswered
    assert "second SIGTERM: exiting without finishing admitted requests" in srv.log


def test_clients_move_to_another_server_while_one_drains(tmp_path):
    """Two servers behind one client channel (round robin over both addresses, as a client
    balances a Kubernetes service's endpoints). One gets SIGTERM while a request that runs
    for seconds holds its drain open: its GOAWAY moves the channel's new calls to the other
    server, which answers them through the drain; the running request is still answered.
    A second request, one that would run for hours, keeps the drain open until the test
    has seen 20 calls answered through it; then its client goes, and the drain ends.

    The client sends one call at a time, so at most a call or two race the signal itself:
    sent before the client saw the GOAWAY, such a call is ended by gRPC with CANCELLED,
    never having run (grpc/grpc#41785), or refused by the engine (UNAVAILABLE). What the
    draining server must not do is refuse its share of the calls for the whole drain, as it
    did while the engine closed before gRPC stopped: hundreds here."""
    bundle = counting(tmp_path / "slow")
    draining = ServerProcess(bundle, "--instances", "2", "--shutdown-grace", "600")
    other = ServerProcess(bundle)
    long = {"input_ids": np.array([[3 * 10**6]]), "attention_mask": np.array([[1]])}
    quick = {"input_ids": np.array([[1]]), "attention_mask": np.array([[1]])}
    both = f"ipv4:{draining.url},{other.url}"
    held: queue.Queue = queue.Queue()
    failed, answered = [], 0
    try:
        with (
            tc.InferenceServerClient(draining.url) as direct,
            tc.InferenceServerClient(
                both, channel_args=[("grpc.lb_policy_name", "round_robin")]
            ) as balanced,
        ):
            for _ in range(20):  # both endpoints connected and answering
                balanced.infer("slow", inputs(quick))
            _running(
                draining,
                lambda: direct.async_infer(
                    "slow", inputs(long), callback=lambda result, error: held.put((result, error))
                ),
            )
            with tc.InferenceServerClient(draining.url) as holder:  # the second slot
                _running(
                    draining,
                    lambda: holder.async_infer(
                        "slow", inputs(ENDLESS), callback=lambda result, error: None
                    ),
                )
                draining.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 120
                while answered < 20:  # the drain, held open by the endless request
                    assert draining.proc.poll() is None, draining.log
                    assert time.monotonic() < deadline, (answered, failed)
                    try:  # one that races the signal may wait for the long one's slot
                        balanced.infer("slow", inputs(quick), client_timeout=60)
                        answered += 1
                    except InferenceServerException as e:
                        failed.append((e.status(), e.message()))
            # the holder's channel is closed: its call is cancelled, its run stopped
            result, error = held.get(timeout=60)
            assert draining.proc.wait(60) == 0, draining.log
        assert error is None and result.as_numpy("counted")[0, 0] == 3 * 10**6, error
        assert "stopped: every admitted request was answered" in draining.log
        assert len(failed) <= 3, failed  # the race with the signal, not half the traffic
        for status, message in failed:  # and none ran half-way
            assert status in ("StatusCode.CANCELLED", "StatusCode.UNAVAILABLE"), (status, message)
    finally:
        for srv in (draining, other):
            if srv.proc.poll() is None:
                srv.terminate()


def test_a_request_timeout_that_passes_in_the_queue_answers_as_triton_does(tmp_path):
    """Triton's request parameter `timeout` (microseconds) bounds the wait in the queue:
    queued behind a request that runs for seconds, the request is not run late, and is
    answered as Triton answers it, UNAVAILABLE "Request timeout expired" (a Triton client
    may retry it). A call's own gRPC deadline, sooner, stays DEADLINE_EXCEEDED."""
    srv = ServerProcess(counting(tmp_path / "slow"), "--metrics-port", "0")
    try:
        slow = {"input_ids": np.array([[10**10]]), "attention_mask": np.array([[1]])}
        quick = {"input_ids": np.array([[1]]), "attention_mask": np.array([[1]])}
        held: queue.Queue = queue.Queue()
        with tc.InferenceServerClient(srv.url) as c:
            _running(
                srv,
                lambda: c.async_infer(
                    "slow", inputs(slow), callback=lambda result, error: held.put(error)
                ),
            )
            with pytest.raises(InferenceServerException) as own:
                c.infer("slow", inputs(quick), timeout=200_000)  # 0.2 s
            with pytest.raises(InferenceServerException) as call:
                c.infer("slow", inputs(quick), timeout=60_000_000, client_timeout=0.2)
            assert held.empty()  # queued behind a request still running, not after it
        assert own.value.status() == "StatusCode.UNAVAILABLE", own.value
        assert own.value.message().startswith("Request timeout expired: model 'slow'")
        assert "(200000 µs)" in own.value.message(), own.value
        assert call.value.status() == "StatusCode.DEADLINE_EXCEEDED", call.value
        url = re.search(r"metrics on (http://\S+/metrics)", "".join(srv.stdout)).group(1)
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'reason="timeout",version="1"} 1.0' in text, text  # a busy model, counted
    finally:
        srv.terminate()


class _LateHeaders:
    """A TCP proxy to ``port`` that holds what the client sends for ``delay`` seconds while
    ``late`` is set. A call sent then reaches the server late, and the server counts the
    call's deadline from then, as a loaded server counts it from when it reads the headers;
    the client's own deadline runs from the send, and its cancellation arrives on time."""

    def __init__(self, port: int, delay: float):
        self.port, self.delay, self.late = port, delay, threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            server = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, outbound: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(1 << 16):
                if outbound and self.late.is_set():
                    time.sleep(self.delay)
                sink.sendall(chunk)
        # one side closed: so does the other. A connection left open to the server held
        # its stop at SIGTERM for 20 s, gRPC waiting for the client to close it.
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def test_a_deadline_the_client_ends_before_the_servers_clock_is_counted_as_one(tmp_path):
    """Under load the server reads a call's headers late, and the client's deadline cancels
    the call before the server's own clock reaches it (5-15 ms before, 20 concurrent calls
    on 2 cores). That is a deadline, not a cancellation, in the access log and the metrics:
    a 1 ms slack counted a third of such deadlines as CANCELLED."""
    srv = ServerProcess(counting(tmp_path / "slow"), "--access-log")
    # headers 10 ms late: within the server's 50 ms slack, with room for a busy host's
    # oversleeping (at 25 ms, 4 of 10 runs with two more busy processes were CANCELLED)
    proxy = _LateHeaders(int(srv.url.rsplit(":", 1)[1]), delay=0.01)
    quick = {"input_ids": np.array([[1]]), "attention_mask": np.array([[1]])}

    def access() -> list[str]:
        return [line for line in srv.log.splitlines() if "method=" in line and "ModelInfer" in line]

    held: queue.Queue = queue.Queue()  # the holder's answer, should it end early
    try:
        with (
            tc.InferenceServerClient(srv.url) as c,  # open: its call holds the model
            tc.InferenceServerClient(proxy.url) as late,
        ):
            # until its client goes, which is after the server has said how the request
            # behind it ended: closed at the late client's deadline, the holder freed the
            # model within the late request's own time on the server's clock, and it was
            # answered OK (at 479 and 481 ms: twice seen, in full runs of the suite)
            _running(
                srv,
                lambda: c.async_infer(
                    "slow", inputs(ENDLESS), callback=lambda result, error: held.put(error)
                ),
            )
            assert late.is_server_live()  # connected: what is held from here is the call
            proxy.late.set()
            threading.Timer(0.25, proxy.late.clear).start()  # the cancellation is not held
            t0 = time.monotonic()
            try:
                late.infer("slow", inputs(quick), client_timeout=0.5)
            except InferenceServerException as e:
                err = e
            else:
                pytest.fail(
                    f"answered at {time.monotonic() - t0:.3f} s while the model was held; the "
                    f"holder's answer: {list(held.queue) or 'none yet'}; server log:\n{srv.log}"
                )
            assert err.status() == "StatusCode.DEADLINE_EXCEEDED", err
            deadline = time.monotonic() + 30
            while not any("code=DEADLINE_EXCEEDED" in line or "code=CANCELLED" in line
                          for line in access()):  # fmt: skip
                assert time.monotonic() < deadline, srv.log
                time.sleep(0.05)
    finally:
        srv.terminate()
    assert any("code=DEADLINE_EXCEEDED" in line for line in access()), (
        f"{access()}; the holder's answer: {list(held.queue) or 'none'}; server log:\n{srv.log}"
    )


def test_requests_a_streams_deadline_cuts_off_are_counted_as_deadlines(tmp_path):
    """A stream's deadline ends its requests as a unary call's deadline ends its own: they
    were counted CANCELLED (the stream's requests have no deadline of their own), so an
    alert on DEADLINE_EXCEEDED missed streaming clients whose deadlines were too short."""
    srv = ServerProcess(counting(tmp_path / "slow"), "--metrics-port", "0")
    quick = {"input_ids": np.array([[1]]), "attention_mask": np.array([[1]])}
    ended: queue.Queue = queue.Queue()
    try:
        with tc.InferenceServerClient(srv.url) as c:
            c.start_stream(callback=lambda result, error: ended.put(error), stream_timeout=1.0)
            _running(srv, lambda: c.async_stream_infer("slow", inputs(ENDLESS)))
            for _ in range(3):  # queued behind it
                c.async_stream_infer("slow", inputs(quick))
            err = ended.get(timeout=30)
            assert err is not None and err.status() == "StatusCode.DEADLINE_EXCEEDED", err
            c.stop_stream()

        def count(code: str) -> float:
            try:
                return metric(srv, "quantgate_requests_total", model="slow", code=code)
            except AssertionError:  # no such series yet
                return 0.0

        deadline = time.monotonic() + 30
        while count("DEADLINE_EXCEEDED") < 4:  # the endless run stopped, its client gone
            assert time.monotonic() < deadline, (count("CANCELLED"), srv.log)
            time.sleep(0.1)
        assert count("CANCELLED") == 0
    finally:
        srv.terminate()


def test_a_run_whose_clients_all_gave_up_is_stopped_and_frees_the_model(tmp_path):
    """A request that would run for hours (10**10 loop steps) whose client gives up: its run
    is stopped (ONNX Runtime's terminate flag), so the next request is answered instead of
    queueing behind work nobody will read."""
    srv = ServerProcess(counting(tmp_path / "slow"))
    try:
        endless = {"input_ids": np.array([[10**10]]), "attention_mask": np.array([[1]])}
        quick = {"input_ids": np.array([[1]]), "attention_mask": np.array([[1]])}
        with tc.InferenceServerClient(srv.url) as c:
            with pytest.raises(InferenceServerException) as gone:
                c.infer("slow", inputs(endless), client_timeout=0.5)
            assert "Deadline" in str(gone.value), gone.value
            result = c.infer("slow", inputs(quick), client_timeout=60)
        assert result.as_numpy("counted").tolist() == [[1.0]]
    finally:
        assert srv.terminate() == 0, srv.log
    # stopped on purpose: not an error (the -v log says why at DEBUG)
    assert "Traceback" not in srv.log and " ERROR " not in srv.log, srv.log
    assert "stopped: its clients had all gone" in srv.log, srv.log


def test_a_health_watch_held_open_through_the_drain_is_no_request_cut_off(repo):
    """A load balancer watching health (grpc.health.v1 Watch) keeps its call open through
    the whole grace. That call holds no request: the exit is 0, not "requests cut off"."""
    srv = ServerProcess(repo / "classifier", "--shutdown-grace", "2")
    seen: queue.Queue = queue.Queue()

    def watch() -> None:
        with grpc.insecure_channel(srv.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                for status in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    seen.put(status.status)
            except grpc.RpcError as e:
                seen.put(e.code())

    threading.Thread(target=watch, daemon=True).start()
    assert seen.get(timeout=30) == health_pb2.HealthCheckResponse.SERVING
    code = srv.terminate()
    assert code == 0, srv.log
    assert "stopped: every admitted request was answered" in srv.log
    assert seen.get(timeout=30) == health_pb2.HealthCheckResponse.NOT_SERVING  # told first


def test_a_grace_that_runs_out_is_logged_and_exits_1(tmp_path):
    """A request still running when --shutdown-grace ends is cut off: the operator is told
    so, in the log and by the exit code, never by a clean 0."""
    srv = ServerProcess(counting(tmp_path / "slow"), "--shutdown-grace", "0.5")
    held: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(srv.url) as c:
        _running(
            srv,
            lambda: c.async_infer(
                "slow", inputs(ENDLESS), callback=lambda result, error: held.put((result, error))
            ),
        )
        code = srv.terminate()
        result, error = held.get(timeout=30)
    assert code == 1, srv.log
    assert result is None and error.status() == "StatusCode.UNAVAILABLE", error  # cut off
    assert (
        "the shutdown grace of 0.5 s ran out with requests still queued or running (1 admitted "
        "request(s) cut off)"
    ) in srv.log
    assert "Traceback" not in srv.log and "stopped: every admitted" not in srv.log


def test_a_client_whose_request_the_grace_cut_off_is_told_the_server_went_away(tmp_path):
    """quantgate's client met gRPC's bare 'Cancelling all calls' (UNAVAILABLE): it says the
    server went away before answering, and that the request may be sent again."""
    srv = ServerProcess(counting(tmp_path / "slow"), "--shutdown-grace", "0.5")
    command = [sys.executable, "-m", "quantgate", "infer", "slow", "--url", srv.url,
               "-i", f"input_ids=[[{10**10}]]", "--timeout", "60"]  # fmt: skip
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _running(srv, lambda: None)
        assert srv.terminate() == 1, srv.log
        _, err = client.communicate(timeout=60)
    finally:
        client.kill()
    assert client.returncode == 1, err  # not the request's fault: send it again
    assert f"the server at {srv.url} went away before answering" in err, err
    assert "send it again" in err and "Traceback" not in err, err


def test_a_cancelled_stream_cancels_the_requests_it_queued(repo):
    """20 requests wait in the queue for company (a 30 s batching delay); the client cancels
    the stream: they leave the queue counted as failed, and none of them ever runs."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    srv = ServerProcess(
        repo / "classifier", "--max-queue-delay-us", "30000000", "--metrics-port", "0"
    )
    try:

        def requests():
            yield from _raw_requests("tiny-classifier", 20, 8)
            hold.wait(10)  # keep the stream open until the client cancels it

        hold = threading.Event()
        with grpc.insecure_channel(srv.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            def stats():
                return stub.ModelStatistics(
                    service_pb2.ModelStatisticsRequest(name="tiny-classifier")
                ).model_stats[0]

            call = stub.ModelStreamInfer(requests())
            _until(lambda: queue_depth(srv) == 20, srv)
            call.cancel()
            hold.set()
            _until(lambda: stats().inference_stats.fail.count == 20, srv)
            final = stats()
        assert final.inference_stats.success.count == 0, final
        assert final.execution_count == 0, final  # no batch ran them, nor ever will
        assert queue_depth(srv) == 0
    finally:
        assert srv.terminate() == 0, srv.log


def _raw_requests(model: str, n: int, length: int):
    """``n`` requests of one row of ``length`` tokens, for a stream over raw gRPC."""
    from tritonclient.grpc import service_pb2

    ids = np.ones((1, length), np.int64)
    for i in range(n):
        r = service_pb2.ModelInferRequest(model_name=model, id=str(i))
        for name in ("input_ids", "attention_mask"):
            r.inputs.add(name=name, datatype="INT64", shape=[1, length])
            r.raw_input_contents.append(ids.tobytes())
        yield r


def _until(check, srv: ServerProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, srv.log
        time.sleep(0.02)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make certificates"
)
def test_mutual_tls_and_bearer_token(repo, tmp_path):
    d = tmp_path
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    for who in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            str(d / f"{who}.key"),
            "-out",
            str(d / f"{who}.csr"),
        )
        (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{who}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            str(d / "ext.cnf"),
            "-out",
            str(d / f"{who}.pem"),
        )
    srv = ServerProcess(
        repo / "classifier",
        "--tls-cert",
        str(d / "server.pem"),
        "--tls-key",
        str(d / "server.key"),
        "--tls-client-ca",
        str(d / "ca.pem"),
        "--auth-token",
        "s3cret",
    )
    try:
        tls = dict(
            ssl=True,
            root_certificates=str(d / "ca.pem"),
            private_key=str(d / "client.key"),
            certificate_chain=str(d / "client.pem"),
        )
        url = srv.url.replace("127.0.0.1", "localhost")
        feeds = batch(np.random.default_rng(2), 1, 6)
        with tc.InferenceServerClient(url, **tls) as c:
            with pytest.raises(InferenceServerException) as err:
                c.infer("tiny-classifier", inputs(feeds))
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
            for wrong in (
                "Bearer wrong",
                "Bearer",
                "Basic s3cret",
            ):  # "Bearer": not the scheme alone
                with pytest.raises(InferenceServerException) as err:
                    c.infer("tiny-classifier", inputs(feeds), headers={"authorization": wrong})
                assert err.value.status() == "StatusCode.UNAUTHENTICATED", (wrong, err.value)
            got = c.infer(
                "tiny-classifier", inputs(feeds), headers={"authorization": "Bearer s3cret"}
            )
            # the scheme is case-insensitive (RFC 9110), the token is not
            c.infer("tiny-classifier", inputs(feeds), headers={"authorization": "bearer s3cret"})
            with pytest.raises(InferenceServerException) as err:
                c.infer(
                    "tiny-classifier", inputs(feeds), headers={"authorization": "Bearer S3CRET"}
                )
            assert err.value.status() == "StatusCode.UNAUTHENTICATED", err.value
            np.testing.assert_allclose(
                got.as_numpy("logits"), Reference(repo / "classifier")(feeds), atol=ATOL
            )
        creds = grpc.ssl_channel_credentials(
            (d / "ca.pem").read_bytes(),
            (d / "client.key").read_bytes(),
            (d / "client.pem").read_bytes(),
        )
        with grpc.secure_channel(url, creds) as channel:  # health needs no token
            status = (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
            )
            assert status == health_pb2.HealthCheckResponse.SERVING
        with tc.InferenceServerClient(url, **tls) as c:  # nor the protocol's yes/no probes
            assert c.is_server_live() and c.is_server_ready()
            with pytest.raises(InferenceServerException) as err:  # but a model's state does
                c.is_model_ready("tiny-classifier")
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        no_cert = grpc.secure_channel(
            url, grpc.ssl_channel_credentials((d / "ca.pem").read_bytes())
        )
        with no_cert, pytest.raises(grpc.RpcError):  # mutual TLS: no client cert, no call
            health_pb2_grpc.HealthStub(no_cert).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        assert srv.terminate() == 0, srv.log


def test_overload_memory_stays_bounded(tmp_path):
    """Wave after wave of overload: refused requests leave nothing behind in the server."""
    import psutil

    srv = ServerProcess(counting(tmp_path / "slow"), "--max-queue-size", "4")
    try:
        server = psutil.Process(srv.proc.pid)
        rng = np.random.default_rng(2)
        requests = [batch(rng, 8, 64) for _ in range(30)]
        rss = []
        for _ in range(6):  # every wave overflows the queue: 26 of 30 refused
            results = _overflow(srv, requests, queued=4)
            assert sum(e is not None for _, e in results) == 26, [e for _, e in results]
            rss.append(server.memory_info().rss)
        # The first wave warms allocators and arenas; after it, 5 more waves of 30 requests
        # (130 of them refused) must not keep adding memory.
        growth = rss[-1] - rss[1]
        print("server RSS after each wave (MiB):", [round(r / 2**20, 1) for r in rss])
        assert growth < 32 * 2**20, f"server RSS grew {growth / 2**20:.1f} MiB over 4 waves: {rss}"
    finally:
        assert srv.terminate() == 0, srv.log


_FAILED_START = """
import signal, socket, sys
from pathlib import Path
from quantgate.serve.config import ServeConfig
from quantgate.serve.server import run

def on_ready(port, engine):
    ready.append(port)
    raise RuntimeError("the caller's start-up hook failed")

ready = []
try:
    run(ServeConfig(path=Path(sys.argv[1]), host="127.0.0.1", port=0, warmup=False),
        on_ready=on_ready)
except RuntimeError as e:
    print("raised:", e)
with socket.socket() as probe:
    print("listening:", probe.connect_ex(("127.0.0.1", ready[0])) == 0)
print("SIGINT handler restored:", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
print("SIGTERM handler restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""


def test_a_failed_start_stops_listening_and_gives_the_signal_handlers_back(repo):
    """run() embedded in a program: when starting fails after the port is bound (a warm-up
    out of memory, the caller's own on_ready hook), the error reaches the caller, nothing
    keeps listening, and the caller's signal handlers are back (Ctrl-C still interrupts)."""
    assert _embedded(_FAILED_START, repo / "classifier") == [
        "raised: the caller's start-up hook failed",
        "listening: False",
        "SIGINT handler restored: True",
        "SIGTERM handler restored: True",
    ]


# An embedded script's lines that set ``running`` once a batch runs (the batcher's debug line)
_RUNNING = """
running = threading.Event()
class Running(logging.Handler):
    def emit(self, record):
        if "running a batch of" in record.getMessage():
            running.set()
logging.getLogger("quantgate.serve").addHandler(Running())
logging.getLogger("quantgate.serve").setLevel(logging.DEBUG)
"""

_SECOND_SIGNAL = (
    """
import logging, os, signal, socket, sys, threading
import grpc
from pathlib import Path
import numpy as np
from quantgate.errors import DrainIncomplete
from quantgate.serve import Client
from quantgate.serve.config import ServeConfig
from quantgate.serve.server import run

"""
    + _RUNNING
    + """
def endless(port):
    with Client(f"127.0.0.1:{port}", timeout=60) as c:
        try:
            c.infer("slow", {"input_ids": np.array([[10**10]]), "attention_mask": np.array([[1]])})
        except Exception as e:
            answers.append(type(e).__name__)

def stop_once():
    running.wait(60)
    os.kill(os.getpid(), signal.SIGTERM)  # the drain waits for the endless request

# gRPC's server, whose stop at the drain's start receives the second SIGTERM while it runs
# (gRPC's Python holds its lock there): the handler used to raise into it
class Server:
    def __init__(self, server):
        self._server = server
    def __getattr__(self, name):
        return getattr(self._server, name)
    def stop(self, grace):
        if grace and not stops:
            stops.append("stop began")
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(3_000_000))  # Python work, as gRPC's stop does: handlers run in it
            stops.append("stop ran to its end")
        return self._server.stop(grace)

make_server = grpc.server
grpc.server = lambda *args, **kwargs: Server(make_server(*args, **kwargs))

def on_ready(port, engine):
    ready.append(port)
    threading.Thread(target=endless, args=(port,), daemon=True).start()
    threading.Thread(target=stop_once, daemon=True).start()

stops = []
ready, answers = [], []
try:
    run(ServeConfig(path=Path(sys.argv[1]), host="127.0.0.1", port=0, warmup=False),
        on_ready=on_ready)
    print("returned")
except DrainIncomplete as e:
    print("raised:", e)
finally:
    print("finally ran")
print(*stops, sep=", ")
with socket.socket() as probe:
    print("listening:", probe.connect_ex(("127.0.0.1", ready[0])) == 0)
print("SIGTERM handler restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""
)


def test_a_second_signal_to_an_embedded_server_raises_instead_of_exiting(tmp_path):
    """run() in a program (a notebook, a test harness): the second signal stopped the
    process then and there (os._exit), the caller's cleanup never ran. It now stops the
    server at once and raises DrainIncomplete; `quantgate serve` still exits 128 + signal.

    The second signal arrives while gRPC's stop runs, at the drain's start: its handler
    raised into gRPC's Python there, which left gRPC's state half-changed (its serving
    thread failed on a tag it no longer expected) and the stop that followed waited
    forever. The handler now only says so; the drain's own waits stop the server."""
    assert _embedded(_SECOND_SIGNAL, counting(tmp_path / "slow")) == [
        "raised: a second SIGTERM: stopped without finishing admitted requests (those whose "
        "clients still waited were cancelled)",
        "finally ran",
        "stop began, stop ran to its end",
        "listening: False",
        "SIGTERM handler restored: True",
    ]


_SIGNALS_IN_THE_WARM_UP = """
import logging, os, signal, sys, threading
from pathlib import Path
from quantgate.serve.config import ServeConfig
from quantgate.serve.server import run

warmed = []
class WarmUp(logging.Handler):
    def emit(self, record):
        message = record.getMessage()
        if message.startswith("warm-up slow version 1: batch"):
            warmed.append("warmed")
            if len(warmed) == 1:  # the first of its three runs ended
                os.kill(os.getpid(), signal.SIGTERM)
        if message.startswith("asked to stop"):  # the first signal was taken: a second
            warmed.append("asked to stop")
            os.kill(os.getpid(), signal.SIGTERM)
logging.getLogger("quantgate.serve").addHandler(WarmUp())
logging.getLogger("quantgate.serve").setLevel(logging.INFO)
try:
    run(ServeConfig(path=Path(sys.argv[1]), host="127.0.0.1", port=0),
        on_ready=lambda port, engine: print("ready"))
    print("returned")
finally:
    print("finally ran")
print(*warmed, sep=", ")
"""


def test_two_signals_during_the_warm_up_stop_it_and_return(tmp_path):
    """Asked to stop during its warm-up, a server warms no further and never says ready;
    asked twice, it stops as soon as the run under way ends, and returns: it had admitted
    no request, so none was cut off (no DrainIncomplete)."""
    bundle = counting(tmp_path / "slow", warm_up_steps=400_000)  # three runs of ~0.3 s
    returned, ran, warmed = _embedded(_SIGNALS_IN_THE_WARM_UP, bundle)
    assert (returned, ran) == ("returned", "finally ran")
    # the second run ended, the third never began
    assert warmed == "warmed, asked to stop, warmed", warmed


_SIGNALS_IN_ON_READY = (
    """
import logging, os, signal, socket, sys, threading, time, urllib.error, urllib.request
from pathlib import Path
import numpy as np
from quantgate.errors import DrainIncomplete
from quantgate.serve import Client
from quantgate.serve.config import ServeConfig
from quantgate.serve.server import run

asks = sys.argv[2] == "asks"  # on_ready waits for an endless request, or for nothing
said = []  # the server's line for the first signal, which on_ready holds up
class Said(logging.Handler):
    def emit(self, record):
        if "on_ready returns" in record.getMessage():
            said.append(record.getMessage())
logging.getLogger("quantgate.serve").addHandler(Said())
"""
    + _RUNNING
    + """
def stop_twice(readyz):
    running.wait(60)
    os.kill(os.getpid(), signal.SIGTERM)
    while True:  # handled (readiness says 503 from then on): a second, apart from it
        try:
            urllib.request.urlopen(readyz, timeout=10)
        except urllib.error.HTTPError:
            break
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

def on_ready(port, engine):  # a caller's hook that blocks, as a test harness's may
    ready.append(port)
    readyz = f"http://127.0.0.1:{engine.metrics.http_port}/readyz"
    threading.Thread(target=stop_twice, args=(readyz,), daemon=True).start()
    answered = threading.Event()
    def endless():
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            try:
                c.infer("slow", {"input_ids": np.array([[10**10]]),
                                 "attention_mask": np.array([[1]])})
            except Exception:  # cut off, as expected
                pass
            finally:
                answered.set()
    if asks:
        threading.Thread(target=endless, daemon=True).start()
    else:
        running.set()
    # Waited for in short slices: Python runs a signal's handler on the main thread between
    # its steps, and the kernel may hand the signal to another thread, which does not end a
    # wait in one piece (answered.wait(60) then heard it only after 60 s, in 3 of 6 runs)
    try:
        deadline = time.monotonic() + 60
        while not answered.wait(0.05) and time.monotonic() < deadline:
            pass
    except BaseException as e:
        print("on_ready was told:", type(e).__name__)
        raise

ready = []
try:
    run(ServeConfig(path=Path(sys.argv[1]), host="127.0.0.1", port=0, warmup=False,
                    metrics_port=0), on_ready=on_ready)
    print("returned")
except DrainIncomplete as e:
    print("raised:", e)
with socket.socket() as probe:
    print("listening:", probe.connect_ex(("127.0.0.1", ready[0])) == 0)
print(*said)
"""
)


@pytest.mark.parametrize("asks", [True, False], ids=["a-request-running", "nothing-admitted"])
def test_a_second_signal_stops_a_server_whose_on_ready_blocks(tmp_path, asks):
    """An embedding program's on_ready that blocks (waiting for its own request, or for
    anything) held the server up against every signal: the drain, which a second signal
    hurries, starts only once on_ready returns. The second signal is now raised into
    on_ready, as Ctrl-C raises into Python code; the request it waited for is cut off
    (DrainIncomplete), and where nothing was admitted the stop is a plain one."""
    lines = _embedded(_SIGNALS_IN_ON_READY, counting(tmp_path / "slow"), "asks" if asks else "")
    assert lines[0] == "on_ready was told: _SecondSignal", lines
    if asks:
        assert lines[1].startswith("raised: a second SIGTERM: stopped without finishing"), lines
    else:
        assert lines[1] == "returned", lines
    assert lines[2:] == ["listening: False", "SIGTERM: the server stops once on_ready returns"]


def test_a_second_signal_during_a_long_warm_up_exits_at_once(tmp_path):
    """`quantgate serve` exits 128 + signal on the second signal, during the warm-up too.
    The warm-up ran on the main thread, where Python runs no signal handler during a model
    run: both signals waited for the run under way (here, tens of seconds), and were then
    taken for one."""
    bundle = counting(tmp_path / "slow", warm_up_steps=50_000_000)  # each run: a long while
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantgate", "-v", "serve", str(bundle), "--port", "0",
         "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # -v: the warm-up's first run has begun
            if "warm-up slow version 1: running batch 1" in line:
                break
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)  # the first warm-up run alone would take longer
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert code == 128 + signal.SIGTERM, err
    assert "second SIGTERM: exiting now" in err
    assert "warm-up slow version 1: batch" not in err  # no run of the warm-up ended


_ALARM_IN_THE_WARM_UP = """
import logging, signal, sys, threading, time
from pathlib import Path
from quantgate.serve.config import ServeConfig
from quantgate.serve.server import run

alarms = []
def alarm(signum, frame):  # the caller's own timeout, as pytest-timeout's is, raised twice
    alarms.append(signum)
    if len(alarms) <= 2:
        raise TimeoutError(f"the caller's time ran out ({len(alarms)})")
signal.signal(signal.SIGALRM, alarm)

class WarmUp(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("warm-up slow version 1: running batch 1"):
            # during the warm-up's first run, and again 0.1 s later: into the wait for it
            signal.setitimer(signal.ITIMER_REAL, 0.2, 0.1)
logging.getLogger("quantgate.serve").addHandler(WarmUp())
logging.getLogger("quantgate.serve").setLevel(logging.DEBUG)
try:
    run(ServeConfig(path=Path(sys.argv[1]), host="127.0.0.1", port=0))
except TimeoutError as e:
    print("raised:", e)
signal.setitimer(signal.ITIMER_REAL, 0)
print("alarms:", "more than one" if len(alarms) > 1 else len(alarms))
deadline = time.monotonic() + 5  # the watches' threads end at their next look
while threading.active_count() > 1 and time.monotonic() < deadline:
    time.sleep(0.05)
print("threads:", *sorted(t.name for t in threading.enumerate()))
"""


def test_an_exception_into_the_warm_up_leaves_no_thread_running_models(tmp_path):
    """The caller's own signal handler raises while the server warms up (a harness's
    timeout), and again while run() waits for the run under way: run() raises the first,
    and the warm-up's thread has ended with its run. It ran on, model after model, after
    run() had closed them, and the process aborted at its exit."""
    bundle = counting(tmp_path / "slow", warm_up_steps=6_000_000)  # each run: seconds
    assert _embedded(_ALARM_IN_THE_WARM_UP, bundle) == [
        "raised: the caller's time ran out (1)",
        "alarms: more than one",
        "threads: MainThread",
    ]


def _embedded(script: str, bundle: Path, *args: str) -> list[str]:
    """The lines ``script`` (a program embedding run(), given the bundle and ``args``)
    prints; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(bundle), *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


_EMBEDDED = """
import gc, os, signal, socket, sys, threading, time
from pathlib import Path
import prometheus_client as prom
from quantgate.errors import ServeError
from quantgate.serve.config import ServeConfig
from quantgate.serve.server import run

cfg = ServeConfig(path=Path(sys.argv[1]), host="127.0.0.1", port=0, warmup=False)
mine = prom.Counter("caller_requests", "the embedding program's own counter")

def on_ready(port, engine):
    def ask():
        import numpy as np
        from quantgate.serve.client import Client

        with Client(f"127.0.0.1:{port}") as client:
            for _ in range(5):
                ids = np.ones((4, 16), np.int64)
                client.infer("tiny-classifier", {"input_ids": ids, "attention_mask": ids})
    askers = [threading.Thread(target=ask) for _ in range(12)]
    for t in askers:
        t.start()
    for t in askers:
        t.join()
    os.kill(os.getpid(), signal.SIGTERM)

gc.disable()  # idle pools are ended by run(), not by the collector finding them
POOLS = ("grpc_", "grpc-open_", "refusal_", "stream_")

def pool_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith(POOLS)]

left = []
for _ in range(3):
    run(cfg, on_ready=on_ready)
    deadline = time.monotonic() + 5  # ended, not joined: each takes a moment to exit
    while pool_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    left.append(len(pool_threads()))
gc.enable()
print("pool threads left after each run:", left)
print("created series kept:", b"caller_requests_created" in prom.generate_latest())

port = socket.socket()
port.bind(("127.0.0.1", 0))
free = port.getsockname()[1]
port.close()
errors = []
def from_a_thread():
    try:
        run(ServeConfig(path=Path(sys.argv[1]), host="127.0.0.1", port=free, warmup=False))
    except ServeError as e:
        errors.append(str(e))
t = threading.Thread(target=from_a_thread)
t.start()
t.join()
print("from a thread:", "ServeError, main thread named" if errors and "main thread" in errors[0] else errors)
with socket.socket() as probe:
    print("port bound:", probe.connect_ex(("127.0.0.1", free)) == 0)
"""


def test_run_embedded_leaves_no_threads_and_no_switched_metrics_behind(repo):
    """run() called again and again in one program (a test suite's, a notebook's): the
    server's thread pools end with each run (they were kept until the collector found them:
    13 more threads a run with it off, 50 threads after 7 runs with it on), the
    caller's own prometheus counters keep their _created series, and a call from another
    thread than the main one is a ServeError before any port is bound."""
    assert _embedded(_EMBEDDED, repo / "classifier") == [
        "pool threads left after each run: [0, 0, 0]",
        "created series kept: True",
        "from a thread: ServeError, main thread named",
        "port bound: False",
    ]


_STOP_EVENT = """
import logging, os, signal, sys, threading
from pathlib import Path
from quantgate.serve.config import ServeConfig
from quantgate.serve.server import run

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
cfg = ServeConfig(path=Path(sys.argv[1]), host="127.0.0.1", port=0, warmup=False)

stop = threading.Event()  # set by another thread: the server stops as on SIGTERM
run(cfg, stop=stop, on_ready=lambda port, engine: threading.Timer(0.5, stop.set).start())
print("returned after the caller's stop")

told = threading.Event()  # set by the server at SIGTERM: on_ready's own loop learns of it
def on_ready(port, engine):
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    while not told.wait(0.1):
        pass
    print("on_ready told of the signal:", told.is_set())
run(cfg, on_ready=on_ready, stop=told)
print("returned after SIGTERM")
"""


def test_an_embedded_run_stops_on_the_callers_event_and_sets_it_on_a_signal(repo):
    """A program could stop an embedded run() only by signalling its own process, and an
    on_ready that waits in a loop of its own never learned of the first SIGTERM (it held
    the drain until a second signal was raised into it)."""
    lines = _embedded(_STOP_EVENT, repo / "classifier")
    said = [line for line in lines if line.startswith(("stop", "SIGTERM", "on_ready", "returned"))]
    assert said == [
        "stop set by run()'s caller: shutting down: no new requests; finishing admitted ones "
        "(grace 25 s)",
        "stopped: every admitted request was answered",
        "returned after the caller's stop",
        "SIGTERM: the server stops once on_ready returns",
        "on_ready told of the signal: True",
        "SIGTERM: shutting down: no new requests; finishing admitted ones (grace 25 s)",
        "stopped: every admitted request was answered",
        "returned after SIGTERM",
    ], lines


_WATCHES = """
import os, signal, sys, threading, time
from pathlib import Path
from quantgate.serve.config import ServeConfig, TLSConfig
from quantgate.serve.engine import Engine
from quantgate.serve.repository import load_repository
from quantgate.serve.server import create_server, run

d = Path(sys.argv[2])
cfg = ServeConfig(
    path=Path(sys.argv[1]), host="127.0.0.1", port=0, warmup=False,
    tls=TLSConfig(cert=d / "server.pem", key=d / "server.key"), auth_token_file=d / "tokens",
)

def watches():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("watch "))

def gone():
    deadline = time.monotonic() + 5  # stopped, not joined: each ends within its second
    while watches() and time.monotonic() < deadline:
        time.sleep(0.05)
    return watches()

def started(port, engine):
    print("while serving:", watches())
    os.kill(os.getpid(), signal.SIGTERM)

for _ in range(2):
    run(cfg, on_ready=started)
    print("after the run:", gone())
engine = Engine(load_repository(cfg), cfg)
built = create_server(cfg, engine)
print("create_server:", watches())
built.close_threads()
print("after close_threads:", gone())
(d / "tokens").write_text("# no token")
try:
    create_server(cfg, engine)
except Exception as e:  # the token file is read after the TLS files: their watch ends
    print("failed:", type(e).__name__, gone())
"""


def test_the_watches_of_tls_and_token_files_end_with_each_run(repo, tmp_path):
    """run() embedded and called again: the threads watching the TLS files and the token
    file ended with each run (they were kept for good, one more of each a run), and so do
    those create_server starts when it reads the files itself."""
    pki.server_files(tmp_path, pki.authority())
    (tmp_path / "tokens").write_text("s3cret\n")
    watching = "['watch --auth-token-file {}', 'watch the TLS files']".format(tmp_path / "tokens")
    done = subprocess.run(
        [sys.executable, "-c", _WATCHES, str(repo / "classifier"), str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    serving = watching.replace("', 'watch the", "', 'watch bundles', 'watch the")
    assert done.stdout.splitlines() == [
        f"while serving: {serving}",
        "after the run: []",
        f"while serving: {serving}",
        "after the run: []",
        f"create_server: {watching}",
        "after close_threads: []",
        "failed: ConfigError []",
    ]


def test_a_stream_that_never_reads_its_answers_stops_being_read(repo):
    """A client that sends and never reads: once a window of answers waits unsent, the
    server reads no more of its requests (before, it computed them all and held every
    answer: gigabytes). Others are served meanwhile, and the stream ends with the call."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    srv = ServerProcess(repo / "encoder" / "1")

    def inferred(stub) -> int:
        stats = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name="tiny-encoder"))
        return stats.model_stats[0].inference_count

    try:
        with grpc.insecure_channel(srv.url) as reader, grpc.insecure_channel(srv.url) as other:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(reader)
            # 16 KB of hidden states per answer, never read
            call = stub.ModelStreamInfer(_raw_requests("tiny-encoder", 3000, 128))
            watcher = service_pb2_grpc.GRPCInferenceServiceStub(other)
            counts = [inferred(watcher)]
            while len(counts) < 4 or counts[-1] != counts[-4]:  # until it stops growing
                time.sleep(0.5)
                counts.append(inferred(watcher))
                assert len(counts) < 120, counts
            # the window's 64 answers and what the sockets and HTTP/2 hold (318 in all here,
            # about 5 MB of 16 KB answers), far from all 3000
            assert 0 < counts[-1] < 1000, counts
            time.sleep(2)  # stopped, not stalled: a loaded machine may pause for a second
            assert inferred(watcher) == counts[-1], counts
            with tc.InferenceServerClient(srv.url) as c:  # the model serves others
                c.infer("tiny-encoder", inputs(batch(np.random.default_rng(6), 1, 9)))
            call.cancel()
    finally:
        assert srv.terminate() == 0, srv.log


def test_open_streams_are_capped_so_calls_and_probes_keep_their_threads(repo):
    """Idle health Watch streams, which need no token, once took every request thread.
    Inference streams may hold half the request threads, health and reflection streams a
    quarter of their own; beyond, RESOURCE_EXHAUSTED, and the rest of the server answers:
    unary calls, probes, and the other kind of stream."""
    from tritonclient.grpc import service_pb2_grpc

    # --max-queue-size 8: a pool of 8 + 16 threads: 12 inference streams, 6 health ones
    srv = ServerProcess(repo / "classifier", "--max-queue-size", "8", "--metrics-port", "0")
    try:
        with grpc.insecure_channel(srv.url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(6)]
            for w in watches:  # each open, and answered
                assert next(w).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as refused:
                next(health.Watch(health_pb2.HealthCheckRequest(), timeout=10))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "6 streams of this kind are open" in refused.value.details()

            infer = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            idle = threading.Event()

            def nothing():  # an inference stream that sends nothing, until released
                idle.wait(30)
                yield from ()

            streams = [infer.ModelStreamInfer(nothing()) for _ in range(12)]
            with pytest.raises(grpc.RpcError) as full:
                next(infer.ModelStreamInfer(nothing(), timeout=10))
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with tc.InferenceServerClient(srv.url) as c:  # unary calls keep their threads
                assert c.is_server_live()
                c.infer("tiny-classifier", inputs(batch(np.random.default_rng(7), 1, 9)))
            assert health.Check(health_pb2.HealthCheckRequest()).status == 1  # SERVING
            # each kind's places in the metrics: a full cap was seen in none of them (the
            # calls in flight, 18 of 48, said a quarter full)
            for kind, places in (("open", 6), ("infer", 12)):
                assert metric(srv, "quantgate_streams_open", kind=kind) == places
                assert metric(srv, "quantgate_streams_open_limit", kind=kind) == places
                assert metric(srv, "quantgate_refused_streams_total", kind=kind) == 1
            assert metric(srv, "quantgate_ready") == 1  # as /readyz says
            assert metric(srv, "quantgate_queue_size_limit", model="tiny-classifier") == 8

            watches[0].cancel()  # a closed stream frees its place
            deadline = time.monotonic() + 10
            while True:
                try:
                    again = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
                    assert next(again).status == health_pb2.HealthCheckResponse.SERVING
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            idle.set()
            for call in (*watches, again, *streams):
                call.cancel()
    finally:
        assert srv.terminate() == 0, srv.log


def test_an_idle_server_with_a_health_watch_open_stops_without_waiting_out_its_grace(repo):
    """gRPC's client-side health checking keeps a Watch open on every server it balances
    over. With every admitted request answered, the drain cuts such a call (and a connection
    kept after the GOAWAY) a moment later: it held the exit to the end of the grace, 25 s for
    an idle server by default. The Watch is told SERVING, then NOT_SERVING, then UNAVAILABLE:
    its client moves on."""
    srv = ServerProcess(repo / "classifier", "--shutdown-grace", "600")
    channel = grpc.insecure_channel(srv.url)
    statuses = queue.Queue()

    def watch() -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for answer in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                statuses.put(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
        except grpc.RpcError as e:
            statuses.put(e.code().name)

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert statuses.get(timeout=30) == "SERVING"
        assert srv.terminate(timeout=120) == 0, srv.log  # its grace: 600 s
        assert "stopped: every admitted request was answered" in srv.log
        assert [statuses.get(timeout=30) for _ in range(2)] == ["NOT_SERVING", "UNAVAILABLE"]
    finally:
        channel.close()
