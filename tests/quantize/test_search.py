"""The recipe search on a real model with quantgate's engine: fastest passing, FP32 rounds, budget."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import tiny_export  # noqa: E402

from quantgate import cpus  # noqa: E402
from quantgate.quantize.data import ModelInfo, open_source  # noqa: E402
from quantgate.quantize.decide import GateConfig  # noqa: E402
from quantgate.quantize.report import plot_candidates, sections  # noqa: E402
from quantgate.quantize.search import QuantConfig, search  # noqa: E402

FAST = dict(iterations=3, warmup=1, batch_sizes=(1, 8), bootstrap=200)


def run(tmp_path, gate_cfg, quant_cfg, *, labels=True, on_progress=None):
    result = tiny_export()
    info = ModelInfo.from_export(result)
    cal = open_source(None, info, role="calibration", samples=64)
    ev = open_source(None, info, role="evaluation", samples=120)
    if not labels:
        ev = open_source([b.feeds for b in ev.batches()], info, role="evaluation")
    return search(
        result.onnx, cal, ev, task=result.task, inputs=result.inputs,
        max_seq_len=result.max_seq_len, workdir=tmp_path, quant_cfg=quant_cfg,
        gate_cfg=gate_cfg, unfused=result.unfused_onnx, on_progress=on_progress,
    )  # fmt: skip


def test_keeps_the_fastest_passing_candidate_not_the_first(tmp_path):
    events = []
    found = run(
        tmp_path, GateConfig(min_speedup=0.01, **FAST), QuantConfig(search_budget_s=600),
        on_progress=lambda *event: events.append(event),
    )  # fmt: skip
    # the search's last word on its bar is the candidate that ships, not the last one tried;
    # each winner timed again is a step of its own (the last candidate's time was charged
    # with it)
    said = [e for e in events if e[0] == "search"]
    assert said[-1][3] == f"done: {found.chosen.name} ships"
    n = len(found.candidates)
    again = [(c.name, n, n + 1) for c in found.retimed]  # one more step, with its time
    assert [
        (e[3].removeprefix("timing ").removesuffix(" again"), e[1], e[2])
        for e in said[-1 - len(again) : -1]
    ] == again
    assert said[-1][1:3] == (n + 1, n + 1)
    made = [c for c in found.candidates if c.path is not None]
    assert len(found.candidates) >= 3 and made
    winners = [c for c in found.candidates if c.passed]
    # the fastest winner is timed again, apart from the search, and ships if that holds;
    # the candidates keep the search's figures
    assert winners and found.retimed and found.retimed[-1] is found.chosen
    assert [c.name for c in found.retimed] == [
        c.name for c in sorted(winners, key=lambda c: -c.speedup)[: len(found.retimed)]
    ]
    assert all(not c.passed for c in found.retimed[:-1])
    assert all("timed again as a winner of the search" in g.detail for g in found.chosen.speed)
    assert not any("timed again" in g.detail for c in found.candidates for g in c.speed)
    for c in made:  # every candidate recorded with both kinds of gate
        assert c.accuracy and {g.name for g in c.speed} == {"speedup_b1_s64", "speedup_b8_s64"}
        # and the machine its speed was timed on, in its speed gates and its summary
        assert c.timing is not None
        # (each gate with what other processes took while its own shape was timed)
        before = c.timing.describe().split("; other processes")[0]
        # (kept N%, or not told where the timing was shorter than /proc/stat's clock ticks)
        assert all(f"timed with {before}; other processes" in g.detail for g in c.speed), (
            before,
            [g.detail for g in c.speed],
        )
        recorded = c.to_dict()["timing"]
        machine = {"threads": cpus.threads(), "cpus": cpus.affinity(), "quota": cpus.quota()}
        t = c.timing
        assert recorded == {**machine, "load": t.load, "others": t.others, "timed_s": t.timed_s}
        # a share, or None where the timing was shorter than /proc/stat's clock ticks tell
        assert t.timed_s > 0 and (t.others is None or 0 <= t.others <= 1)
    assert {c.method for c in found.candidates} >= {"static", "dynamic"}
    # only dynamic recipes scale activations per batch: they alone are gated on it
    for c in made:
        rows_move = "batch_top1_agreement" in {g.name for g in c.accuracy}
        assert rows_move == (c.method == "dynamic"), (c.name, c.accuracy)
    md = "\n".join(sections(found, found.best, GateConfig(), _data(), plot="c.png"))
    assert "(shipped)" in md and md.count("| `") >= len(found.candidates)
    assert plot_candidates(found, found.best, tmp_path / "c.png").stat().st_size > 1000


def test_inaccurate_candidates_keep_sensitive_nodes_fp32_and_record_the_cost(tmp_path):
    # KL 0 cannot be met: every candidate fails accuracy, so each fast one gets FP32 rounds.
    strict = GateConfig(min_speedup=0.01, max_kl=0.0, min_top1_agreement=1.0, **FAST)
    first = run(tmp_path, strict, QuantConfig(max_candidates=1), labels=False)
    name = first.candidates[0].name
    # the retry there was no room for is not scanned for, but said (the search stopped
    # short: report.md and the failure's hint say so)
    assert first.stopped == "the limit of 1 candidate(s) was reached"
    assert first.skipped[0] == f"{name} with its most sensitive nodes kept FP32", first.skipped
    found = run(
        tmp_path, strict,
        QuantConfig(recipes=(name,), max_keep_rounds=2, sensitivity_top_k=2),
        labels=False,
    )  # fmt: skip
    names = [c.name for c in found.candidates]
    assert len(found.candidates) == 3, names  # the recipe, then two rounds
    child, grandchild = found.candidates[1:]
    assert child.parent == name and len(child.kept_fp32) == 2
    assert grandchild.parent == child.name and len(grandchild.kept_fp32) == 4
    assert set(child.kept_fp32) < set(grandchild.kept_fp32)
    costs = found.node_costs()
    assert [c.node for c in costs] == [n for n, _ in (*child.added_fp32, *grandchild.added_fp32)]
    assert all(c.accuracy_gate in ("top1_agreement", "kl") for c in costs)  # what failed
    assert found.chosen is None and found.best in found.candidates


def test_a_candidate_onnx_runtime_cannot_load_fails_and_the_search_goes_on(tmp_path, monkeypatch):
    import onnx

    from quantgate.quantize import recipes

    broken, sound = "ort-dynamic-per-channel-fused", "ort-dynamic-per-channel"
    real = recipes.quantize

    def quantize(fp32, recipe, calibration, out, **kw):
        qm = real(fp32, recipe, calibration, out, **kw)
        if recipe.name == broken:  # an op no ONNX Runtime has a kernel for
            model = onnx.load(str(qm.path))
            model.graph.node[0].op_type = "NoSuchOp"
            onnx.save(model, str(qm.path))
        return qm

    monkeypatch.setattr(recipes, "quantize", quantize)
    lenient = GateConfig(min_speedup=0.01, max_accuracy_drop=100, **FAST)
    found = run(tmp_path, lenient, QuantConfig(recipes=(broken, sound)))
    bad, good = found.candidates
    assert bad.name == broken and bad.path is None and not bad.passed
    assert bad.error.startswith("the INT8 model does not run in ONNX Runtime: ")
    assert "NoSuchOp" in bad.error
    assert good.name == sound and found.chosen.name == sound and found.chosen.passed


def test_an_inaccurate_last_try_is_not_timed_once_another_passed(tmp_path, monkeypatch):
    """Its speed would serve nothing: no refinement is left to try, and another candidate
    passed (a fifth of MiniLM's export went to timing such a candidate)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from quantgate.quantize import recipes

    good, bad = "ort-dynamic-per-channel-fused", "ort-dynamic-per-channel"
    real = recipes.quantize

    def quantize(fp32, recipe, calibration, out, **kw):
        qm = real(fp32, recipe, calibration, out, **kw)
        if recipe.name == bad:  # its answers scrambled: it fails accuracy
            model = onnx.load(str(qm.path))
            for t in model.graph.initializer:
                w = numpy_helper.to_array(t)
                if w.dtype == np.float32 and w.size > 1:
                    rng = np.random.default_rng(0)
                    t.CopyFrom(
                        numpy_helper.from_array(rng.normal(0, 50, w.shape).astype(w.dtype), t.name)
                    )
            onnx.save(model, str(qm.path))
        return qm

    monkeypatch.setattr(recipes, "quantize", quantize)
    found = run(tmp_path, GateConfig(min_speedup=0.01, **FAST),
                QuantConfig(recipes=(good, bad), max_keep_rounds=0))  # fmt: skip
    passed, untimed = found.candidates
    assert (passed.name, untimed.name) == (good, bad)
    assert passed.passed and passed.speed and found.chosen.name == good
    assert not untimed.accurate and untimed.speed == () and untimed.timing is None
    md = "\n".join(sections(found, found.best, GateConfig(), _data(), plot=None))
    assert "fail (not timed: inaccurate, no refinement left to try, another passed)" in md
    # where none has passed, the inaccurate are timed: the closest ships on its speed
    alone = run(tmp_path / "alone", GateConfig(min_speedup=0.01, **FAST),
                QuantConfig(recipes=(bad,), max_keep_rounds=0))  # fmt: skip
    assert not alone.candidates[0].accurate and alone.candidates[0].speed


def test_the_budget_stops_the_search(tmp_path):
    found = run(tmp_path, GateConfig(**FAST), QuantConfig(search_budget_s=0.001))
    assert len(found.candidates) == 1  # the first always runs
    assert found.skipped


def test_the_closest_failed_candidate_is_accurate_first_then_fastest_at_its_slowest_shape():
    from quantgate.bundle import GateResult
    from quantgate.quantize.search import Candidate, SearchResult

    def candidate(name, drop, b1, b32):
        accuracy = (GateResult("accuracy_drop", drop, 1.0, "<=", drop <= 1.0),)
        speed = tuple(
            GateResult(f"speedup_b{b}_s64", v, 1.2, ">=", v >= 1.2) for b, v in ((1, b1), (32, b32))
        )
        return Candidate(name, {}, "static", Path(name), accuracy=accuracy, speed=speed)

    # Fast but inaccurate: it passes the most gates, yet no machine makes it accurate.
    inaccurate = candidate("inaccurate", 3.0, 2.0, 2.0)
    # Accurate; the higher geometric mean (1.21x), but 0.9x at batch 32: far from passing there.
    uneven = candidate("uneven", 0.0, 1.62, 0.9)
    # Accurate; 1.1x at both shapes: the slowest shape is the closest to the 1.2x gate.
    even = candidate("even", 0.0, 1.1, 1.1)
    assert uneven.speedup > even.speedup and uneven.slowest < even.slowest

    def best(*candidates):
        return SearchResult(candidates, chosen=None, seconds=1.0, budget_s=10.0).best

    assert best(inaccurate, uneven, even) is even
    assert best(inaccurate, uneven) is uneven  # accurate before fast
    slower = candidate("slower", 3.0, 1.0, 5.0)  # the higher geometric mean, the slower shape
    assert best(slower, inaccurate) is inaccurate
    # a dynamic recipe has one accuracy gate more: failing one of two, it passed as many as
    # an accurate static one, and went ahead of it by its speed
    dynamic = candidate("dynamic", 0.0, 3.0, 3.0)
    batch = GateResult("batch_top1_agreement", 0.5, 0.95, ">=", False)
    dynamic = dataclasses.replace(dynamic, accuracy=(*dynamic.accuracy, batch))
    assert best(dynamic, even) is even
    # one that did not run when timed again ranks behind every one that ran
    broke = dataclasses.replace(uneven, error="timed again, the INT8 model did not run: boom")
    assert best(broke, inaccurate) is inaccurate
    found = SearchResult((inaccurate, uneven, even), chosen=None, seconds=1.0, budget_s=10.0)
    md = "\n".join(sections(found, found.best, GateConfig(), _data(), plot=None))
    assert "`even`, the closest, went into the bundle marked failed" in md
    assert "| 2 | `even` **(in the bundle, marked failed)** |" in md and "(shipped)" not in md
    assert "then the fastest at its slowest shape" in md  # the rule, stated where it applies


def _data():
    rec = {"source": "s", "sha256": "0" * 64}
    return {"calibration": rec, "evaluation": rec}


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            dict(search_budget_s=0),
            r"search_budget_s \(--search-budget\) must be > 0 seconds, got 0",
        ),
        (
            dict(search_budget_s=float("nan")),
            r"search_budget_s \(--search-budget\) must be > 0 seconds, got nan",
        ),
        (dict(calibration_samples=0), r"calibration_samples \(--samples\) must be >= 1, got 0"),
        (dict(max_candidates=0), "max_candidates must be >= 1, got 0"),
        (dict(max_keep_rounds=-1), "max_keep_rounds must be >= 0, got -1"),
    ],
)
def test_quant_config_is_checked(bad, message):
    from quantgate.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        QuantConfig(**bad)


def test_a_full_working_directory_ends_the_search_at_once(tmp_path, monkeypatch):
    """A recipe that fails because $TMPDIR is full is not "this recipe failed, try the next":
    every one would, each after its calibration."""
    import errno

    from quantgate.errors import OutOfSpace, QuantizeError

    tried = []

    def full(src, recipe, calibration, out, **kwargs):
        tried.append(recipe.name)
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(out))
        except OSError as e:  # as recipes.quantize wraps it
            raise QuantizeError(f"recipe {recipe.name!r} failed: {e}") from e

    monkeypatch.setattr("quantgate.quantize.recipes.quantize", full)
    with pytest.raises(OutOfSpace) as err:
        run(tmp_path, GateConfig(**FAST), QuantConfig())
    assert len(tried) == 1
    assert (
        f"INT8 recipe {tried[0]} failed: the filesystem that holds its working directory "
        f"{tmp_path} is full" in str(err.value)
    )


def test_a_winner_that_does_not_run_when_timed_again_fails_its_speed_gates(tmp_path, monkeypatch):
    """ONNX Runtime failing on the winner's second timing kept its search's passing speed
    gates: shipped as the closest to passing, its variant said pass (exit 0) while the
    report said it failed."""
    from quantgate.quantize import search as search_module

    real, timed = search_module._Work.timed, set()

    def broken(self, path, on_timing):
        if path in timed:  # its second timing, as the search's winner
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")
        timed.add(path)
        return real(self, path, on_timing)

    monkeypatch.setattr(search_module._Work, "timed", broken)
    found = run(tmp_path, GateConfig(min_speedup=0.01, **FAST),
                QuantConfig(recipes=("static-u8s8",), max_candidates=1))  # fmt: skip
    assert found.chosen is None and found.retimed and not found.best.passed
    shipped = found.best
    assert shipped.speed and not any(g.passed for g in shipped.speed), shipped.speed
    assert "timed again, the INT8 model did not run: [ONNXRuntimeError]" in shipped.speed[0].detail


def test_winners_that_do_not_hold_when_timed_again_ship_nothing(tmp_path, monkeypatch):
    """Passed in the search, not when timed again: the speed sits at the threshold. At most
    CONFIRMATIONS winners are timed again; the bundle gets the closest as timed again,
    marked failed, and the report says what happened."""
    from dataclasses import replace

    from quantgate.quantize import search as search_module

    def slower(work, cand):  # the second timing: just under the threshold
        speed = tuple(replace(g, value=0.005, passed=False) for g in cand.speed)
        return replace(cand, speed=speed)

    monkeypatch.setattr(search_module, "_confirm", slower)
    found = run(tmp_path, GateConfig(min_speedup=0.01, **FAST), QuantConfig(search_budget_s=600))
    winners = [c for c in found.candidates if c.passed]
    assert found.chosen is None and len(winners) > search_module.CONFIRMATIONS
    assert len(found.retimed) == search_module.CONFIRMATIONS
    assert found.best.name in {c.name for c in found.retimed} and not found.best.passed
    md = "\n".join(sections(found, found.best, GateConfig(), _data(), plot=None))
    assert (
        f"{search_module.CONFIRMATIONS} candidate(s) passed every gate in the search, none "
        "when timed again" in md
    )
    assert "did not hold" in md


def test_a_second_winner_that_ships_is_not_called_the_fastest():
    """The fastest winner did not hold when timed again, the second did and ships: the
    report called it the fastest of the winners."""
    from quantgate.bundle import GateResult
    from quantgate.quantize.search import Candidate, SearchResult

    def candidate(name, speedup):
        accuracy = (GateResult("accuracy_drop", 0.0, 1.0, "<=", True),)
        speed = (GateResult("speedup_b1_s64", speedup, 1.2, ">=", speedup >= 1.2),)
        return Candidate(name, {}, "static", Path(name), accuracy=accuracy, speed=speed)

    fast, second = candidate("fast", 1.5), candidate("second", 1.4)
    fell = dataclasses.replace(fast, speed=candidate("fast", 1.1).speed)  # timed again
    found = SearchResult(
        (fast, second), chosen=second, seconds=1.0, budget_s=10.0, retimed=(fell, second)
    )
    md = " ".join("\n".join(sections(found, found.best, GateConfig(), _data(), plot=None)).split())
    assert (
        "Shipped `second`, the fastest of the 2 candidate(s) that passed every gate whose speed "
        "held when timed again (1 faster did not hold)." in md
    ), md
