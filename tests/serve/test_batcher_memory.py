"""What a request leaves behind once it has been answered: nothing.

A request that ends in an error must not keep its arrays (or its batch's) alive in a
reference cycle, which only Python's cyclic garbage collector would free, at a time of
its choosing: under overload, every refused or late request would hold its tensors until
then. The collector is switched off here, so whatever outlives the call is in a cycle.
"""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import Future

import numpy as np
import pytest
from helpers import batch, batcher, hold_first_run, until

from quantgate.errors import BadRequest, Cancelled, DeadlineExceeded, QuantgateError
from quantgate.serve.batcher import Caller


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _call(b, seed: int, *, poison: bool = False, **kwargs) -> tuple[type, list[weakref.ref]]:
    """One request (``poison``: one the model refuses), how it ended (its error's type, or
    None for an answer) and weak references to its arrays. The request, its answer and
    its error are gone when this returns, unless a cycle holds them."""
    feeds = batch(np.random.default_rng(seed), 1, 4)
    if poison:
        feeds["input_ids"][0, 0] = 0
    refs = [weakref.ref(a) for a in feeds.values()]
    try:
        b.infer(feeds, 1, **kwargs)
    except QuantgateError as e:
        return type(e), refs
    return type(None), refs


def _spawned(*args, **kwargs) -> tuple[Future, threading.Thread]:
    """``_call`` on a thread of its own (which never hands on the request's error)."""
    future: Future = Future()
    thread = threading.Thread(target=lambda: future.set_result(_call(*args, **kwargs)), daemon=True)
    thread.start()
    return future, thread


def _refusing(model):
    """Make ``model.run`` refuse any batch holding a row that starts with token 0 (which
    ``batch`` never draws)."""
    run = model.run

    def refuse(feeds, outputs=(), options=None):
        if (feeds["input_ids"][:, 0] == 0).any():
            try:  # as Model.run raises it: from ONNX Runtime's own error
                raise ValueError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT")
            except ValueError as e:
                raise BadRequest("refused by the model") from e
        return run(feeds, outputs, options)

    model.run = refuse


def _alive(refs: list[weakref.ref]) -> int:
    return sum(r() is not None for r in refs)


def test_a_request_past_its_deadline_leaves_nothing_behind(classifier, no_gc):
    b = batcher(classifier)
    ended, refs = _call(b, 40, timeout=0.0)  # expired before it could start
    assert ended is DeadlineExceeded
    assert _alive(refs) == 0
    assert b.close(timeout=5)


def test_a_cancelled_request_leaves_nothing_behind(classifier, no_gc):
    b = batcher(classifier)
    started, release = hold_first_run(classifier)
    busy, busy_thread = _spawned(b, 41)
    assert started.wait(10)
    caller = Caller()
    gone, gone_thread = _spawned(b, 42, caller=caller)
    until(lambda: b.depth == 1)
    caller.cancel()
    ended, refs = gone.result(10)
    gone_thread.join(10)
    assert ended is Cancelled
    assert _alive(refs) == 0
    release.set()
    assert busy.result(10)[0] is type(None)
    busy_thread.join(10)
    assert b.close(timeout=5)


def test_a_request_the_model_refuses_leaves_nothing_behind(classifier, no_gc):
    b = batcher(classifier)
    _refusing(classifier)
    ended, refs = _call(b, 43, poison=True)
    assert ended is BadRequest
    assert _alive(refs) == 0
    assert b.close(timeout=5)


def test_a_refused_batch_rerun_alone_leaves_nothing_behind(classifier, no_gc):
    """A batch of three the model refuses (one bad row); each request is run alone."""
    b = batcher(classifier)
    started, release = hold_first_run(classifier)
    _refusing(classifier)
    first, first_thread = _spawned(b, 44)
    assert started.wait(10)
    calls = [_spawned(b, 45 + i, poison=i == 1) for i in range(3)]
    until(lambda: b.depth == 3)
    release.set()
    outcomes = [future.result(10) for future, _ in calls]
    for _, thread in [(first, first_thread), *calls]:
        thread.join(10)
    assert [ended for ended, _ in outcomes] == [type(None), BadRequest, type(None)]
    assert first.result(10)[0] is type(None)
    assert [_alive(refs) for _, refs in outcomes] == [0, 0, 0]
    assert b.close(timeout=5)


def test_a_request_cancelled_while_its_refused_batch_runs_leaves_nothing_behind(classifier, no_gc):
    """Its client goes while the model runs it; the model then refuses it: that answer
    is never raised in any thread, and must not stay behind either."""
    b = batcher(classifier)
    _refusing(classifier)
    started, release = hold_first_run(classifier)  # held, then refused
    caller = Caller()
    future, thread = _spawned(b, 48, poison=True, caller=caller)
    assert started.wait(10)
    caller.cancel()
    release.set()
    ended, refs = future.result(10)  # its thread ran the batch: it returns after it
    thread.join(10)
    assert ended is Cancelled
    assert _alive(refs) == 0
    assert b.close(timeout=5)
