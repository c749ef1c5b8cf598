"""The leader/follower batcher under fire: many request threads, cancels, deadlines.

Randomised but seeded (the plan of every request is drawn up front; only the thread
interleaving varies from run to run), plus the interleavings the random runs rarely hit,
forced one by one.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import wait

import numpy as np
import pytest
from helpers import Reference, batch, batcher, hold_first_run, spawn, until

from quantgate.errors import BadRequest, Cancelled, DeadlineExceeded, InferenceFailed, Unavailable
from quantgate.serve.batcher import Caller

HANG_S = 30.0  # no call may take this long: longer means a stranded thread


# -- the random runs ------------------------------------------------------------------


THREADS, PER_THREAD = 40, 8
LENGTHS = range(1, 41)  # buckets 16, 32 and 64
KINDS, WEIGHTS = ("plain", "timeout", "cancel", "stream", "poison"), (55, 15, 15, 10, 5)
STREAMS = 3  # callers shared by several threads' requests, as a stream's are


def _plan(rng: random.Random) -> list[dict]:
    """One thread's requests: shape, and how each may end early."""
    requests = []
    for _ in range(PER_THREAD):
        (kind,) = rng.choices(KINDS, WEIGHTS)
        requests.append(
            {
                "kind": kind,
                "rows": rng.randint(1, 3),
                "length": rng.choice(LENGTHS),
                "seed": rng.randrange(2**32),
                "timeout": rng.uniform(0.0, 0.02) if kind == "timeout" else None,
                "cancel_after": rng.uniform(0.0, 0.02) if kind == "cancel" else None,
                "stream": rng.randrange(STREAMS) if kind == "stream" else None,
                "pause": rng.uniform(0.0, 0.002) if rng.random() < 0.3 else 0.0,
            }
        )
    return requests


def _feeds(request: dict) -> dict[str, np.ndarray]:
    feeds = batch(np.random.default_rng(request["seed"]), request["rows"], request["length"])
    if request["kind"] == "poison":
        feeds["input_ids"][0, 0] = 0  # batch() draws ids from 1; the wrapped run refuses 0
    return feeds


@pytest.mark.parametrize("instances", [1, 2, 3])
@pytest.mark.parametrize("delay_us", [0, 2000])
def test_many_threads_cancels_and_deadlines(repo, classifier, instances, delay_us):
    _hammer(repo, classifier, instances, delay_us, seed=1000 * instances + delay_us)


@pytest.mark.parametrize("instances", [1, 3])
def test_closing_under_fire_drains_what_was_admitted(repo, classifier, instances):
    _hammer(repo, classifier, instances, 2000, seed=7 + instances, close_after=0.03)


def _hammer(repo, classifier, instances, delay_us, *, seed, close_after=None):
    """THREADS threads of PER_THREAD requests each; every call must end, and end right.
    ``close_after`` seconds: close the batcher while they run."""
    rng = random.Random(seed)
    queue_size = rng.choice([16, 64])  # 16 < 40 threads: some are refused, queue full
    lock = threading.Lock()
    running, peak = [0], [0]
    executed: list = []
    run = classifier.run
    rng_run = random.Random(seed + 1)

    def counted_run(feeds, outputs=(), options=None):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            if (feeds["input_ids"][:, 0] == 0).any():
                raise BadRequest("poisoned request")
            if rng_run.random() < 0.2:
                time.sleep(0.001)  # a longer batch: more overlap for the slot count to catch
            return run(feeds, outputs, options)
        finally:
            with lock:
                running[0] -= 1

    classifier.run = counted_run
    b = batcher(
        classifier,
        max_batch_size=8,
        max_queue_delay_us=delay_us,
        max_queue_size=queue_size,
        instances=instances,
    )
    execute = b._execute
    batch_rows: list[int] = []

    def recorded_execute(group):
        with lock:
            executed.extend(group)
            batch_rows.append(sum(p.rows for p in group))
        execute(group)

    b._execute = recorded_execute

    plans = [_plan(rng) for _ in range(THREADS)]
    streams = [Caller() for _ in range(STREAMS)]
    stream_cancel_at = [rng.uniform(0.005, 0.2) for _ in range(STREAMS)]
    timers: list[threading.Timer] = []
    start = threading.Barrier(THREADS + 1)

    def client(plan: list[dict]) -> list[tuple]:
        start.wait()
        outcomes = []
        for request in plan:
            feeds = _feeds(request)
            caller = None
            if request["kind"] == "cancel":
                caller = Caller()
                timer = threading.Timer(request["cancel_after"], caller.cancel)
                with lock:
                    timers.append(timer)
                timer.start()
            elif request["kind"] == "stream":
                caller = streams[request["stream"]]
            t0 = time.monotonic()
            try:
                outputs, _ = b.infer(
                    feeds, request["rows"], timeout=request["timeout"], caller=caller
                )
                outcome = outputs["logits"]
            except Exception as e:  # noqa: BLE001 - judged below
                outcome = e
            outcomes.append((request, feeds, caller, outcome, time.monotonic() - t0))
            time.sleep(request["pause"])
        return outcomes

    futures = [spawn(client, plan) for plan in plans]
    start.wait()
    for caller, at in zip(streams, stream_cancel_at, strict=True):
        timer = threading.Timer(at, caller.cancel)
        with lock:
            timers.append(timer)
        timer.start()
    if close_after is not None:
        time.sleep(close_after)
        assert b.close(timeout=HANG_S), f"depth {b.depth}, slots taken {b._running}"
        assert b.depth == 0 and b._running == 0
    _, stuck = wait(futures, timeout=HANG_S)
    assert not stuck, (
        f"{len(stuck)} of {THREADS} threads still waiting after {HANG_S} s "
        f"(depth {b.depth}, slots taken {b._running}, seed {seed})"
    )
    for timer in timers:
        timer.join(5)

    reference = Reference(repo / "classifier")
    ended: dict[str, int] = {}
    for future in futures:
        for request, feeds, caller, outcome, seconds in future.result():
            kind = request["kind"]
            name = type(outcome).__name__ if isinstance(outcome, Exception) else "ok"
            ended[f"{kind}:{name}"] = ended.get(f"{kind}:{name}", 0) + 1
            where = f"seed {seed}, {kind} request {request}: {outcome!r}"
            assert seconds < HANG_S, where
            if isinstance(outcome, Unavailable):
                closed = close_after is not None and "shutting down" in str(outcome)
                assert closed or "queue full" in str(outcome), where
            elif isinstance(outcome, Cancelled):
                assert caller is not None and caller.gone, where
            elif isinstance(outcome, DeadlineExceeded):
                assert request["timeout"] is not None, where
            elif isinstance(outcome, InferenceFailed):
                raise AssertionError(where)
            elif isinstance(outcome, BadRequest):
                assert kind == "poison", where
            elif isinstance(outcome, Exception):
                raise AssertionError(where)
            else:
                assert kind != "poison", where
                assert outcome.shape == (request["rows"], 5), where
                np.testing.assert_allclose(outcome, reference(feeds), atol=1e-4, err_msg=where)

    assert peak[0] <= instances, f"{peak[0]} batches ran at once with {instances} slots"
    # every request has 1 to 3 rows: none is larger than a batch, so no batch exceeds 8
    assert max(batch_rows, default=0) <= 8, f"a batch of {max(batch_rows)} rows (max 8)"
    assert len(executed) == len({id(p) for p in executed}), "a request ran twice"
    assert close_after is not None or ended.get("plain:ok", 0) > 0, ended
    assert b.close(timeout=10), f"depth {b.depth}, slots taken {b._running}"
    assert b.depth == 0 and b._running == 0
    with pytest.raises(Unavailable, match="shutting down"):
        b.infer(batch(np.random.default_rng(0), 1, 4), 1)


# -- the interleavings, one at a time --------------------------------------------------


class _CancelledWhileQueueing(Caller):
    """gRPC's callback thread wins the race: the call ends right after the batcher starts
    watching the caller, before the request is queued."""

    def _watch(self, key, hook) -> bool:
        watching = super()._watch(key, hook)
        canceller = threading.Thread(target=self.cancel)
        canceller.start()
        canceller.join()
        return watching


def test_a_caller_gone_before_its_request_is_queued_takes_no_slot(classifier):
    """The request must not be queued once answered: its own runner would hand the slot
    to it, and its thread back to itself, forever."""
    b = batcher(classifier)
    rng = np.random.default_rng(10)
    gone = spawn(b.infer, batch(rng, 1, 4), 1, caller=_CancelledWhileQueueing())
    with pytest.raises(Cancelled):
        gone.result(10)
    assert b.depth == 0 and b._running == 0
    assert b.infer(batch(rng, 1, 4), 1)[0]["logits"].shape == (1, 5)
    assert b.close(timeout=5)


def test_a_caller_gone_before_its_request_is_queued_behind_a_batch_strands_nobody(classifier):
    """Queued behind a running batch and answered already, the request would be handed the
    slot when the batch ends; its thread has left, so the slot would never come back."""
    b = batcher(classifier)
    rng = np.random.default_rng(11)
    started, release = hold_first_run(classifier)
    busy = spawn(b.infer, batch(rng, 1, 4), 1)
    assert started.wait(10)
    with pytest.raises(Cancelled):
        b.infer(batch(rng, 1, 4), 1, caller=_CancelledWhileQueueing())
    release.set()
    assert busy.result(10)[0]["logits"].shape == (1, 5)
    after = spawn(b.infer, batch(rng, 1, 4), 1)
    assert after.result(10)[0]["logits"].shape == (1, 5)
    assert b.close(timeout=5) and b.depth == 0 and b._running == 0


def test_a_bug_when_a_failed_batch_is_rerun_alone_answers_every_request(classifier):
    """The batch fails (ORT rejects it), each request is rerun alone, and that hits a bug:
    every request is answered INTERNAL and the slot is passed on."""
    b = batcher(classifier, on_batch=lambda rows, timing: 1 / 0)
    rng = np.random.default_rng(12)
    run = classifier.run

    def batches_fail(feeds, outputs=(), options=None):
        if feeds["input_ids"].shape[0] > 1:
            raise BadRequest("the batch was rejected")
        return run(feeds, outputs, options)

    classifier.run = batches_fail
    started, release = hold_first_run(classifier)
    first = spawn(b.infer, batch(rng, 1, 4), 1)
    assert started.wait(10)
    rest = [spawn(b.infer, batch(rng, 1, 4), 1) for _ in range(2)]
    until(lambda: b.depth == 2)
    release.set()
    for future in [first, *rest]:
        with pytest.raises(InferenceFailed, match="ZeroDivisionError"):
            future.result(10)
    assert b.close(timeout=5) and b._running == 0


def test_a_failed_batch_is_not_rerun_for_a_client_that_went_away(classifier):
    """A poisoned request fails its batch; while the batch runs, another client goes. The
    rerun one by one answers the poisoned one and the one still waiting, and spends no run
    on the client that left (its Cancelled stands)."""
    b = batcher(classifier)
    rng = np.random.default_rng(16)
    run, ran = classifier.run, []
    in_batch, leave = threading.Event(), threading.Event()

    def recorded(feeds, outputs=(), options=None):
        ran.append(feeds["input_ids"].shape[0])
        if feeds["input_ids"].shape[0] == 3:  # the batch of three: hold it while one leaves
            in_batch.set()
            leave.wait(10)
        if (feeds["input_ids"][:, 0] == 0).any():
            raise BadRequest("poisoned request")
        return run(feeds, outputs, options)

    classifier.run = recorded
    started, release = hold_first_run(classifier)
    first = spawn(b.infer, batch(rng, 1, 4), 1)
    assert started.wait(10)
    poisoned = batch(rng, 1, 4)
    poisoned["input_ids"][0, 0] = 0
    caller = Caller()
    bad = spawn(b.infer, poisoned, 1)
    until(lambda: b.depth == 1)
    gone = spawn(b.infer, batch(rng, 1, 4), 1, caller=caller)
    until(lambda: b.depth == 2)
    stays = spawn(b.infer, batch(rng, 1, 4), 1)
    until(lambda: b.depth == 3)
    release.set()
    assert in_batch.wait(10)
    caller.cancel()
    with pytest.raises(Cancelled):
        gone.result(10)
    leave.set()
    with pytest.raises(BadRequest, match="poisoned"):
        bad.result(10)
    assert stays.result(10)[0]["logits"].shape == (1, 5)
    assert first.result(10)[0]["logits"].shape == (1, 5)
    assert ran == [1, 3, 1, 1]  # first; the batch; then the poisoned and the staying, alone
    assert b.close(timeout=5) and b._running == 0


def test_a_request_larger_than_the_batch_size_runs_alone(repo, classifier):
    """Queued with requests of its bucket behind a running batch, a request of 3 rows
    (batches of 2) runs in a batch of its own; the two after it share one."""
    rows: list[int] = []
    b = batcher(classifier, max_batch_size=2, on_batch=lambda n, timing: rows.append(n))
    rng = np.random.default_rng(13)
    started, release = hold_first_run(classifier)
    busy = spawn(b.infer, batch(rng, 1, 4), 1)
    assert started.wait(10)
    big_feeds, small_feeds = batch(rng, 3, 4), [batch(rng, 1, 4) for _ in range(2)]
    big = spawn(b.infer, big_feeds, 3)
    until(lambda: b.depth == 1)
    small = [spawn(b.infer, f, 1) for f in small_feeds]
    until(lambda: b.depth == 3)
    release.set()
    reference = Reference(repo / "classifier")
    for future, feeds in zip([big, *small], [big_feeds, *small_feeds], strict=True):
        np.testing.assert_allclose(future.result(10)[0]["logits"], reference(feeds), atol=1e-4)
    assert busy.result(10)[0]["logits"].shape == (1, 5)
    assert rows == [1, 3, 2], rows  # the held one; the big one alone; the two small ones
    assert b.close(timeout=5)


def test_no_batch_holds_more_rows_than_the_max_batch_size(classifier):
    """Ten requests of one bucket queue behind a running batch: batches of 8, then 2."""
    rows: list[int] = []
    b = batcher(classifier, max_batch_size=8, on_batch=lambda n, timing: rows.append(n))
    rng = np.random.default_rng(17)
    started, release = hold_first_run(classifier)
    busy = spawn(b.infer, batch(rng, 1, 4), 1)
    assert started.wait(10)
    queued = [spawn(b.infer, batch(rng, 1, 4), 1) for _ in range(10)]
    until(lambda: b.depth == 10)
    release.set()
    for future in [busy, *queued]:
        assert future.result(10)[0]["logits"].shape == (1, 5)
    assert rows == [1, 8, 2], rows
    assert b.close(timeout=5)


def test_requests_whose_deadline_passed_hold_no_place_in_a_full_queue(classifier):
    """The queue is full of requests whose deadline has passed, and whose threads have not
    woken yet to drop them (a loaded machine; here each waits until let go): a new request
    takes their place, and they are answered DeadlineExceeded."""
    b = batcher(classifier, max_queue_size=2)
    rng = np.random.default_rng(18)
    started, release = hold_first_run(classifier)
    busy = spawn(b.infer, batch(rng, 1, 4), 1)
    assert started.wait(10)  # the only slot is taken: what comes next queues
    wait, let_go = b._wait, threading.Event()

    def asleep(me):
        let_go.wait(10)
        wait(me)

    b._wait = asleep
    expired = [spawn(b.infer, batch(rng, 1, 4), 1, timeout=0.01) for _ in range(2)]
    until(lambda: b.depth == 2)
    until(lambda: all(time.monotonic() >= p.deadline for p in list(b._queue)))
    b._wait = wait
    fresh = spawn(b.infer, batch(rng, 1, 4), 1)  # admitted, not refused "queue full"
    until(lambda: b.depth == 1 or fresh.done())
    let_go.set()
    for future in expired:  # which deadline, and what to do: not read as the server's fault
        with pytest.raises(DeadlineExceeded, match=r"deadline passed while queued \(10 ms from "
                           r"its arrival\): give the call a longer deadline"):  # fmt: skip
            future.result(10)
    release.set()
    assert busy.result(10)[0]["logits"].shape == (1, 5)
    assert fresh.result(10)[0]["logits"].shape == (1, 5)
    assert b.close(timeout=5) and b.depth == 0 and b._running == 0


def test_a_runner_whose_request_is_cancelled_while_it_gathers_passes_the_slot_on(classifier):
    """The runner waits for company (long delay); its client goes; the slot passes to the
    next queued request's thread, which gathers on and runs it."""
    b = batcher(classifier, max_queue_delay_us=300_000)
    rng = np.random.default_rng(14)
    caller = Caller()
    leader = spawn(b.infer, batch(rng, 1, 4), 1, caller=caller)
    until(lambda: b.depth == 1)
    follower = spawn(b.infer, batch(rng, 1, 40), 1)  # another bucket: not gathered
    until(lambda: b.depth == 2)
    caller.cancel()
    with pytest.raises(Cancelled):
        leader.result(10)
    assert follower.result(10)[0]["logits"].shape == (1, 5)
    assert b.close(timeout=5) and b._running == 0


def test_a_request_cancelled_as_it_is_handed_the_slot_returns(classifier):
    """A finishing runner hands the slot to the queued request, whose client goes before
    its thread wakes: one wake-up says both; the thread passes the slot on and returns."""
    b = batcher(classifier)
    rng = np.random.default_rng(15)
    started, release = hold_first_run(classifier)
    caller = Caller()
    hand_over = b._hand_over

    def hand_over_then_cancel() -> None:  # under the batcher's lock: the heir cannot wake
        hand_over()
        caller.cancel()

    busy = spawn(b.infer, batch(rng, 1, 4), 1)
    assert started.wait(10)
    heir = spawn(b.infer, batch(rng, 1, 4), 1, caller=caller)
    until(lambda: b.depth == 1)
    b._hand_over = hand_over_then_cancel
    release.set()
    assert busy.result(10)[0]["logits"].shape == (1, 5)
    with pytest.raises(Cancelled):
        heir.result(10)
    b._hand_over = hand_over
    assert b.close(timeout=5) and b._running == 0


def test_a_slot_is_not_handed_to_a_runner_that_already_holds_one(classifier):
    """Two slots. One runner gathers company for its own request while another batch
    ends: the freed slot goes to the request queued behind it, not to the runner, which
    would sit on both while it runs its batch; so the queued batch runs meanwhile."""
    b = batcher(classifier, instances=2, max_batch_size=2, max_queue_delay_us=10_000_000)
    rng = np.random.default_rng(16)
    gates = {4: threading.Event(), 5: threading.Event()}  # by padded length
    other_ran = threading.Event()
    run = classifier.run

    def gated(feeds, outputs=(), options=None):
        length = feeds["input_ids"].shape[1]
        if length in gates:
            gates[length].wait(10)
        elif length == 40:
            other_ran.set()
        return run(feeds, outputs, options)

    classifier.run = gated
    try:
        first = spawn(b.infer, batch(rng, 2, 4), 2)  # a full batch: runs, held at its gate
        until(lambda: b.depth == 0 and b._running == 1)
        gathering = spawn(b.infer, batch(rng, 1, 5), 1)  # the second slot: gathers
        until(lambda: b.depth == 1 and b._running == 2)
        other = spawn(b.infer, batch(rng, 2, 40), 2)  # another bucket, full: queued
        until(lambda: b.depth == 2)
        gates[4].set()
        assert first.result(10)[0]["logits"].shape == (2, 5)
        company = spawn(b.infer, batch(rng, 1, 5), 1)  # fills the gathered batch: it runs
        # ... held at its gate, on one slot; the other batch runs on the other
        assert other_ran.wait(5)
        assert not gathering.done() and not company.done()
    finally:
        gates[5].set()
    assert other.result(10)[0]["logits"].shape == (2, 5)
    assert gathering.result(10)[0]["logits"].shape == (1, 5)
    assert company.result(10)[0]["logits"].shape == (1, 5)
    assert b.close(timeout=5) and b._running == 0


def test_a_request_whose_thread_fails_while_queued_strands_no_slot(classifier):
    """The thread of a queued request fails while it waits (a bug; an OverflowError was one:
    a timeout beyond what the platform can time). Left queued, the request was handed the
    runner slot when the batch ahead of it ended, by a thread that was gone: the model ran
    nothing again. It is withdrawn instead, and the model serves on."""
    b = batcher(classifier)
    started, release = hold_first_run(classifier)
    rng = np.random.default_rng(40)
    first = spawn(b.infer, batch(rng, 1, 9), 1)
    until(started.is_set)  # first runs, holding the only slot
    wait = b._wait

    def failing(me):
        raise RuntimeError("the waiting thread failed")

    b._wait = failing
    with pytest.raises(RuntimeError, match="the waiting thread failed"):
        b.infer(batch(rng, 1, 9), 1)
    b._wait = wait
    release.set()
    first.result(10)
    after = spawn(b.infer, batch(rng, 1, 9), 1)
    outputs, _ = after.result(10)  # not stranded behind the failed one
    assert outputs["logits"].shape[0] == 1 and not b._queue
    assert b.drained(5)


def test_a_timeout_beyond_what_the_platform_can_time_waits_without_end(classifier):
    """threading.Event.wait(4.6e12) raises OverflowError: such a timeout is no timeout."""
    b = batcher(classifier)
    started, release = hold_first_run(classifier)
    rng = np.random.default_rng(41)
    first = spawn(b.infer, batch(rng, 1, 9), 1)
    until(started.is_set)
    queued = spawn(b.infer, batch(rng, 1, 9), 1, timeout=2.0**62 / 1e6)
    until(lambda: len(b._queue) == 1)
    release.set()
    first.result(10)
    assert queued.result(10)[0]["logits"].shape[0] == 1


def test_batched_requests_are_padded_with_each_inputs_recorded_pad_value(tmp_path):
    """A model may read its padding (a GPT-2 classifier finds each row's last token by its
    pad id): a short request batched with a long one is padded with the pad value the export
    recorded (7 here), not 0. The graph counts the 7s in each row."""
    from bundles import hand_built
    from onnx import TensorProto, helper

    from quantgate.bundle import CPU
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.runtime import open_model

    nodes = [
        helper.make_node("Equal", ["input_ids", "seven"], ["is7"]),
        helper.make_node("Cast", ["is7"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["f", "axis"], ["sevens"], keepdims=0),
    ]
    consts = (
        helper.make_tensor("seven", TensorProto.INT64, [], [7]),
        helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
    )
    path = hand_built(
        tmp_path / "sevens", nodes, "sevens", inputs=("input_ids", "attention_mask"),
        output=("sevens", ("batch",)), initializers=consts, pad_values={"input_ids": 7},
    )  # fmt: skip
    model = open_model(path, ServeConfig(path=path), CPU)
    b = batcher(model, max_batch_size=4)

    def request(length: int) -> dict[str, np.ndarray]:
        ids = np.ones((1, length), np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    assert b.infer(request(3), 1)[0]["sevens"].tolist() == [0]  # alone: no padding
    started, release = hold_first_run(model)
    busy = spawn(b.infer, request(2), 1)
    assert started.wait(10)
    short, long = spawn(b.infer, request(3), 1), spawn(b.infer, request(10), 1)
    until(lambda: b.depth == 2)
    release.set()
    assert busy.result(10)[0]["sevens"].tolist() == [0]
    assert short.result(10)[0]["sevens"].tolist() == [7]  # 7 positions of padding, with 7
    assert long.result(10)[0]["sevens"].tolist() == [0]
    assert b.close(timeout=5)
