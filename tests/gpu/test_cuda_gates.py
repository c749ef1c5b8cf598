"""Gates on the CUDA provider (quantize/cuda.py), exercised on the CPU provider here."""

from __future__ import annotations

import functools

import pytest

from quantgate import placement
from quantgate.bundle import GateResult
from quantgate.export import ExtraVariant
from quantgate.placement import PlacementReport
from quantgate.quantize import cuda, fp16
from quantgate.quantize.decide import GateConfig

CFG = cuda.CudaGateConfig(throughput=(4, 16), latency=(1, 16), pairs=5, budget_s=0.5)


def timing(throughput: float, latency: float) -> list[cuda.CudaTiming]:
    def one(shape, x):
        return cuda.CudaTiming(shape, {"fp32": 2.0, "fp16": 2.0 / x}, {"fp32": 1.0, "fp16": x}, 9)

    return [one(CFG.throughput, throughput), one(CFG.latency, latency)]


def test_gate_variants_times_every_variant_at_both_shapes(tiny_bert_export, tmp_path):
    f16 = fp16.save(fp16.to_fp16(tiny_bert_export.onnx), tmp_path / "fp16.onnx")
    gates, timings, where = cuda.gate_variants(
        tiny_bert_export.onnx, {"fp16": f16}, tiny_bert_export.inputs, CFG, provider=cuda.CPU
    )
    assert [t.shape for t in timings] == [(4, 16), (1, 16)]
    for t in timings:
        assert set(t.ms) == {"fp32", "fp16"} and t.pairs >= 3
        assert t.speedup["fp32"] == 1.0 and t.speedup["fp16"] > 0
    g = {x.name: x for x in gates["fp16"]}
    assert set(g) == {"speedup_b4_s16", "speedup_b1_s16", "placement"}
    assert g["speedup_b4_s16"].threshold == 1.2 and g["speedup_b1_s16"].threshold == 0.95
    assert all(x.provider == cuda.CPU for x in g.values())
    assert g["placement"].passed and set(where) == {"fp32", "fp16"}
    assert all(r.memcpy == 0 for r in where.values())
    for t, name in zip(timings, ("speedup_b4_s16", "speedup_b1_s16"), strict=True):
        # an interval over its own pairs, as the CPU's speed gates have, and the FP32 time
        # of those pairs (the FP32 median over every variant's pairs had the detail say
        # FP16 was faster while its ratio said slower)
        gate, ratios = g[name], t.ratios["fp16"]
        assert len(ratios) == t.pairs and gate.value == t.speedup["fp16"]
        assert gate.ci is not None and gate.ci[0] <= gate.value <= gate.ci[1], gate
        assert f"FP32 {t.fp32_ms['fp16']:.2f} ms, fp16 {t.ms['fp16']:.2f} ms" in gate.detail
        assert f"median of {len(ratios)} pair ratios" in gate.detail


def test_latency_shape_asks_only_for_no_slowdown():
    ok = cuda.gates("fp16", timing(2.08, 1.03), CFG)  # what an H200 measured for MiniLM
    assert all(g.passed for g in ok)
    slow = {g.name: g.passed for g in cuda.gates("fp16", timing(2.0, 0.90), CFG)}
    assert slow == {"speedup_b4_s16": True, "speedup_b1_s16": False}
    weak = {g.name: g.passed for g in cuda.gates("fp16", timing(1.1, 1.0), CFG)}
    assert weak == {"speedup_b4_s16": False, "speedup_b1_s16": True}


def test_a_variant_that_falls_back_fails_every_speed_gate_whatever_it_measured():
    fell = PlacementReport(
        provider=cuda.CUDA,
        providers=(cuda.CUDA, cuda.CPU),
        nodes=40,
        memcpy=6,
        to_host=3,
        from_host=3,
        fallen_back={"MatMulInteger": 3},
    )
    clean = PlacementReport(cuda.CUDA, (cuda.CUDA, cuda.CPU), 30, 0, 0, 0)
    gates = cuda.gates("fp16", timing(3.0, 1.5), CFG, report=fell, baseline=clean)
    assert not any(g.passed for g in gates)
    assert all("MatMulInteger x3" in g.detail for g in gates)


def test_a_variant_that_falls_back_is_said_to_fall_back_and_not_to_be_slow_where_it_is_not(
    tmp_path,
):
    """The placement gate fails every speed gate of a variant that falls back: the note
    that marks it not for CUDA says it falls back, and lists as slow only what was slow
    (it read "speedup 1.25 (needs >= 1.2); placement 0.00 (needs <= 0)")."""
    fell = PlacementReport(cuda.CUDA, (cuda.CUDA, cuda.CPU), 40, 0, 0, 0, {"MatMulInteger": 3})
    clean = PlacementReport(cuda.CUDA, (cuda.CUDA, cuda.CPU), 30, 0, 0, 0)
    int8 = ExtraVariant(tmp_path / "m.onnx", "int8", providers=(cuda.CPU,))
    fast = cuda.gates("int8", _int8_timing(3.0, 1.5), CFG, report=fell, baseline=clean)
    where = {g.name: g for g in fast}["placement"]
    assert where.detail.endswith("; FP32 has 0 memcpy and no MatMulInteger on the CPU")
    note = cuda.apply_gates(int8, fast).notes
    assert note.startswith("not for CUDA: falls back to the CPU (") and "MatMulInteger x3" in note
    assert "speedup" not in note and "placement 0.00" not in note
    slow = cuda.apply_gates(
        int8, cuda.gates("int8", _int8_timing(0.5, 1.5), CFG, report=fell, baseline=clean)
    )
    assert "MatMulInteger on the CPU); speedup_b4_s16 0.50 (needs >= 1.2)" in slow.notes
    assert "speedup_b1_s16" not in slow.notes


def _int8_timing(throughput: float, latency: float) -> list[cuda.CudaTiming]:
    return [
        cuda.CudaTiming(
            t.shape,
            {"fp32": 2.0, "int8": t.ms["fp16"]},
            {"fp32": 1.0, "int8": t.speedup["fp16"]},
            9,
        )
        for t in timing(throughput, latency)
    ]


def test_a_variant_that_falls_back_is_timed_with_the_cpus_threads_for_its_cpu_nodes(
    tiny_bert_export, tmp_path, monkeypatch
):
    """A CUDA session gets one CPU thread; dynamic INT8's CPU nodes on one thread made its
    timing many times the seconds of the one H200 run (291 ms at batch 128 on 16 cores)."""
    from quantgate import cpus

    f16 = fp16.save(fp16.to_fp16(tiny_bert_export.onnx), tmp_path / "fp16.onnx")
    fell = PlacementReport(cuda.CPU, (cuda.CPU,), 40, 0, 0, 0, {"MatMulInteger": 3})
    clean = PlacementReport(cuda.CPU, (cuda.CPU,), 30, 0, 0, 0)
    monkeypatch.setattr(
        placement, "check", lambda path, provider, precision: fell if precision == "fp16" else clean
    )
    opened = {}

    def spy(path, provider, **kw):
        opened[kw["precision"]] = kw["threads"]
        return real(path, provider, **kw)

    real = cuda.session
    monkeypatch.setattr(cuda, "session", spy)
    gates, _, _ = cuda.gate_variants(
        tiny_bert_export.onnx, {"fp16": f16}, tiny_bert_export.inputs, CFG, provider=cuda.CPU
    )
    assert opened == {"fp32": 0, "fp16": cpus.threads() or cpus.physical()}
    assert not {g.name: g for g in gates["fp16"]}["placement"].passed


def _gate(name: str, passed: bool) -> GateResult:
    return GateResult(name, 0.5 if not passed else 2.0, 1.2, ">=", passed, provider=cuda.CUDA)


@pytest.mark.parametrize("passed", [True, False])
def test_int8_is_marked_not_for_cuda_when_slower_there_and_still_ships_on_cpu(passed, tmp_path):
    cpu_gate = GateResult("cosine", 0.999, 0.99, ">=", True)
    int8 = ExtraVariant(
        tmp_path / "m.onnx", "int8", gates=(cpu_gate,), providers=(cuda.CPU,), not_for=(cuda.CUDA,)
    )
    out = cuda.apply_gates(int8, (_gate("speedup_b128_s128", passed), _gate("placement", True)))
    assert out.verdict == "pass"  # its CPU evidence decides whether it ships
    if passed:
        assert cuda.CUDA in out.providers and cuda.CUDA not in out.not_for
        assert len(out.gates) == 3
    else:
        assert cuda.CUDA in out.not_for and out.gates == (cpu_gate,)
        assert "not for CUDA: speedup_b128_s128 0.50 (needs >= 1.2)" in out.notes


def test_fp16_ships_on_cuda_only_when_its_cuda_gates_pass(tmp_path):
    f16 = ExtraVariant(
        tmp_path / "m.onnx", "fp16", gates=(GateResult("cosine", 1.0, 0.999, ">=", True),)
    )
    assert cuda.apply_gates(f16, (_gate("speedup_b1_s128", True),)).verdict == "pass"
    assert cuda.apply_gates(f16, (_gate("speedup_b1_s128", False),)).verdict == "fail"


def test_the_pipeline_gates_fp16_fidelity_and_speed_on_the_gating_provider(
    tiny_bert_export, feeds, tmp_path, monkeypatch
):
    """``cuda.gate_built`` run on the CPU provider: FP16's fidelity is measured again there."""
    from quantgate.quantize.cuda import gate_built
    from quantgate.quantize.search import QuantConfig

    quick = functools.partial(cuda.CudaGateConfig, warmup=1, pairs=3, budget_s=0.1)
    monkeypatch.setattr(cuda, "CudaGateConfig", quick)  # batch 128 on the CPU: a few runs
    f16 = fp16.save(fp16.to_fp16(tiny_bert_export.onnx), tmp_path / "fp16.onnx")
    # as the build records FP16's accuracy on the CPU: no provider (the CPU standing in for
    # CUDA below replaces the gates it measured before, so it must not be named here)
    built = GateResult("cosine:last_hidden_state", 1.0, 0.999, ">=", True)
    half = ExtraVariant(f16, "fp16", gates=(built,), providers=(cuda.CUDA,))
    (out,), section = gate_built(
        tiny_bert_export,
        [half],
        lambda: iter(feeds),
        QuantConfig(),
        lambda *a: None,
        provider=cuda.CPU,
    )
    added = {g.name: g for g in out.gates[1:]}
    cosines = {f"cosine:{o.name}" for o in tiny_bert_export.outputs}
    tails = {f"cosine_tail:{o.name}" for o in tiny_bert_export.outputs}
    assert cosines | tails | {"speedup_b128_s128", "speedup_b1_s128", "placement"} == set(added)
    assert all(g.provider == cuda.CPU for g in added.values())
    assert all(added[c].threshold == 0.999 and added[c].passed for c in cosines)
    assert "## On the CUDA execution provider" in section[0]
    assert "FP16 must be 1.2x FP32 at the throughput shape and at least 0.95x" in section[0]


def test_the_cuda_throughput_gate_asks_the_gates_min_speedup(
    tiny_bert_export, feeds, tmp_path, monkeypatch
):
    """--min-speedup reaches the CUDA gates (the throughput gate stayed at 1.2 whatever the
    flag said); batch 1 keeps its "not slower"."""
    from quantgate.quantize.cuda import gate_built
    from quantgate.quantize.decide import GateConfig
    from quantgate.quantize.search import QuantConfig

    quick = functools.partial(cuda.CudaGateConfig, warmup=1, pairs=3, budget_s=0.1)
    monkeypatch.setattr(cuda, "CudaGateConfig", quick)
    f16 = fp16.save(fp16.to_fp16(tiny_bert_export.onnx), tmp_path / "fp16.onnx")
    half = ExtraVariant(f16, "fp16", providers=(cuda.CUDA,))
    (out,), section = gate_built(
        tiny_bert_export, [half], lambda: iter(feeds), QuantConfig(), lambda *a: None,
        gate_cfg=GateConfig(min_speedup=7.5), provider=cuda.CPU,
    )  # fmt: skip
    gates = {g.name: g for g in out.gates}
    assert gates["speedup_b128_s128"].threshold == 7.5
    assert gates["speedup_b1_s128"].threshold == 0.95
    assert out.verdict == "fail"  # FP16 on a CPU is not 7.5x FP32
    assert "FP16 must be 7.5x FP32 at the throughput shape" in section[0]


def _dynamic_int8(fp32, out):
    """ORT's dynamic INT8 of ``fp32`` (the variant that falls back to the CPU on CUDA)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32),
        str(out),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return out


def test_an_int8_fast_enough_for_cuda_has_its_fidelity_measured_there(
    tiny_bert_export, feeds, tmp_path, monkeypatch
):
    """The branch where INT8's speed and placement gates pass on the gating provider (on a
    GPU it rarely does): its fidelity must be measured there before CUDA joins its providers.
    The timing is replaced by passing gates; the fidelity runs for real, on the CPU."""
    from quantgate.quantize.cuda import gate_built
    from quantgate.quantize.search import QuantConfig

    i8 = _dynamic_int8(tiny_bert_export.onnx, tmp_path / "int8.onnx")
    fast = GateResult("speedup_b128_s128", 1.5, 1.2, ">=", True, provider=cuda.CPU)

    def timed_as_fast(fp32, files, inputs, timing, *, provider):
        where = {
            k: placement.check(f, provider, precision=k) for k, f in {"fp32": fp32, **files}.items()
        }
        return {k: (fast,) for k in files}, [], where

    monkeypatch.setattr(cuda, "gate_variants", timed_as_fast)
    int8 = ExtraVariant(i8, "int8", gates=(), providers=(cuda.CPU,), not_for=(cuda.CUDA,))

    def gate(threshold: float):
        (out,), _ = gate_built(
            tiny_bert_export,
            [int8],
            lambda: iter(feeds),
            QuantConfig(),
            lambda *a: None,
            gate_cfg=GateConfig(min_cosine=threshold),
            provider=cuda.CPU,
        )
        return out

    accurate = gate(0.5)
    cosines = [g for g in accurate.gates if g.name.startswith("cosine:")]
    assert cosines and all(g.threshold == 0.5 and g.passed for g in cosines)
    assert cuda.CUDA in accurate.providers and cuda.CUDA not in accurate.not_for
    inaccurate = gate(1.0)  # only an exact copy reaches 1: fast, but not accurate enough there
    assert cuda.CUDA not in inaccurate.providers and cuda.CUDA in inaccurate.not_for
    assert "cosine:" in inaccurate.notes, inaccurate.notes


def test_available_is_false_without_a_cuda_provider():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    assert cuda.available() is False


@pytest.mark.skipif(not cuda.available(), reason="needs a CUDA GPU and onnxruntime-gpu")
def test_on_a_gpu_the_pipeline_gates_fp16_and_int8_on_cuda(tiny_bert_export, feeds, tmp_path):
    from quantgate.quantize.cuda import gate_built
    from quantgate.quantize.search import QuantConfig

    f16 = fp16.save(fp16.to_fp16(tiny_bert_export.onnx), tmp_path / "fp16.onnx")
    i8 = _dynamic_int8(tiny_bert_export.onnx, tmp_path / "int8.onnx")
    ok = (GateResult("cosine", 1.0, 0.99, ">=", True),)
    variants = [
        ExtraVariant(i8, "int8", gates=ok, not_for=(cuda.CUDA,)),
        ExtraVariant(f16, "fp16", gates=ok, providers=(cuda.CUDA,)),
    ]
    out, section = gate_built(
        tiny_bert_export, variants, lambda: iter(feeds), QuantConfig(), lambda *a: None
    )
    int8, half = out
    assert "## On the CUDA execution provider" in section[0]
    assert {g.name for g in half.gates} >= {"speedup_b128_s128", "placement"}
    on_cuda = [g for g in half.gates if g.name.startswith("cosine:")]
    assert on_cuda and all(g.provider == cuda.CUDA and g.passed for g in on_cuda)
    # dynamic INT8 has no CUDA kernels: it falls back and is kept off CUDA
    assert cuda.CUDA in int8.not_for and "not for CUDA" in int8.notes


def test_a_second_cuda_gating_replaces_the_first_and_keeps_the_cpus(tmp_path):
    """A re-gate on CUDA replaces the gates measured there and nothing else: INT8's accuracy
    gates (measured on the CPU, provider None) and CPU speed gates (provider CPU) stay, and
    its providers, not_for and notes end as if CUDA had been gated only once."""
    accuracy = GateResult("cosine", 0.998, 0.99, ">=", True)
    cpu_speed = GateResult("speedup_b1_s128", 1.6, 1.2, ">=", True, provider=cuda.CPU)
    built = ExtraVariant(
        tmp_path / "m.onnx", "int8", gates=(accuracy, cpu_speed), providers=(cuda.CPU,),
        not_for=(cuda.CUDA,), notes="recipe smooth-static-u8s8",
    )  # fmt: skip
    for first, second in [(True, False), (False, True), (False, False), (True, True)]:
        once = cuda.apply_gates(built, (_gate("speedup_b128_s128", first),))
        again = cuda.apply_gates(once, (_gate("speedup_b128_s128", second),))
        assert again == cuda.apply_gates(built, (_gate("speedup_b128_s128", second),))
        assert again.gates[:2] == (accuracy, cpu_speed)
        assert (cuda.CUDA in again.providers) is second
        assert (cuda.CUDA in again.not_for) is not second
        assert again.notes.count("not for CUDA") == (0 if second else 1)
        assert again.notes.startswith("recipe smooth-static-u8s8")
    f16 = ExtraVariant(tmp_path / "h.onnx", "fp16", gates=(accuracy,), providers=(cuda.CUDA,))
    gated = cuda.apply_gates(f16, (_gate("speedup_b128_s128", False),))
    fast = (_gate("speedup_b128_s128", True),)
    assert cuda.apply_gates(gated, fast) == cuda.apply_gates(f16, fast)


def test_a_cuda_speed_gates_interval_is_at_the_gates_confidence():
    """The pairs' order-statistic interval, at the confidence the gates are configured with
    (it was 95% whatever they said): a wider one at 99%."""
    import dataclasses

    ratios = tuple(1.0 + 0.01 * i for i in range(-10, 11))  # 21 pairs around 1.0
    t = cuda.CudaTiming(
        CFG.latency, {"fp32": 2.0, "fp16": 2.0}, {"fp32": 1.0, "fp16": 1.0}, 21,
        ratios={"fp16": ratios}, fp32_ms={"fp16": 2.0},
    )  # fmt: skip
    (at95,) = cuda.gates("fp16", [t], CFG)
    (at99,) = cuda.gates("fp16", [t], dataclasses.replace(CFG, confidence=0.99))
    assert at95.ci is not None and at99.ci is not None
    assert at99.ci[0] < at95.ci[0] <= 1.0 <= at95.ci[1] < at99.ci[1]
