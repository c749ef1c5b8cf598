"""The speed gates: is a candidate really faster than FP32 where it will run?

Candidate vs FP32 on the target execution provider at each served shape, after warm-up,
timed interleaved (A B, then B A, ...: ``time_interleaved``, which the CUDA gates and the
benchmarks use too) so load changes hit both alike. The value is the median of the per-pair
ratios t(FP32) / t(candidate), with the order-statistic interval of that median
(``stats.median_interval``), decided by the median.

Each gate's detail records the conditions it was timed under (``TimingConditions``),
among them the share of the machine other processes kept busy meanwhile: a figure from a
busy machine need not reproduce. Its interval is this run's: the rounds of one run share
the machine's state (its clocks, its other load), so another run can land outside it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantgate import cpus
from quantgate.bundle import CPU, GateResult, TensorSpec, speed_gate_name
from quantgate.cpus import CpuTime
from quantgate.progress import ProgressFn, no_progress
from quantgate.quantize.decide import GateConfig, decide
from quantgate.quantize.stats import median_coverage, median_interval
from quantgate.sessions import session

MIN_SAMPLE_S = 0.03  # shortest timed sample; faster runs are repeated within one


# What a speed gate's detail says where the machine was busy when it was timed
BUSY = "timed on a busy machine, may not reproduce"
# Other processes keeping more than this share of its CPUs busy while a timing
# ran make it busy: on 2 CPUs, one other process at full tilt (0.5) is; a shell's blips not
OTHERS_BUSY = 0.25


@dataclass(frozen=True)
class TimingConditions:
    """The machine as a speed gate found it, recorded beside the figure: the same two
    models timed on a loaded machine give another speedup."""

    threads: int  # ONNX Runtime intra-op threads the sessions get; 0: its default
    cpus: int  # logical CPUs this process may use (what its load average is counted against)
    load: float | None  # 1-minute load average before timing; None where the OS keeps none
    quota: float | None = None  # a container's CPU quota, in CPUs, where one is set
    # the share of its CPUs other processes kept busy while it was timed
    # (``cpus.CpuTime``); None: not measured (before timing, no /proc/stat, or a timing too
    # short for its clock ticks)
    others: float | None = None
    # how long the timing ran, where /proc/stat was read: where ``others`` is None, why
    timed_s: float | None = None

    @classmethod
    def now(cls, threads: int, provider: str) -> TimingConditions:
        """The conditions for sessions on ``provider`` asked for ``threads`` (0:
        quantgate.cpus decides)."""
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = None
        chosen = cpus.threads(threads, gpu=provider != CPU)
        return cls(chosen, cpus.affinity(), load, cpus.quota())

    @property
    def busy(self) -> bool:
        """Other processes kept more than ``OTHERS_BUSY`` of its CPUs busy while it
        was timed. Where the OS does not say (no /proc/stat), the load average before timing
        was above the CPU count (which counts this process's own work too, and so says
        less); where the timing was too short for its clock ticks, not busy: not told."""
        if self.others is not None:
            return self.others > OTHERS_BUSY
        if self.timed_s is not None:  # /proc/stat read, over too short a timing: not told
            return False  # (the load average, which counts our own work, says less still)
        return self.load is not None and self.load > self.cpus

    def measured(self, start: CpuTime) -> TimingConditions:
        """These conditions with what other processes took of the machine since ``start``."""
        now = CpuTime.now()
        # how long, where the ticks were read: what "not told" then means
        told = now.busy is not None and start.busy is not None
        timed_s = round(now.wall - start.wall, 4) if told else None
        return dataclasses.replace(self, others=now.others_since(start), timed_s=timed_s)

    def describe(self) -> str:
        threads = (
            f"{self.threads} intra-op thread{'s' if self.threads > 1 else ''}"
            if self.threads
            else "ONNX Runtime's default intra-op threads (one per physical core)"
        )
        if self.load is None:
            load = "no load average on this OS"
        else:
            # It counts this process's own recent work too (evaluation, an earlier candidate's
            # timing), over when the timing starts; above the CPU count, more threads wanted
            # to run than there were CPUs, whoever's they were.
            load = f"1-minute load average {self.load:.2f} before timing"
            if self.busy and self.others is None:
                load += f" (above the CPU count: {BUSY})"
        if self.others is not None:
            load += (
                f"; other processes kept {self.others:.0%} of its CPUs busy while "
                "it was timed" + (f" ({BUSY})" if self.busy else "")
            )
        elif self.timed_s is not None:  # measured, over too short a time to tell
            load += (
                f"; other processes: not told over {self.timed_s * 1e3:.0f} ms of timing "
                "(under /proc/stat's clock ticks)"
            )
        share = f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}" + (
            f" (a CPU quota of {self.quota:g})" if self.quota else ""
        )
        return f"{threads}, {share}, {load}"


def speed_shapes(inputs: Sequence[TensorSpec], max_seq_len: int, cfg: GateConfig):
    """(batch, sequence) pairs to time: cfg's batches at cfg.seq_len, capped by the model."""
    fixed = next(
        (t.dims[1] for t in inputs if len(t.dims) >= 2 and isinstance(t.dims[1], int)), None
    )
    seq = fixed or min(cfg.seq_len, max_seq_len or cfg.seq_len)
    return [(b, seq) for b in cfg.batch_sizes]


def speed_feeds(
    inputs: Sequence[TensorSpec], batch: int, seq: int, sample: dict[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """Feeds of shape (batch, seq): real tokens from ``sample`` tiled to length, all attended."""
    feeds = {}
    for t in inputs:
        shape = (batch, seq, *[d for d in t.dims[2:] if isinstance(d, int)])
        if t.name == "attention_mask":
            feeds[t.name] = np.ones(shape, dtype=t.dtype)
        elif sample is not None and t.name in sample and sample[t.name].ndim == 2:
            row = sample[t.name][0]
            mask = sample.get("attention_mask")
            real = row[: int(mask[0].sum())] if mask is not None else row
            tiled = np.resize(real if len(real) else row, seq)  # repeat the real tokens
            feeds[t.name] = np.broadcast_to(tiled, shape).astype(t.dtype).copy()
        else:
            feeds[t.name] = np.zeros(shape, dtype=t.dtype)
    return feeds


def time_interleaved(
    runners: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    pairs: int,
    budget_s: float = math.inf,
    reps: int = 1,
    on_pair: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Milliseconds per run of each runner, taken in turn after ``warmup`` runs each, the
    order reversed every round (A B C, C B A, ...) so that drift hits every runner alike.

    Stops after ``pairs`` rounds, or once ``budget_s`` is spent after an even number of
    them, at least 4 (each order as often: a round count left odd had FP32 first once more
    than the candidate); a sample is the mean of ``reps`` back-to-back runs.
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners.items())
    end = time.perf_counter() + budget_s
    for i in range(pairs):
        for k, fn in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            times[k].append((time.perf_counter() - t0) / reps * 1e3)
        if on_pair is not None:
            on_pair()
        if i >= 3 and i % 2 == 1 and time.perf_counter() > end:
            break
    return times


def speed_gates(
    fp32: str | Path,
    candidate: str | Path,
    inputs: Sequence[TensorSpec],
    max_seq_len: int,
    cfg: GateConfig,
    *,
    sample: dict[str, np.ndarray] | None = None,
    on_progress: ProgressFn | None = None,
    conditions: TimingConditions | None = None,
) -> list[GateResult]:
    """One ``speedup_b{B}_s{T}`` gate per shape: median of interleaved per-pair ratios.

    Each gate's detail records ``conditions``, the machine before timing (taken here when
    None). Progress is the "timing" task: a step per warm-up run and per timed pair.
    """
    conditions = conditions or TimingConditions.now(cfg.threads, cfg.provider)
    a = session(fp32, cfg.provider, threads=cfg.threads, spin=False)
    b = session(candidate, cfg.provider, threads=cfg.threads, spin=False)
    shapes = speed_shapes(inputs, max_seq_len, cfg)
    # even: FP32 runs first in as many rounds as the candidate, so that an effect of going
    # first (caches, clocks) cancels in the median
    pairs = cfg.iterations + cfg.iterations % 2
    total = len(shapes) * (pairs + max(cfg.warmup, 1))
    done = itertools.count(1)
    emit = on_progress or no_progress

    def tick(what: str) -> None:
        emit("timing", next(done), total, what)

    gates = []
    for batch, seq in shapes:
        what = f"timing b{batch} s{seq}"
        feeds = speed_feeds(inputs, batch, seq, sample)
        runners = {
            "fp32": functools.partial(a.run, None, feeds),
            "candidate": functools.partial(b.run, None, feeds),
        }
        fastest = dict.fromkeys(runners, math.inf)
        warmup = max(cfg.warmup, 1)  # one at least: it measures how many runs a sample holds
        for _ in range(warmup):
            for k, fn in runners.items():
                t0 = time.perf_counter()
                fn()
                fastest[k] = min(fastest[k], time.perf_counter() - t0)
            tick(what)
        # Fast runs are repeated so that one sample spans >= MIN_SAMPLE_S: timer and
        # scheduler noise then stays small next to the work.
        reps = max(1, min(100, int(MIN_SAMPLE_S / max(*fastest.values(), 1e-6))))
        start = CpuTime.now()
        ms = time_interleaved(
            runners,
            warmup=0,
            pairs=pairs,
            reps=reps,
            on_pair=functools.partial(tick, what),
        )
        timed = conditions.measured(start)  # what others took of the machine meanwhile
        gates.append(pair_gate(ms, batch, seq, cfg, warmup=warmup, reps=reps, timed=timed))
    return gates


def pair_gate(
    ms: Mapping[str, Sequence[float]],
    batch: int,
    seq: int,
    cfg: GateConfig,
    *,
    warmup: int,
    reps: int,
    timed: TimingConditions,
) -> GateResult:
    """The ``speedup_b{batch}_s{seq}`` gate of interleaved timings ``ms`` (milliseconds per
    run, ``"fp32"`` and ``"candidate"``, pair by pair): the median of the per-pair ratios,
    with its order-statistic interval, decided by the median."""
    ratios = np.array(ms["fp32"]) / np.array(ms["candidate"])
    median = float(np.median(ratios))
    ci = median_interval(ratios, cfg.confidence)
    coverage = median_coverage(len(ratios), cfg.confidence)
    passed, rule = decide(median, ci, cfg.min_speedup, ">=", rule="point", confidence=coverage)
    return GateResult(
        name=speed_gate_name(batch, seq),
        value=median,
        threshold=cfg.min_speedup,
        op=">=",
        passed=passed,
        ci=ci,
        provider=cfg.provider,
        detail=(
            f"FP32 median {np.median(ms['fp32']):.2f} ms, "
            f"candidate {np.median(ms['candidate']):.2f} ms "
            f"at batch {batch} x sequence {seq}; median of {len(ratios)} interleaved "
            f"pair ratios after {warmup} warm-up run{'s' if warmup > 1 else ''} each, "
            f"with its order-statistic interval (it would hold the median "
            f"{coverage:.1%} of the time were the "
            "pairs independent; they share this run's machine, and another run can "
            "land outside it)"
            + (f", {reps} runs per sample" if reps > 1 else "")
            + f"; timed with {timed.describe()}"
            + rule
        ),
    )


__all__ = [
    "TimingConditions",
    "pair_gate",
    "speed_feeds",
    "speed_gates",
    "speed_shapes",
    "time_interleaved",
]
