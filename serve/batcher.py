"""The dynamic batcher: many small requests in, one session.run per batch, results out.

Requests wait in a bounded queue. A batch is the oldest request and the queued requests
of its shape bucket, up to the max batch size (gathered for at most the max queue delay,
and sent at once when the next request would overfill it, or in time for every queued
request's deadline);
it is padded to one sequence length with the attention mask set to 0 on the padding, run,
and each request's rows and length are cut back out. Requests whose client gave up or
whose deadline passed are dropped before they run, and a batch whose every client has gone
is stopped while it runs (ONNX Runtime's terminate flag, checked between nodes).

No thread of its own runs the batches: the request threads do (leader/follower). gRPC
hands every request a thread of its own, and that thread would otherwise only wait. A
request that finds a free slot (``instances`` batches may run at once) runs the next batch
itself, which may hold requests that arrived while it waited; one that finds every slot
taken waits until its result is ready or a finishing runner hands it the slot. A lone
request therefore runs on the thread that received it: no hand-off to a worker and back,
which on a small machine is a measurable share of a request's time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from quantgate.errors import (
    Cancelled,
    DeadlineExceeded,
    InferenceFailed,
    QuantgateError,
    Unavailable,
)
from quantgate.padding import MASK, right_pad
from quantgate.serve.runtime import Model

log = logging.getLogger(__name__)

MIN_BUCKET = 16  # sequence lengths 1..16 share a bucket; then powers of two
# A batch gathering company starts in time for every queued request's deadline, and this
# long before (Batcher._start_by): the answer must still travel back, the server's clock
# started late, when it read the call's headers, and the runner's wake-up for the start
# comes late on a busy host (a scheduler's time slice, or the GIL's 5 ms switch interval).
# At 5 ms, a batcher without a run-time estimate (no warm-up) dropped such a request at
# its deadline in a quarter of the runs with one other busy process on 2 CPUs.
START_BEFORE_DEADLINE_S = 0.02


@dataclass(frozen=True)
class Timing:
    """Where one request's time went, in nanoseconds (Triton's statistics split)."""

    queue_ns: int  # admitted -> its batch started
    input_ns: int  # assembling (padding, stacking) the batch
    infer_ns: int  # session.run for the whole batch
    output_ns: int  # cutting the results back out


class Caller:
    """The client behind one or more requests: a unary call, or a stream.

    gRPC calls ``cancel`` when the call ends, whether it was answered, cancelled by the
    client or hit its deadline; requests of the caller still queued then are dropped and
    their threads released.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gone = False
        self._hooks: dict[int, Callable[[], None]] = {}

    @property
    def gone(self) -> bool:
        return self._gone

    def cancel(self) -> None:
        with self._lock:
            self._gone = True
            hooks, self._hooks = list(self._hooks.values()), {}
        for hook in hooks:
            hook()

    def at_end(self, hook: Callable[[], None]) -> bool:
        """Run ``hook`` when the call ends; False (and no hook) where it has ended."""
        return self._watch(-1, hook)  # no request's key: ids are positive

    def _watch(self, key: int, hook: Callable[[], None]) -> bool:
        """Run ``hook`` if the caller goes; False (and no hook) when it already has."""
        with self._lock:
            if self._gone:
                return False
            self._hooks[key] = hook
            return True

    def _unwatch(self, key: int) -> None:
        with self._lock:
            self._hooks.pop(key, None)


@dataclass(eq=False)
class _Pending:
    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    rows: int
    key: tuple  # requests with equal keys can share a batch
    length: int  # sequence length (0 when the model is not padded)
    deadline: float | None  # time.monotonic() after which it must not start
    timeout: float | None  # the seconds from its arrival that set ``deadline``
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    # Set under the batcher's lock; ``wake`` tells the waiting thread to look again.
    result: Any = None  # (outputs, Timing) or the exception to raise
    done: bool = False
    lead: bool = False  # its thread holds a runner slot (or has been handed one)
    wake: threading.Event = field(default_factory=threading.Event)


def bare(e: QuantgateError) -> QuantgateError:
    """``e`` without its tracebacks, to answer a request with. A traceback holds the
    runner's frames, which hold the batch's requests, one of which holds ``e``: a cycle
    only the garbage collector would free, and with it every array of the batch. The
    exceptions it was raised from (ONNX Runtime's) hold those frames too."""
    chain: list[BaseException | None] = [e]
    seen = set()
    while chain:
        x = chain.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        x.__traceback__ = None
        chain += [x.__cause__, x.__context__]
    return e


def bucket(length: int) -> int:
    """The padded-length bucket of a sequence length: 16, 32, 64, 128, ..."""
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


class Batcher:
    """One model's queue, and the rules by which request threads turn it into batches.

    ``dynamic=False`` runs every request on its own (for comparison, and for models
    that cannot batch). ``on_batch(rows, timing)`` is called after every execution.
    """

    def __init__(
        self,
        model: Model,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int,
        dynamic: bool = True,
        instances: int = 1,
        on_batch: Callable[[int, Timing], None] | None = None,
    ):
        self.model = model
        self._max_rows = max(1, min(max_batch_size, model.max_batch_size or 1))
        self._delay_ns = max_queue_delay_us * 1000
        self._max_queue = max_queue_size
        self._dynamic = dynamic and model.batched
        self._instances = instances
        self._on_batch = on_batch
        # Guards everything below and every _Pending's result/done/lead. A runner gathering
        # company for its batch waits on it; arrivals, departures and the answer to a
        # runner's own request notify it.
        self._cv = threading.Condition()
        self._queue: list[_Pending] = []
        self._running = 0  # runner slots taken (at most ``instances``)
        self._closing = False
        self.cut_off = 0  # admitted requests whose clients went while the batcher closed
        # The batches running, by id of each of their requests: when every client of one
        # has gone, its run is told to stop (ONNX Runtime's terminate flag) instead of
        # holding a runner slot for answers nobody reads.
        self._runs: dict[int, tuple[list[_Pending], ort.RunOptions]] = {}
        # How long batches took lately: each new one weighs a quarter. (Runners update it
        # outside the lock: a lost update only delays the average.)
        self._run_s = 0.0

    def expect_run_s(self, seconds: float) -> None:
        """Take ``seconds`` as how long a batch runs, until batches say (the warm-up's
        time: at 0, the first request with a deadline behind a batch gathering company was
        started only ``START_BEFORE_DEADLINE_S`` before it, too late for any real run)."""
        self._run_s = seconds

    @property
    def depth(self) -> int:
        """Requests waiting to run."""
        return len(self._queue)

    def close(self, timeout: float | None = None) -> bool:
        """Admit nothing more; wait until every admitted request has been answered
        (False if ``timeout`` seconds passed first)."""
        self.stop()
        return self.drained(timeout)

    def stop(self) -> None:
        """Admit nothing more, and run what is queued without waiting for company."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()  # a runner gathering company runs what it has

    def drained(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running (False if ``timeout`` passed first)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._running, timeout)

    def infer(
        self,
        feeds: dict[str, np.ndarray],
        rows: int,
        *,
        outputs: tuple[str, ...] = (),
        timeout: float | None = None,
        caller: Caller | None = None,
    ) -> tuple[dict[str, np.ndarray], Timing]:
        """Queue one validated request and return its outputs once they are ready; the
        calling thread may run batches (its own and others') meanwhile.

        Raises Unavailable at once when the queue is full or the server is shutting down,
        DeadlineExceeded when ``timeout`` seconds pass before it starts, Cancelled when
        ``caller`` goes away first.
        """
        pending = self._pending(feeds, rows, outputs, timeout)
        if caller is not None and not caller._watch(id(pending), lambda: self._abandon(pending)):
            raise Cancelled("the client went away before the request was queued")
        try:
            with self._cv:
                # Answered already when the caller went between _watch and here: never queue it.
                queued = runs = not pending.done
                if queued:
                    self._admit(pending)
                    runs = self._running < self._instances
                    if runs:
                        self._running += 1
                        pending.lead = True
            if runs:
                self._lead(pending)
            if queued:
                self._wait(pending)
        except BaseException as e:  # never leave it queued, or holding a slot nobody runs
            self._withdraw(pending, e)
            raise
        finally:
            if caller is not None:
                caller._unwatch(id(pending))
        # An exception raised here holds this frame: were it still in ``pending`` or in a
        # local, that would be a cycle, and only the garbage collector could free the
        # request's arrays.
        result, pending.result = pending.result, None
        try:
            if isinstance(result, BaseException):
                raise result
            return result
        finally:
            del result

    # -- admission and waiting ----------------------------------------------------------

    def _pending(
        self, feeds: dict[str, np.ndarray], rows: int, outputs: tuple[str, ...], timeout
    ) -> _Pending:
        length = 0
        if self.model.sequence_axis is not None:
            mask = feeds[MASK]
            length = mask.shape[1]
            key: tuple = ("padded", bucket(length))
            if not mask.any(axis=1).all():
                # A row of padding alone attends evenly to every key, padding included:
                # padded beside a longer request, its answer would change with that
                # request's length. It shares a batch only where nothing is padded.
                key = ("unpadded", length)
        else:
            key = tuple((name, a.shape[1:]) for name, a in sorted(feeds.items()))
        deadline = None if timeout is None else time.monotonic() + timeout
        return _Pending(feeds, outputs, rows, key, length, deadline, timeout)

    def _admit(self, pending: _Pending) -> None:
        """Queue it, or raise Unavailable (call with the lock held)."""
        if self._closing:
            raise Unavailable(
                "the server is shutting down; retry on another replica", "shutting_down"
            )
        if len(self._queue) >= self._max_queue:
            self._drop_expired()  # requests whose deadline passed hold no place
        if len(self._queue) >= self._max_queue:
            raise Unavailable(
                f"model {self.model.name!r}: queue full ({self._max_queue} requests waiting); "
                "retry with backoff",
                "queue_full",
            )
        self._queue.append(pending)
        self._cv.notify_all()  # a runner gathering company

    def _wait(self, me: _Pending) -> None:
        """Until ``me`` is answered; run batches whenever a finishing runner hands over."""
        while True:
            # Look, then wait: one wake-up may say both "lead" and "done", and after
            # leading nothing sets ``wake`` again.
            with self._cv:
                if me.lead:  # _lead clears it when it passes the slot on
                    lead = True
                elif me.done:
                    return
                else:
                    lead, timeout = False, None
                    if me.deadline is not None:
                        timeout = me.deadline - time.monotonic()
                        if timeout <= 0:
                            if me in self._queue:  # not started: drop it
                                self._queue.remove(me)
                                self._finish(me, self._expired(me))
                                self._cv.notify_all()
                                return
                            me.deadline = timeout = None  # started: wait it out
                    me.wake.clear()  # whatever changes ``me`` from here on sets it
            if lead:
                self._lead(me)
            else:  # a wait beyond what the platform can time is a wait without end
                me.wake.wait(None if timeout is None else min(timeout, threading.TIMEOUT_MAX))

    def _withdraw(self, pending: _Pending, error: BaseException) -> None:
        """Its own thread failed while it waited or led (a bug, an interrupt): take it out
        of the queue, answer it, and pass on a runner slot it holds or was handed: a slot
        given to a request whose thread is gone would never run another batch."""
        with self._cv:
            if pending in self._queue:
                self._queue.remove(pending)
                self._cv.notify_all()
            self._finish(pending, error)
            if pending.lead:
                pending.lead = False
                self._hand_over()

    def _abandon(self, pending: _Pending) -> None:
        """Its client went away: drop it if still queued; a running batch all of whose
        clients have gone is told to stop."""
        with self._cv:
            if pending.done:
                return
            self.cut_off += self._closing  # during a drain: the grace ran out, or it gave up
            if pending in self._queue:
                self._queue.remove(pending)
                self._cv.notify_all()
            # running: its result is not waited for; its thread returns now
            self._finish(pending, Cancelled("the client cancelled the request"))
            run = self._runs.get(id(pending))
            if run is not None and all(p.done for p in run[0]):
                run[1].terminate = True  # nobody waits for any of its answers

    def _finish(self, pending: _Pending, result: Any) -> None:
        """Answer ``pending`` once (call with the lock held)."""
        if not pending.done:
            pending.result, pending.done = result, True
            pending.wake.set()
            if pending.lead:  # its thread may be gathering company on the condition: free it
                self._cv.notify_all()

    def _expired(self, p: _Pending) -> DeadlineExceeded:
        within = f" ({p.timeout * 1e3:.0f} ms from its arrival)" if p.timeout is not None else ""
        return DeadlineExceeded(
            f"model {self.model.name!r}: deadline passed while queued{within}: give the call "
            "a longer deadline; where the server is busy, the model more capacity (replicas, "
            "--instances)"
        )

    def _drop_expired(self) -> None:
        now = time.monotonic()
        alive = []
        for p in self._queue:
            if p.deadline is not None and now >= p.deadline:
                self._finish(p, self._expired(p))
            else:
                alive.append(p)
        self._queue = alive

    # -- running ------------------------------------------------------------------------

    def _lead(self, me: _Pending) -> None:
        """Holding a runner slot: run batches while ``me`` waits and the queue is not
        empty, then pass the slot on."""
        while True:
            with self._cv:
                group = self._next_batch(me)
                if not group:
                    me.lead = False
                    self._hand_over()
                    return
            self._execute(group)

    def _hand_over(self) -> None:
        """Give this slot to the oldest queued request whose thread holds none (a runner
        whose own request is still queued is busy, and would sit on a second one), or
        free it (lock held)."""
        heir = next((p for p in self._queue if not p.lead), None)
        if heir is not None:
            heir.lead = True
            heir.wake.set()
        else:
            self._running -= 1
            self._cv.notify_all()  # close() waits for the last slot

    def _group(self) -> tuple[list[_Pending], bool]:
        """The next batch: the oldest request and the queued ones of its bucket that fit,
        in order; and whether waiting may still add to it: not when it is full, nor when a
        request of its bucket was left out for want of room (the batch is sent then, as
        Triton's dynamic batcher sends one when the next request would not fit)."""
        head = self._queue[0]
        if not self._dynamic:
            return [head], False
        group, rows, left_out = [head], head.rows, False  # a request past a batch runs alone
        for p in self._queue[1:]:
            if p.key != head.key:
                continue
            if rows + p.rows <= self._max_rows:
                group.append(p)
                rows += p.rows
            else:
                left_out = True
        return group, rows < self._max_rows and not left_out

    def _next_batch(self, me: _Pending) -> list[_Pending]:
        """Take the next group off the queue, waiting up to the max queue delay for more
        requests of its bucket (lock held; the wait releases it), but not so long that a
        queued request would miss its deadline (``_start_by``): company is not worth an
        answer, to a request of the group or one waiting behind it.

        Empty: nothing queued, or ``me`` was answered (cancelled, say) while it waited, and
        its thread is free to go: the slot passes to a queued request's thread, which goes
        on gathering. The wait also ends at ``me``'s deadline, where ``me`` is not in the
        group: no other thread watches it."""
        while True:
            self._drop_expired()
            if not self._queue or me.done:
                return []
            group, grows = self._group()
            wait_ns = self._queue[0].enqueued_ns + self._delay_ns - time.perf_counter_ns()
            if not grows or wait_ns <= 0 or self._closing:
                break
            wait_s, now = wait_ns / 1e9, time.monotonic()
            start_by = self._start_by(group)
            if start_by is not None:
                if start_by <= now:
                    break
                wait_s = min(wait_s, start_by - now)
            if me.deadline is not None and me.deadline > now:  # passed: dropped, or started
                wait_s = min(wait_s, me.deadline - now)
            self._cv.wait(wait_s)
        chosen = set(map(id, group))
        self._queue = [p for p in self._queue if id(p) not in chosen]
        return group

    def _start_by(self, group: list[_Pending]) -> float | None:
        """When ``group``, gathering company, must start so that every queued request with a
        deadline can still be answered by it: one of the group after this batch's run, any
        other after this one and its own (they wait for this slot); None: no deadline.
        ``START_BEFORE_DEADLINE_S`` more, for the answer's way back and a late wake-up."""
        ours = set(map(id, group))
        runs = self._run_s
        latest = [
            p.deadline - (runs if id(p) in ours else 2 * runs)
            for p in self._queue
            if p.deadline is not None
        ]
        return min(latest) - START_BEFORE_DEADLINE_S if latest else None

    def _execute(self, group: list[_Pending]) -> None:
        """Run ``group`` (outside the lock) and answer each of its requests."""
        options = ort.RunOptions()
        log.debug("%s: running a batch of %d", self.model.name, len(group))
        with self._cv:
            self._runs.update((id(p), (group, options)) for p in group)
            # every client went between leaving the queue and here: no _abandon comes later
            options.terminate = all(p.done for p in group)
        try:
            results: list = self._run_group(group, options)
        except Exception as e:
            with self._cv:
                abandoned = all(p.done for p in group)  # stopped, or failed unread
            if abandoned:
                log.debug("a batch of %d stopped: its clients had all gone (%s)", len(group), e)
                return
            results = self._failed(group, e, options)
        finally:
            with self._cv:
                for p in group:
                    self._runs.pop(id(p), None)
        with self._cv:
            for p, result in zip(group, results, strict=True):
                self._finish(p, result)

    def _failed(self, group: list[_Pending], error: Exception, options: ort.RunOptions) -> list:
        """The answers of a group whose run raised ``error``."""
        if not isinstance(error, QuantgateError):  # a bug: answer every waiting thread
            why = InferenceFailed.logged(f"a batch of {len(group)} failed", error, log, trace=True)
            return [InferenceFailed(*why.args) for _ in group]  # one each: each thread raises it
        if len(group) == 1:
            return [bare(error)]
        # one bad request must not fail its neighbours: run each alone
        log.info("batch of %d failed (%s); running its requests one by one", len(group), error)
        bare(error)  # each request's error below has it as its context
        # Not those already answered: a client that went away meanwhile (its Cancelled
        # stands; _finish keeps the first answer).
        with self._cv:
            todo = [not p.done for p in group]
        return [
            self._run_alone(p, options) if run else None for p, run in zip(group, todo, strict=True)
        ]

    def _run_alone(self, p: _Pending, options: ort.RunOptions | None = None):
        try:
            return self._run_group([p], options)[0]
        except QuantgateError as e:
            return bare(e)
        except Exception as e:  # a bug: answer it; escaping would strand the rest
            return InferenceFailed.logged("a request run alone failed", e, log, trace=True)

    def _run_group(
        self, group: list[_Pending], options: ort.RunOptions | None = None
    ) -> list[tuple[dict[str, np.ndarray], Timing]]:
        """Assemble, run, split. Returns one (outputs, timing) per request."""
        start = time.perf_counter_ns()
        feeds = group[0].feeds if len(group) == 1 else self._assemble(group)
        outputs = (
            tuple(sorted({n for p in group for n in p.outputs}))
            if all(p.outputs for p in group)
            else ()
        )
        assembled = time.perf_counter_ns()
        batch = self.model.run(feeds, outputs, options)
        ran = time.perf_counter_ns()
        split, row = [], 0
        for p in group:
            keep = p.outputs or tuple(batch)
            split.append(
                {name: self._cut(name, batch[name], row, p.rows, p.length) for name in keep}
            )
            row += p.rows
        done = time.perf_counter_ns()
        self._run_s += ((done - start) / 1e9 - self._run_s) / 4
        rows = sum(p.rows for p in group)
        timings = [
            Timing(start - p.enqueued_ns, assembled - start, ran - assembled, done - ran)
            for p in group
        ]
        if self._on_batch is not None:
            self._on_batch(rows, timings[0])
        return list(zip(split, timings, strict=True))

    def _assemble(self, group: list[_Pending]) -> dict[str, np.ndarray]:
        """Stack requests into one batch, padding to the longest with each input's pad value
        (mask 0 on padding)."""
        if self.model.sequence_axis is None:
            return {n: np.concatenate([p.feeds[n] for p in group]) for n in group[0].feeds}
        # every input is (batch, sequence): that is what gives the model a sequence axis
        feeds = [p.feeds for p in group]
        return right_pad(feeds, self.model.pad_values, sequence=feeds[0])

    def _cut(self, name: str, out: np.ndarray, row: int, rows: int, length: int) -> np.ndarray:
        """Request's rows ``row .. row + rows`` of output ``name``, cut back to its
        ``length``. An unbatched model's answer is its lone request's, whole: its first axis
        is no rows (cut there, a (3, 4) answer came back as its first row)."""
        if not self.model.batched:
            return out
        out = out[row : row + rows]
        if length and self.model.pads_output(name):
            out = out[:, :length]  # (b, T_padded, ...) -> (b, T, ...)
        return out
