"""A re-gate on CUDA (``quantgate gate`` with provider CUDA) follows the build's rule: every
variant's CUDA gates are measured again, FP16's decide whether it ships, INT8's only where it
runs; the gates measured on the CPU are kept. Run here on the CPU provider standing in for
CUDA: the fidelity and placement are measured for real, the timing is given (a CPU cannot say
what a GPU would time)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from quantgate import placement
from quantgate.bundle import CPU, CUDA, GateResult, load
from quantgate.errors import ConfigError, GateFailed
from quantgate.export import ExtraVariant, write_bundle
from quantgate.quantize import cuda, fp16, regating
from quantgate.quantize.data import write_npz
from quantgate.quantize.decide import GateConfig

from .conftest import ids_feed

BUILD_CUDA = "## On the CUDA execution provider\n\nAs a GPU host's build timed them."


def timed(speedup: dict[str, float]):
    """``cuda.gate_variants`` with the placement checked for real on the provider asked for
    and the timing given: each variant ``speedup[precision]`` x FP32 at both shapes (batch
    128 and 1, at sequence 128 capped at the model's longest)."""

    def gate_variants(fp32, files, inputs, cfg, *, provider):
        where = {
            k: placement.check(f, provider, precision=k) for k, f in {"fp32": fp32, **files}.items()
        }
        timings = [
            cuda.CudaTiming(
                shape,
                {"fp32": 2.0, **{k: 2.0 / speedup[k] for k in files}},
                {"fp32": 1.0, **{k: speedup[k] for k in files}},
                pairs=9,
            )
            for shape in (cfg.throughput, cfg.latency)
        ]
        gates = {
            k: cuda.gates(
                k, timings, cfg, report=where[k], baseline=where["fp32"], provider=provider
            )
            for k in files
        }
        return gates, timings, where

    return gate_variants


@pytest.fixture
def built_on_a_gpu_host(tiny_bert_export, tmp_path):
    """A bundle as a GPU host's build leaves it when INT8 was fast enough on CUDA: FP16 and
    INT8 each with gates measured on the CPU and on "CUDA" (the CPU provider standing in,
    so those carry provider CPU and the build's CPU gates carry none), and an evaluation
    file."""
    f16 = fp16.save(fp16.to_fp16(tiny_bert_export.onnx), tmp_path / "fp16.onnx")
    on_cpu = GateResult("cosine:last_hidden_state", 0.9999, 0.999, ">=", True)
    accuracy = GateResult("cosine", 0.998, 0.99, ">=", True)
    then = GateResult("speedup_b128_s128", 1.5, 1.2, ">=", True, provider=CPU)
    bundle = write_bundle(
        tiny_bert_export,
        tmp_path / "bundle",
        variants=[
            ExtraVariant(f16, "fp16", gates=(on_cpu, then), providers=(CUDA,)),
            # the FP32 file again, standing in for an INT8 that passed on the CPU and on CUDA
            ExtraVariant(
                tiny_bert_export.onnx, "int8", gates=(accuracy, then), providers=(CPU, CUDA)
            ),
        ],
        report_sections=["## INT8: gates and recipe search\n\nVerdict: **pass**.", BUILD_CUDA],
    )
    names = [t.name for t in tiny_bert_export.inputs]
    rows = [ids_feed(names, batch=4, seq=16, seed=s) for s in range(3)]
    data = {n: np.concatenate([r[n] for r in rows]) for n in names}
    evaluation = write_npz(tmp_path / "eval.npz", data)
    return bundle, evaluation


def regate_on(monkeypatch, speedup: dict[str, float]):
    """``regating.regate`` with CUDA played by the CPU provider and the timing ``speedup``."""
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(cuda, "gate_variants", timed(speedup))
    on_cpu = functools.partial(regating._regate_on_cuda, provider=CPU)
    monkeypatch.setattr(regating, "_regate_on_cuda", on_cpu)
    return functools.partial(regating.regate, gate_cfg=GateConfig(provider=CUDA))


def test_int8_slower_on_cuda_is_marked_not_for_cuda_and_still_ships(
    built_on_a_gpu_host, monkeypatch
):
    bundle, evaluation = built_on_a_gpu_host
    regate = regate_on(monkeypatch, {"fp16": 2.1, "int8": 0.9})
    for _ in range(2):  # a second re-gate replaces the first's marks, it does not add to them
        m = regate(bundle.path, evaluation).manifest
        int8, f16 = m.variant("int8"), m.variant("fp16")
        assert m.verdict == "pass"
        assert int8.gates == (GateResult("cosine", 0.998, 0.99, ">=", True),)  # the CPU's, kept
        assert int8.providers == (CPU,) and int8.not_for == (CUDA,)
        assert int8.notes.count("not for CUDA") == 1
        assert "not for CUDA: speedup_b128_s128 0.90 (needs >= 1.2)" in int8.notes
        names = [g.name for g in f16.gates]
        assert names[0] == "cosine:last_hidden_state" and f16.gates[0].provider is None
        assert {"speedup_b128_s128", "speedup_b1_s128", "placement"} <= set(names)
        assert sum(n.startswith("cosine:") for n in names) == 1 + len(tiny_outputs(m))
    record = m.extra["regates"][-1]
    assert record["provider"] == CUDA and record["verdict"] == "pass"

    report = load(bundle.path).report.read_text()
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections[:2] == [
        f"## Re-gated on CUDA {record['at']}",
        f"## Re-gated on CUDA {m.extra['regates'][0]['at']} (superseded)",
    ]
    # the CPU gates still decide whether INT8 ships; the build's CUDA gates are the record
    assert "## INT8: gates and recipe search" in sections
    assert "## On the CUDA execution provider (superseded)" in sections
    assert "INT8 is not for CUDA" in report and "FP16 passed its CUDA gates" in report


def tiny_outputs(m):
    return [o.name for o in m.outputs]


def test_fp16_slower_on_cuda_fails_the_bundle(built_on_a_gpu_host, monkeypatch):
    bundle, evaluation = built_on_a_gpu_host
    regate = regate_on(monkeypatch, {"fp16": 1.05, "int8": 1.5})
    with pytest.raises(GateFailed, match="fp16 speedup_b128_s128 = 1.05, required >= 1.2"):
        regate(bundle.path, evaluation)
    m = load(bundle.path).manifest
    assert m.verdict == "fail" and not m.variant("fp16").passed
    int8 = m.variant("int8")  # fast enough there: its fidelity was measured there too
    assert int8.passed and CUDA in int8.providers and CUDA not in int8.not_for
    assert any(g.name.startswith("cosine:") and g.provider == CPU for g in int8.gates)


def test_a_regate_on_cuda_without_cuda_is_refused_before_anything_is_measured(
    built_on_a_gpu_host, monkeypatch
):
    bundle, evaluation = built_on_a_gpu_host
    monkeypatch.setattr(cuda, "available", lambda: False)
    before = (bundle.path / "manifest.json").read_text()
    with pytest.raises(ConfigError, match="no working CUDA provider.*re-gate on the CPU") as e:
        regating.regate(bundle.path, evaluation, GateConfig(provider=CUDA))
    assert '(`--device cpu`; provider = "cpu" in a --gate-config file)' in str(e.value)
    assert GateConfig(provider="cpu").provider == CPU  # the spelling it advises is taken
    assert (bundle.path / "manifest.json").read_text() == before
    assert json.loads(before)["variants"]
