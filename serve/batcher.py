"""The dynamic batcher: many small requests in, one session.run per batch, results out.

Requests wait in a bounded queue. The batcher takes the oldest, gathers queued requests
of the same shape bucket up to the max batch size (waiting at most the max queue delay
for more), pads them to one sequence length with the attention mask set to 0 on the
padding, runs the batch on a worker thread (the event loop keeps serving), cuts each
request's rows and length back out, and resolves its future. Requests whose client gave
up (cancelled) or whose deadline passed are dropped before they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from quantgate.errors import QuantgateError
from quantgate.serve.errors import DeadlineExceeded, Unavailable
from quantgate.serve.runtime import MASK, Model

log = logging.getLogger(__name__)

MIN_BUCKET = 16  # sequence lengths 1..16 share a bucket; then powers of two


@dataclass(frozen=True)
class Timing:
    """Where one request's time went, in nanoseconds (Triton's statistics split)."""

    queue_ns: int  # admitted -> its batch started
    input_ns: int  # assembling (padding, stacking) the batch
    infer_ns: int  # session.run for the whole batch
    output_ns: int  # cutting the results back out


@dataclass(eq=False)
class _Pending:
    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    rows: int
    key: tuple  # requests with equal keys can share a batch
    length: int  # sequence length (0 when the model is not padded)
    future: asyncio.Future
    deadline: float | None  # loop.time() after which it must not start
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)


def bucket(length: int) -> int:
    """The padded-length bucket of a sequence length: 16, 32, 64, 128, ..."""
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


class Batcher:
    """One model's queue and the loop that turns it into batches.

    ``dynamic=False`` runs every request on its own (for comparison, and for models
    that cannot batch). ``on_batch(rows, timing)`` is called after every execution.
    """

    def __init__(
        self,
        model: Model,
        executor: Executor,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        max_queue_size: int,
        dynamic: bool = True,
        instances: int = 1,
        on_batch: Callable[[int, Timing], None] | None = None,
    ):
        self.model = model
        self._executor = executor
        self._max_rows = max(1, min(max_batch_size, model.max_batch_size or 1))
        self._delay_ns = max_queue_delay_us * 1000
        self._max_queue = max_queue_size
        self._dynamic = dynamic and model.batched
        self._instances = instances
        self._on_batch = on_batch
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        """Requests waiting whose caller is still there."""
        return sum(not p.future.done() for p in self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.model.name}")

    async def close(self) -> None:
        """Admit nothing more; return once every admitted request has been answered."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def infer(
        self,
        feeds: dict[str, np.ndarray],
        rows: int,
        *,
        outputs: tuple[str, ...] = (),
        timeout: float | None = None,
    ) -> tuple[dict[str, np.ndarray], Timing]:
        """Queue one validated request and wait for its outputs.

        Raises Unavailable at once when the queue is full or the server is shutting down,
        DeadlineExceeded when ``timeout`` seconds pass before it starts.
        """
        if self._closing:
            raise Unavailable("the server is shutting down; retry on another replica")
        if len(self._queue) >= self._max_queue:
            self._drop_dead()  # callers that gave up or ran out of time hold no place
        if len(self._queue) >= self._max_queue:
            raise Unavailable(
                f"model {self.model.name!r}: queue full ({self._max_queue} requests waiting); "
                "retry with backoff"
            )
        length = 0
        if self.model.sequence_axis is not None:
            length = feeds[MASK].shape[1]
            key: tuple = ("padded", bucket(length))
        else:
            key = tuple((name, a.shape[1:]) for name, a in sorted(feeds.items()))
        loop = asyncio.get_running_loop()
        pending = _Pending(
            feeds=feeds,
            outputs=outputs,
            rows=rows,
            key=key,
            length=length,
            future=loop.create_future(),
            deadline=None if timeout is None else loop.time() + timeout,
        )
        self._queue.append(pending)
        self._wake.set()
        return await pending.future  # cancelling the caller cancels the future: it is dropped

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self._instances)
        running: set[asyncio.Task] = set()
        while True:
            await slots.acquire()
            group = await self._next_batch()
            if not group:
                break
            task = asyncio.create_task(self._execute(group))
            running.add(task)
            task.add_done_callback(lambda t: (running.discard(t), slots.release()))
        await asyncio.gather(*running)

    def _drop_dead(self) -> None:
        now = asyncio.get_running_loop().time()
        alive = []
        for p in self._queue:
            if p.future.done():  # cancelled by its client
                continue
            # gRPC itself cancels a unary call at its deadline (the branch above); this
            # catches a deadline that passes before that cancellation reaches the queue
            if p.deadline is not None and now >= p.deadline:
                p.future.set_exception(
                    DeadlineExceeded(f"model {self.model.name!r}: deadline passed while queued")
                )
                continue
            alive.append(p)
        self._queue = alive

    def _group(self) -> list[_Pending]:
        head = self._queue[0]
        if not self._dynamic:
            return [head]
        group, rows = [], 0
        for p in self._queue:
            if p.key == head.key and rows + p.rows <= self._max_rows:
                group.append(p)
                rows += p.rows
        return group

    async def _next_batch(self) -> list[_Pending]:
        """The next group to run; empty once closing and the queue is drained."""
        while True:
            self._drop_dead()
            if not self._queue:
                if self._closing:
                    return []
                self._wake.clear()
                await self._wake.wait()
                continue
            group = self._group()
            full = sum(p.rows for p in group) >= self._max_rows
            wait_ns = self._queue[0].enqueued_ns + self._delay_ns - time.perf_counter_ns()
            if not self._dynamic or full or wait_ns <= 0 or self._closing:
                break
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait_ns / 1e9)
        chosen = set(map(id, group))
        self._queue = [p for p in self._queue if id(p) not in chosen]
        return group

    async def _execute(self, group: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._run_group, group)
        except QuantgateError as e:
            if len(group) == 1:
                results = [e]
            else:  # one bad request must not fail its neighbours: run each alone
                log.info("batch of %d failed (%s); running its requests one by one", len(group), e)
                results = []
                for p in group:
                    try:
                        results.extend(
                            await loop.run_in_executor(self._executor, self._run_group, [p])
                        )
                    except QuantgateError as one:
                        results.append(one)
        for p, result in zip(group, results, strict=True):
            if p.future.done():
                continue  # the client went away while it ran
            if isinstance(result, Exception):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

    def _run_group(self, group: list[_Pending]) -> list[tuple[dict[str, np.ndarray], Timing]]:
        """On a worker thread: assemble, run, split. Returns one (outputs, timing) per request."""
        start = time.perf_counter_ns()
        feeds = group[0].feeds if len(group) == 1 else self._assemble(group)
        outputs = (
            tuple(sorted({n for p in group for n in p.outputs}))
            if all(p.outputs for p in group)
            else ()
        )
        assembled = time.perf_counter_ns()
        batch = self.model.run(feeds, outputs)
        ran = time.perf_counter_ns()
        split, row = [], 0
        for p in group:
            keep = p.outputs or tuple(batch)
            split.append(
                {name: self._cut(name, batch[name], row, p.rows, p.length) for name in keep}
            )
            row += p.rows
        done = time.perf_counter_ns()
        rows = sum(p.rows for p in group)
        timings = [
            Timing(start - p.enqueued_ns, assembled - start, ran - assembled, done - ran)
            for p in group
        ]
        if self._on_batch is not None:
            self._on_batch(rows, timings[0])
        return list(zip(split, timings, strict=True))

    def _assemble(self, group: list[_Pending]) -> dict[str, np.ndarray]:
        """Stack requests into one batch, padding to the longest (mask 0 on padding)."""
        if self.model.sequence_axis is None:
            return {n: np.concatenate([p.feeds[n] for p in group]) for n in group[0].feeds}
        rows = sum(p.rows for p in group)
        length = max(p.length for p in group)
        feeds = {}
        for name, first in group[0].feeds.items():
            batch = np.zeros((rows, length), dtype=first.dtype)  # (B, T); 0: padding, mask off
            row = 0
            for p in group:
                batch[row : row + p.rows, : p.length] = p.feeds[name]
                row += p.rows
            feeds[name] = batch
        return feeds

    def _cut(self, name: str, out: np.ndarray, row: int, rows: int, length: int) -> np.ndarray:
        out = out[row : row + rows]
        if length and self.model.pads_output(name):
            out = out[:, :length]  # (b, T_padded, ...) -> (b, T, ...)
        return out
