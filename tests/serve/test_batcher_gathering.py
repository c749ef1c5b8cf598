"""A runner gathering company for a batch, while its own request is answered elsewhere.

With two slots, the thread of a request can hold one slot and wait for company for the
queue's head while another runner takes its own request into a batch and answers it (or
its client goes). That thread must return at once, not when the head's queue delay ends.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import Reference, batch, batcher, spawn, until

from quantgate.errors import Cancelled
from quantgate.serve.batcher import Caller

DELAY_US = 600_000_000  # the head waits this long for company: far beyond any result(10)


@pytest.mark.parametrize("how", ["answered", "cancelled"])
def test_a_runner_gathering_returns_once_another_runner_ends_its_request(repo, classifier, how):
    """Two slots, batches of 2. r's thread (slot 1) gathers for r; w's thread (slot 2)
    gathers for r too. z completes r's batch; w's thread takes it (the order in which the
    OS wakes the two is forced: r's thread is slow). r's thread then gathers for w, the new
    head. When w's thread answers r (or r's client goes), r's thread must return."""
    b = batcher(classifier, instances=2, max_batch_size=2, max_queue_delay_us=DELAY_US)
    rng = np.random.default_rng(30)
    r_feeds, w_feeds, z_feeds = batch(rng, 1, 100), batch(rng, 1, 40), batch(rng, 1, 101)
    slow, taken, regathering, gate = (threading.Event() for _ in range(4))

    run = classifier.run

    def gated(feeds, outputs=(), options=None):
        if feeds["input_ids"].shape[1] == 101:  # r and z, padded to z's length
            taken.set()
            gate.wait(10)
        return run(feeds, outputs, options)

    classifier.run = gated
    drop_expired = b._drop_expired

    def r_is_slow() -> None:  # at the top of every round of gathering, lock held
        if threading.current_thread().name == "r" and slow.is_set() and not taken.is_set():
            b._cv.release()  # the OS runs w's thread first
            try:
                taken.wait(10)
            finally:
                b._cv.acquire()
        drop_expired()

    b._drop_expired = r_is_slow
    wait = b._cv.wait

    def noted_wait(timeout=None):
        if threading.current_thread().name == "r" and taken.is_set():
            regathering.set()  # lock held until the wait below releases it
        return wait(timeout)

    b._cv.wait = noted_wait

    caller = Caller()
    try:
        r = spawn(b.infer, r_feeds, 1, caller=caller, thread_name="r")
        until(lambda: b.depth == 1 and b._running == 1)
        w = spawn(b.infer, w_feeds, 1, thread_name="w")
        until(lambda: b.depth == 2 and b._running == 2)
        slow.set()
        z = spawn(b.infer, z_feeds, 1, thread_name="z")
        assert taken.wait(10), "w's thread did not take r and z"
        assert regathering.wait(10), "r's thread did not go back to gathering"
        assert not r.done()
        if how == "answered":
            gate.set()
            outputs, _ = r.result(10)  # not after the head's 600 s
            np.testing.assert_allclose(
                outputs["logits"], Reference(repo / "classifier")(r_feeds), atol=1e-4
            )
        else:
            caller.cancel()
            with pytest.raises(Cancelled):
                r.result(10)
            gate.set()
        assert z.result(10)[0]["logits"].shape == (1, 5)
    finally:
        gate.set()
        taken.set()
        assert b.close(timeout=10), f"depth {b.depth}, slots taken {b._running}"
    assert w.result(10)[0]["logits"].shape == (1, 5)
    assert b.depth == 0 and b._running == 0


def test_a_lone_request_whose_deadline_comes_first_is_run_before_it(repo, classifier):
    """A lone request waits for company on an idle server; its deadline (2 s) comes
    before the queue delay ends. It was dropped at its deadline, DEADLINE_EXCEEDED from an
    idle server; it is run before, with what has gathered (nothing)."""
    b = batcher(classifier, max_queue_delay_us=DELAY_US)
    feeds = batch(np.random.default_rng(31), 1, 4)
    outputs, timing = spawn(b.infer, feeds, 1, timeout=2.0, thread_name="soon").result(10)
    np.testing.assert_allclose(outputs["logits"], Reference(repo / "classifier")(feeds), atol=1e-4)
    assert timing.queue_ns < 2e9  # started before its deadline
    assert b.depth == 0 and b._running == 0
    assert b.close(timeout=5)


@pytest.mark.parametrize("instances", [1, 2])
def test_a_request_behind_a_batch_gathering_company_is_run_before_its_deadline(
    repo, classifier, instances
):
    """A request of another length (another batch) queues behind one gathering company for
    the queue delay; its deadline (2 s) comes first. The gathering batch is sent in time
    for it to run, on an idle server; with two slots too (the second runner gathered the
    same batch). (At 0.2 s, on a batcher that had run nothing, the batch was sent 5 ms
    before the deadline, and a loaded machine's first run took longer.)"""
    b = batcher(classifier, instances=instances, max_queue_delay_us=DELAY_US)
    rng = np.random.default_rng(34)
    head = spawn(b.infer, batch(rng, 1, 40), 1, thread_name="head")
    until(lambda: b.depth == 1)
    feeds = batch(rng, 1, 9)
    outputs, _ = spawn(b.infer, feeds, 1, timeout=2.0, thread_name="soon").result(10)
    np.testing.assert_allclose(outputs["logits"], Reference(repo / "classifier")(feeds), atol=1e-4)
    assert head.result(10)[0]["logits"].shape == (1, 5)  # sent for it: not after 600 s
    assert b.close(timeout=5)


def test_a_batch_the_next_request_cannot_join_is_sent_at_once(classifier):
    """Batches of up to 8: 7 rows gather company, then 3 rows arrive, which cannot join.
    The 7 rows waited out the whole queue delay all the same; they run at once now (as
    Triton's batcher sends a batch the next request would overfill), and the 3 rows
    gather company of their own."""
    ran: list[int] = []
    b = batcher(classifier, max_batch_size=8, max_queue_delay_us=DELAY_US,
                on_batch=lambda rows, timing: ran.append(rows))  # fmt: skip
    rng = np.random.default_rng(32)
    seven = spawn(b.infer, batch(rng, 7, 5), 7, thread_name="seven")
    until(lambda: b.depth == 1)
    three = spawn(b.infer, batch(rng, 3, 5), 3, thread_name="three")
    assert seven.result(10)[0]["logits"].shape == (7, 5)  # not after 600 s
    assert ran == [7] and not three.done()
    assert b.close(timeout=10)  # closing runs the 3 rows without waiting for company
    assert three.result(10)[0]["logits"].shape == (3, 5) and ran == [7, 3]


def test_a_row_of_padding_alone_is_not_padded_beside_a_longer_request(repo, classifier):
    """A row whose mask is all 0s attends evenly to every position, padding included:
    padded to a longer request's length, its answer changed with that length (MiniLM's
    last_hidden_state by 1.3-1.5). It shares a batch only with requests of its length."""
    ran: list[int] = []
    b = batcher(classifier, max_queue_delay_us=DELAY_US,
                on_batch=lambda rows, timing: ran.append(rows))  # fmt: skip
    rng = np.random.default_rng(33)
    empty = batch(rng, 1, 5)
    empty["attention_mask"][:] = 0
    longer, same_length = batch(rng, 1, 12), {k: v.copy() for k, v in empty.items()}
    answers = [spawn(b.infer, f, 1) for f in (empty, longer, same_length)]
    until(lambda: b.depth == 3)
    assert b.close(timeout=10)  # runs what is queued, the batches as they were gathered
    assert sorted(ran) == [1, 2], ran  # the longer request alone; the empty rows together
    reference = Reference(repo / "classifier")
    for feeds, answer in zip((empty, longer, same_length), answers, strict=True):
        np.testing.assert_allclose(answer.result(10)[0]["logits"], reference(feeds), atol=1e-4)


def test_closing_the_engine_flushes_every_model_at_once(repo):
    """Closing stops every model's gathering together: a request waiting for company on one
    model is run at once, not after another model's long batch has drained."""
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.engine import Engine
    from quantgate.serve.repository import load_repository

    cfg = ServeConfig(path=repo, max_queue_delay_us=DELAY_US)
    engine = Engine(load_repository(cfg), cfg)
    engine.start()
    engine.ready = True
    busy, waiting = engine.model("classifier"), engine.model("encoder", "1")
    rng = np.random.default_rng(40)
    long_batch, release = threading.Event(), threading.Event()
    run = busy.run

    def held(feeds, outputs=(), options=None):
        long_batch.set()
        release.wait(30)
        return run(feeds, outputs, options)

    busy.run = held
    try:
        # A full batch starts at once; a lone row waits DELAY_US for company.
        first = spawn(engine.infer, busy, batch(rng, cfg.max_batch_size, 4))
        assert long_batch.wait(10)
        lone = spawn(engine.infer, waiting, batch(rng, 1, 4))
        until(lambda: engine._batchers[("encoder", "1")].depth == 1)
        closed = spawn(engine.close, 30)
        outputs, _, rows = lone.result(10)  # answered while the other model still runs
        assert rows == 1 and not closed.done()
    finally:
        release.set()
    assert first.result(10)[2] == cfg.max_batch_size
    assert closed.result(10) is True


def test_the_warm_up_tells_each_batcher_how_long_a_batch_runs(repo):
    """A deadline behind a batch gathering company is met by sending the batch a run's
    time before it: a batcher that had run nothing took that time as 0, and sent it 5 ms
    before the deadline. The warm-up's full batch is its first estimate."""
    from quantgate.serve.config import ServeConfig
    from quantgate.serve.engine import Engine
    from quantgate.serve.repository import load_repository

    cfg = ServeConfig(path=repo, max_queue_delay_us=DELAY_US)
    engine = Engine(load_repository(cfg), cfg)
    engine.start()  # the batchers, then the warm-up, as the server starts
    assert all(b._run_s == 0 for b in engine._batchers.values()) and engine._batchers
    engine.warm_up()
    assert all(b._run_s > 0 for b in engine._batchers.values()), engine._batchers
    assert engine.close(5)
