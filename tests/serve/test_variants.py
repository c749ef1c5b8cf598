"""Variant choice per execution provider, from a bundle's gates (no sessions)."""

from __future__ import annotations

import pytest

from quantgate import bundle as qb
from quantgate.bundle import CPU, CUDA
from quantgate.errors import BundleError
from quantgate.serve.variants import choose_variant


def _variant(precision, *, passed=True, providers=(CPU,), not_for=(), speedup=None, provider=None):
    # a failed variant's speed gate passed: another gate failed it (its verdict is its gates')
    accuracy = qb.GateResult("accuracy_drop", 0.2 if passed else 3.0, 1.0, "<=", passed)
    gates = (
        (accuracy,)  # passed its gates, none of them timing it
        if speedup is None
        else (
            accuracy,
            qb.GateResult("speedup_b1_s128", speedup, 1.2, ">=", True, provider=provider),
        )
    )
    return qb.Variant(
        f"model.{precision}.onnx",
        precision,
        "0" * 64,
        providers=providers,
        gates=gates,
        verdict=qb.PASS if passed else qb.FAIL,
        not_for=not_for,
    )


def _manifest(*variants):
    return qb.Manifest("m", "sequence-classification", (), (), variants, 17, {})


def test_fastest_passing_variant_per_provider():
    m = _manifest(
        _variant("fp32"),
        _variant("int8", speedup=1.8, not_for=(CUDA,)),
        _variant("fp16", providers=(CUDA,), speedup=2.2, provider=CUDA),
    )
    assert choose_variant(m, CPU).precision == "int8"
    assert choose_variant(m, CUDA).precision == "fp16"


def test_a_variant_that_passed_its_speed_gates_beats_fp32_even_where_it_only_ties():
    """FP16 on CUDA: 2.1x at batch 128, 0.98x at a launch-bound batch 1 (its gate asks >= 0.95)."""
    gates = (
        qb.GateResult("speedup_b128_s128", 2.11, 1.2, ">=", True, provider=CUDA),
        qb.GateResult("speedup_b1_s128", 0.98, 0.95, ">=", True, provider=CUDA),
    )
    fp16 = qb.Variant(
        "model.fp16.onnx", "fp16", "0" * 64, providers=(CUDA,), gates=gates, verdict=qb.PASS
    )
    assert choose_variant(_manifest(_variant("fp32"), fp16), CUDA).precision == "fp16"


def test_a_variant_whose_gates_were_set_below_1x_is_not_served_when_slower(caplog):
    """`gate --min-speedup 0.5` passes an INT8 at 0.68x: accurate enough, but FP32 is faster,
    so FP32 is served (and FP16 measured slower on CUDA is not the CUDA default either)."""
    slow_int8 = _variant("int8", speedup=0.68, not_for=(CUDA,))
    assert choose_variant(_manifest(_variant("fp32"), slow_int8), CPU).precision == "fp32"
    said = "model 'm': int8 passed its gates but runs at 0.680x fp32 on CPUExecutionProvider"
    assert said in caplog.text  # which model: a repository's start says every model's choice
    assert "--precision int8" in caplog.text
    caplog.clear()
    choose_variant(_manifest(_variant("fp32"), slow_int8), CPU, served_as="digits")
    assert "model 'digits': int8 passed its gates but runs at 0.680x" in caplog.text
    slow_fp16 = _variant("fp16", providers=(CUDA,), speedup=0.9, provider=CUDA)
    assert choose_variant(_manifest(_variant("fp32"), slow_fp16), CUDA).precision == "fp32"
    assert (
        choose_variant(_manifest(_variant("fp32"), slow_int8), CPU, precision="int8") == slow_int8
    )


def test_failed_or_unmeasured_variants_fall_back_to_fp32(caplog):
    caplog.set_level("INFO", logger="quantgate.serve.variants")
    assert (
        choose_variant(
            _manifest(_variant("fp32"), _variant("int8", passed=False, speedup=3.0)), CPU
        ).precision
        == "fp32"
    )
    assert (
        choose_variant(_manifest(_variant("fp32"), _variant("int8")), CPU).precision == "fp32"
    )  # no evidence: the operator is told why INT8 is not served, and how to serve it
    assert (
        "model 'm': int8 passed its gates but none timed it on CPUExecutionProvider" in caplog.text
    )
    assert "Pass --precision int8 to serve it anyway" in caplog.text
    with pytest.raises(BundleError, match="failed its gates"):
        choose_variant(
            _manifest(_variant("fp32"), _variant("int8", passed=False)), CPU, precision="int8"
        )
    forced = choose_variant(
        _manifest(_variant("fp32"), _variant("int8", passed=False)),
        CPU,
        precision="int8",
        allow_failed=True,
    )
    assert forced.precision == "int8"
