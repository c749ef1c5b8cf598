"""The speed gates on real ONNX Runtime sessions: interleaved, per shape, with the machine's
conditions recorded."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import tiny_export  # noqa: E402

from quantgate import cpus  # noqa: E402
from quantgate.bundle import CPU  # noqa: E402
from quantgate.quantize.decide import GateConfig  # noqa: E402
from quantgate.quantize.speed import (  # noqa: E402
    TimingConditions,
    pair_gate,
    speed_gates,
    time_interleaved,
)

FAST = GateConfig(iterations=5, warmup=1, batch_sizes=(1, 8))


def test_time_interleaved_reverses_the_order_every_round():
    calls = []
    runners = {k: functools.partial(calls.append, k) for k in "abc"}
    ms = time_interleaved(runners, warmup=1, pairs=4)
    assert "".join(calls) == "abc" + "abccbaabccba"
    assert {k: len(v) for k, v in ms.items()} == {"a": 4, "b": 4, "c": 4}


def test_a_budget_stops_the_timing_after_an_even_number_of_rounds():
    """Stopped by its budget, a timing had 3 rounds: FP32 went first twice, the candidate
    once. Now each order as often, and at least 4 rounds."""
    calls = []
    runners = {k: functools.partial(calls.append, k) for k in "ab"}
    ms = time_interleaved(runners, warmup=0, pairs=15, budget_s=0)
    assert "".join(calls) == "abbaabba" and len(ms["a"]) == 4


def test_a_speed_gate_is_the_median_of_its_pair_ratios_not_of_its_times():
    """Timings as time_interleaved gives them: each pair's ratio, then their median, which
    decides (a slow spell in one pair moves it by one rank, not the figure)."""
    # ratios 1, 1, 2, 2, 2, 3, 3, 9: their median 2, not their mean or the slow spell's 9
    fp32 = [10, 10, 20, 20, 20, 30, 30, 90]
    candidate = [10, 10, 10, 10, 10, 10, 10, 10]
    timed = TimingConditions(threads=1, cpus=2, load=None)
    cfg = GateConfig(min_speedup=2.5, confidence=0.9)
    g = pair_gate({"fp32": fp32, "candidate": candidate}, 4, 16, cfg, warmup=2, reps=3, timed=timed)
    assert g.name == "speedup_b4_s16" and g.value == 2.0 and not g.passed  # 2.0 < 2.5
    assert g.ci is not None and g.ci[0] <= 2.0 <= g.ci[1] and g.ci[1] < 9  # not the max
    assert "FP32 median 20.00 ms, candidate 10.00 ms at batch 4 x sequence 16" in g.detail
    assert "median of 8 interleaved pair ratios after 2 warm-up runs each" in g.detail
    assert ", 3 runs per sample; timed with 1 intra-op thread" in g.detail
    # the interval's words say its own coverage, not the configured 90%: 8 pairs' x(2)..x(7)
    assert "it would hold the median 93.0% of the time" in g.detail
    # pair by pair: ratios 0.2, 2, 3, 4, 1.25 have the median 2, the times' medians 30 / 10
    paired = pair_gate(
        {"fp32": [10, 20, 30, 40, 50], "candidate": [50, 10, 10, 10, 40]}, 1, 16, cfg,
        warmup=1, reps=1, timed=timed,
    )  # fmt: skip
    assert paired.value == 2.0 and "FP32 median 30.00 ms, candidate 10.00 ms" in paired.detail


def test_speed_gate_is_interleaved_per_shape(models):
    result, int8 = models
    progress = []
    gates = speed_gates(
        result.onnx,
        int8,
        result.inputs,
        result.max_seq_len,
        FAST,
        on_progress=lambda *event: progress.append(event),
    )
    assert [g.name for g in gates] == ["speedup_b1_s64", "speedup_b8_s64"]  # digits: seq 64
    # One "timing" bar: a step per warm-up run and per timed pair, at every shape.
    # FAST's 5 pairs run as 6: FP32 first in half the rounds, the candidate in the other half
    total = 2 * (6 + FAST.warmup)
    assert [e[:3] for e in progress] == [("timing", i, total) for i in range(1, total + 1)]
    assert progress[0][3] == "timing b1 s64" and progress[-1][3] == "timing b8 s64"
    for g in gates:
        assert g.value > 0 and g.ci[0] <= g.value <= g.ci[1]
        assert g.provider == "CPUExecutionProvider" and "median of 6 interleaved" in g.detail
        assert (
            f"; timed with {TimingConditions.now(0, CPU).describe().split(', 1-minute')[0]}"
            in g.detail
        )
        assert "1-minute load average " in g.detail or "no load average" in g.detail
    impossible = speed_gates(
        result.onnx,
        int8,
        result.inputs,
        64,
        GateConfig(min_speedup=100, iterations=3, warmup=0, batch_sizes=(1,), threads=1),
    )
    assert not impossible[0].passed
    assert "after 1 warm-up run each" in impossible[0].detail  # warmup 0 still runs one
    assert "; timed with 1 intra-op thread, " in impossible[0].detail


def test_a_faster_candidate_gets_a_speedup_above_one_and_a_slower_one_below(models, tmp_path):
    """The ratio's direction: FP32's time over the candidate's. The tiny transformer against
    a model that only casts its input (tens of times faster on any machine, loaded or not),
    one way round and the other."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh

    result, _ = models
    inputs = [
        oh.make_tensor_value_info(t.name, TensorProto.INT64, list(t.dims)) for t in result.inputs
    ]
    out = oh.make_tensor_value_info("y", TensorProto.FLOAT, None)
    cast = oh.make_node("Cast", [result.inputs[0].name], ["y"], to=TensorProto.FLOAT)
    graph = oh.make_graph([cast], "cast", inputs, [out])
    trivial = tmp_path / "cast.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), trivial)
    cfg = GateConfig(min_speedup=1.0, iterations=3, warmup=1, batch_sizes=(8,))

    (faster,) = speed_gates(result.onnx, trivial, result.inputs, 64, cfg)
    (slower,) = speed_gates(trivial, result.onnx, result.inputs, 64, cfg)
    assert faster.value > 2 and faster.passed, faster.detail
    assert slower.value < 0.5 and not slower.passed, slower.detail


def test_timing_conditions_say_when_the_machine_was_busy():
    busy = TimingConditions(threads=0, cpus=2, load=3.5)
    assert busy.busy and busy.describe() == (
        "ONNX Runtime's default intra-op threads (one per physical core), 2 CPUs, 1-minute "
        "load average 3.50 before timing (above the CPU count: timed on a busy machine, may "
        "not reproduce)"
    )
    idle = TimingConditions(threads=4, cpus=8, load=0.5)
    assert not idle.busy and idle.describe() == (
        "4 intra-op threads, 8 CPUs, 1-minute load average 0.50 before timing"
    )
    assert not TimingConditions(1, 2, None).busy
    assert TimingConditions(1, 2, None).describe().endswith("no load average on this OS")
    # Measured while it was timed, what other processes took decides, not the load average
    # before (which counts this process's own work: above 2 on 2 CPUs in every run here)
    own_work = TimingConditions(threads=2, cpus=2, load=2.4, others=0.03)
    assert not own_work.busy and own_work.describe().endswith(
        "1-minute load average 2.40 before timing; other processes kept 3% of its CPUs busy "
        "while it was timed"
    )
    shared = TimingConditions(threads=2, cpus=2, load=0.2, others=0.5)
    assert shared.busy and shared.describe().endswith(
        "other processes kept 50% of its CPUs busy while it was timed (timed on a "
        "busy machine, may not reproduce)"
    )
    now = TimingConditions.now(3, CPU)
    assert now.threads == 3 and now.cpus == cpus.affinity()
    if hasattr(os, "getloadavg"):
        assert now.load is not None and now.load >= 0


def test_a_speed_gate_timed_while_other_processes_took_the_cpus_says_so():
    """A process per CPU spinning while the gate times: the detail says the machine was
    busy, measured while it was timed (the load average before timing could not tell)."""
    import subprocess
    import time

    result = tiny_export()
    # pairs enough for a window of clock ticks (/proc/stat's 10 ms): 4 pairs took 2 ms
    cfg = GateConfig(batch_sizes=(1,), iterations=400, warmup=1)
    spin = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 60: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cpus.host())]
    try:
        time.sleep(0.5)  # running before the timing starts
        (gate,) = speed_gates(result.onnx, result.onnx, result.inputs, result.max_seq_len, cfg)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert "while it was timed (timed on a busy machine, may not reproduce)" in gate.detail
    assert "were the pairs independent" in gate.detail  # its interval is this run's
