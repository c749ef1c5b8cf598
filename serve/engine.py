"""The engine: the served models, one batcher each, warm-up, readiness and the counters.

Everything the servicer needs beyond converting messages: it validates a decoded
request against its model, queues it, and accounts for how it ended.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from quantgate.errors import ResponseTooLarge, Unavailable
from quantgate.serve.batcher import Batcher, Caller, Timing, bucket
from quantgate.serve.config import ServeConfig
from quantgate.serve.metrics import Metrics, ModelStats
from quantgate.serve.repository import Repository
from quantgate.serve.runtime import Model

log = logging.getLogger(__name__)


WARMING_UP = "the server is warming up its models; retry shortly"
SHUTTING_DOWN = (
    "the server is shutting down and takes no new requests; send them to another instance "
    "(or retry once it has restarted)"
)


def too_large(size: int, limit: int, outputs: dict, *, at_least=False) -> ResponseTooLarge:
    """The error for an answer gRPC would refuse to send, with what to do: counted and
    logged as RESOURCE_EXHAUSTED, and said in words gRPC's own refusal does not have.
    ``outputs``: name -> array, or its bytes; ``at_least``: known from the request's shapes
    before it ran (``Model.answer_sizes``)."""
    parts = ", ".join(
        f"{name} {getattr(a, 'nbytes', a):,}" for name, a in outputs.items()
    )  # fmt: skip
    would = f"would be at least {size:,} bytes" if at_least else f"is {size:,} bytes"
    return ResponseTooLarge(
        f"the response {would}, over the server's --max-message-bytes {limit:,} (outputs, "
        f"in bytes: {parts}). Ask only for the outputs you need, send fewer rows per "
        "request, or start the server with a larger --max-message-bytes"
    )


class Engine:
    def __init__(self, repository: Repository, cfg: ServeConfig, metrics: Metrics | None = None):
        self.repository = repository
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        models = list(repository)
        self.stats = {(m.name, m.version): ModelStats(m.name, m.version) for m in models}
        self._batchers: dict[tuple[str, str], Batcher] = {}
        # Each series looked up once: labels() takes a lock and builds a key on every call,
        # on every request's path. Counters by (name, version, code), a bounded set; the
        # histograms of each served model, made below.
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._histograms: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._failed: dict[tuple[str, str, str], Any] = {}  # by (name, version, code)
        # Admitting requests: the server sets it once the models are warm; close() clears it.
        self.ready = False
        # Set by close(): the server is going away (not warming up); open streams end.
        self.closing = threading.Event()
        for m in models:
            self.metrics.model.labels(
                m.name, m.version, m.variant.precision, m.provider, m.variant.file
            ).set(1)
            # the bundle's and session's seconds; the warm-up adds its runs
            self.metrics.load.labels(m.name, m.version).set(m.load_s)
            self.metrics.bundle_changed.labels(m.name, m.version).set(0)
            self.metrics.bundle_refused.labels(m.name, m.version).set(0)
            # Every model's series from the start, at 0: an idle model's rate() is 0, not
            # absent, and an alert on refusals has a series before the first one
            self.metrics.requests.labels(m.name, m.version, "OK")
            self._histograms[(m.name, m.version)] = (
                self.metrics.latency.labels(m.name, m.version),
                self.metrics.queue.labels(m.name, m.version),
            )
            for reason in Unavailable.REASONS:
                self.metrics.refused.labels(m.name, m.version, reason)

    def start(self) -> None:
        """One batcher per model."""
        for m in self.repository:
            key = (m.name, m.version)
            self._batchers[key] = b = Batcher(
                m,
                max_batch_size=self.cfg.max_batch_size,
                max_queue_delay_us=self.cfg.max_queue_delay_us,
                max_queue_size=self.cfg.max_queue_size,
                dynamic=self.cfg.dynamic_batching,
                instances=self.cfg.instances,
                on_batch=self._on_batch(m),
            )
            depth = self.metrics.queue_depth.labels(m.name, m.version)
            depth.set_function(lambda b=b: b.depth)  # type: ignore[misc]
            self.metrics.queue_limit.labels(m.name, m.version).set(self.cfg.max_queue_size)

    def warm_up(self, stop: threading.Event | None = None) -> None:
        """Run every model at three shapes before reporting ready: one short row, one row
        of the longest bucket (up to 128), and a full batch of short rows; no more runs
        once ``stop`` is set (a server asked to stop during its warm-up never serves).

        ONNX Runtime allocates and plans on the first runs; a client should not pay for that.
        Each run's time is added to the model's load time (quantgate_model_load_seconds),
        which is logged once its runs are done.
        """
        for m in self.repository:
            longest = min(bucket(128), m.max_sequence or bucket(128))
            shapes = [(1, min(16, longest))]
            if m.sequence_axis is not None:
                shapes += [(1, longest), (m.max_batch_size, min(16, longest))]
            load = self.metrics.load.labels(m.name, m.version)
            warm_s = 0.0
            full = None  # (sequence, seconds) of the full batch
            for rows, length in shapes:
                if stop is not None and stop.is_set():
                    log.debug("warm-up stopped: the server was asked to stop")
                    return
                log.debug("warm-up %s version %s: running batch %d, sequence %d",
                          m.name, m.version, rows, length)  # fmt: skip
                t0 = time.perf_counter()
                m.run(m.example(rows, length))
                run_s = time.perf_counter() - t0
                warm_s += run_s
                load.inc(run_s)
                # the last, a full batch where batches form: what a deadline must allow for
                if batcher := self._batchers.get((m.name, m.version)):  # started
                    batcher.expect_run_s(run_s)
                if rows == m.max_batch_size > 1:
                    full = (length, run_s)
                log.info(
                    "warm-up %s version %s: batch %d, sequence %d in %.0f ms",
                    m.name,
                    m.version,
                    rows,
                    length,
                    run_s * 1e3,
                )
            log.info(
                "%s version %s: loaded in %.2f s (%.2f s its bundle and session, %.2f s its "
                "warm-up)",
                m.name,
                m.version,
                m.load_s + warm_s,
                m.load_s,
                warm_s,
            )
            if full and self.cfg.dynamic_batching:
                self._queue_past_grace(m, *full)

    def _queue_past_grace(self, m: Model, length: int, batch_s: float) -> None:
        """Warn where a full queue of full batches outlasts the shutdown grace even at the
        warm-up's short rows (``length`` tokens, a batch in ``batch_s``): requests queued at a
        stop would be cut off. A lower bound: longer rows take longer still."""
        waves = -(-self.cfg.max_queue_size // self.cfg.instances)
        least = waves * batch_s
        if least <= self.cfg.shutdown_grace_s or not self.cfg.shutdown_grace_s:
            return  # (a grace of 0 asks for no drain: nothing queued is waited for)
        log.warning(
            "%s version %s: a full queue (%d requests of %d rows) is at least %.3g s of work "
            "(a batch of %d rows of sequence %d ran in %.3g ms, %d instance(s)), longer than "
            "the shutdown grace of %g s: requests queued when the server is stopped may be cut "
            "off. Lower --max-queue-size or raise --shutdown-grace (and the orchestrator's "
            "termination grace with it)",
            m.name,
            m.version,
            self.cfg.max_queue_size,
            m.max_batch_size,
            least,
            m.max_batch_size,
            length,
            batch_s * 1e3,
            self.cfg.instances,
            self.cfg.shutdown_grace_s,
        )

    def close(self, timeout: float | None = None) -> bool:
        """Stop admitting; wait until every admitted request is answered (False if
        ``timeout`` seconds passed first)."""
        self.closing.set()  # first: a request refused from here is told the server is going
        self.ready = False
        for b in self._batchers.values():  # every model stops waiting for company at once
            b.stop()
        deadline = None if timeout is None else time.monotonic() + timeout
        drained = True
        for b in self._batchers.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            drained = b.drained(left) and drained
        return drained

    @property
    def cut_off(self) -> int:
        """Admitted requests whose clients went during the drain, unanswered: gRPC cut them
        off when the shutdown grace ran out (or the clients gave up)."""
        return sum(b.cut_off for b in self._batchers.values())

    def model(self, name: str, version: str = "") -> Model:
        return self.repository.get(name, version)

    def infer(
        self,
        model: Model,
        feeds: dict[str, np.ndarray],
        outputs: tuple[str, ...] = (),
        *,
        tensors: tuple[str, ...] | None = None,
        timeout: float | None = None,
        caller: Caller | None = None,
    ) -> tuple[dict[str, np.ndarray], Timing, int]:
        """Validate, queue and run one request (blocking): its outputs, where its time
        went, and its batch size. Raises the serve errors (see servicer.py for their status
        codes); Cancelled when ``caller`` goes away first.

        ``tensors``: the outputs answered as tensors (None: every output), whose size the
        request's shapes give: a valid request whose answer would not fit
        ``--max-message-bytes`` is refused before it runs (ResponseTooLarge)."""
        if not self.ready:
            if self.closing.is_set():
                raise Unavailable(SHUTTING_DOWN, "shutting_down")
            raise Unavailable(WARMING_UP, "warming_up")
        rows = model.check(feeds, outputs)
        limit = self.cfg.max_message_bytes
        sizes = model.answer_sizes(feeds, tensors)
        if sum(sizes.values()) > limit:
            raise too_large(sum(sizes.values()), limit, sizes, at_least=True)
        batcher = self._batchers[(model.name, model.version)]
        answer, timing = batcher.infer(feeds, rows, outputs=outputs, timeout=timeout, caller=caller)
        return answer, timing, rows

    def finished(
        self,
        model: Model | None,
        code: str,
        seconds: float,
        timing: Timing | None = None,
        rows: int = 0,
        reason: str = "",
        *,
        asked: str = "",
    ) -> None:
        """Account for one answered request (success or not; ``reason``: why an UNAVAILABLE
        one was refused). One without a ``model`` is counted under the name it ``asked``
        for where the server serves a model of that name (a version it does not serve),
        else under "": a client cannot grow the label set. Its ``seconds`` go to the
        latency histogram of successes, or of failures by code, a served model's only."""
        if model is not None:
            name, version = model.name, model.version
        else:
            name, version = (asked if asked in self.repository else ""), ""
        counter = self._counters.get((name, version, code))
        if counter is None:
            counter = self._counters[(name, version, code)] = self.metrics.requests.labels(
                name, version, code
            )
        counter.inc()
        if reason:
            self.metrics.refused.labels(name, version, reason).inc()
        if model is None:
            return
        ok = code == "OK"
        self.stats[(name, version)].request_done(ok, int(seconds * 1e9), rows, timing)
        if ok:
            latency, queue = self._histograms[(name, version)]
            latency.observe(seconds)
            if timing is not None:
                queue.observe(timing.queue_ns / 1e9)
            return
        failed = self._failed.get((name, version, code))
        if failed is None:
            failed = self._failed[(name, version, code)] = self.metrics.failed_latency.labels(
                name, version, code
            )
        failed.observe(seconds)

    def _on_batch(self, m: Model):
        stats = self.stats[(m.name, m.version)]
        compute = self.metrics.compute.labels(m.name, m.version)
        sizes = self.metrics.batch_size.labels(m.name, m.version)

        def on_batch(rows: int, timing: Timing) -> None:
            stats.batch_done(rows, timing)
            compute.observe((timing.input_ns + timing.infer_ns + timing.output_ns) / 1e9)
            sizes.observe(rows)

        return on_batch
