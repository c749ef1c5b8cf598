"""Triton's per-model statistics as counted (the servicer encodes them; tests/serve's gRPC
tests read them back through tritonclient and perf_analyzer)."""

from __future__ import annotations

import threading

from quantgate.serve.batcher import Timing
from quantgate.serve.metrics import DURATIONS, ModelStats


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
