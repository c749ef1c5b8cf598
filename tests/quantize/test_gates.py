"""The gates on real ONNX Runtime sessions: accuracy with a paired bootstrap CI, fidelity, speed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import dynamic_int8, tiny_export  # noqa: E402

from quantgate.errors import ConfigError  # noqa: E402
from quantgate.quantize.data import ModelInfo, open_source  # noqa: E402
from quantgate.quantize.gates import (  # noqa: E402
    GateConfig,
    Outputs,
    accuracy_gates,
    collect,
    paired_bootstrap,
    speed_gates,
)

FAST = GateConfig(iterations=5, warmup=1, batch_sizes=(1, 8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    result = tiny_export()
    int8 = dynamic_int8(result.onnx, tmp_path_factory.mktemp("q") / "int8.onnx")
    return result, int8


def test_paired_bootstrap_interval():
    same = np.ones(300, bool)
    assert paired_bootstrap(same, same, n=500, confidence=0.95, seed=0) == (0.0, (0.0, 0.0))
    a = np.ones(300, bool)
    b = a.copy()
    b[:6] = False  # six rows newly wrong: a 2-point drop
    drop, (lo, hi) = paired_bootstrap(a, b, n=2000, confidence=0.95, seed=0)
    assert drop == pytest.approx(2.0)
    assert 0 <= lo < drop < hi < 4.5
    b[6:9] = True  # irrelevant: already right in both
    assert paired_bootstrap(a, b, n=2000, confidence=0.95, seed=0)[0] == pytest.approx(2.0)


def test_accuracy_gate_with_labels_on_real_sessions(models):
    result, int8 = models
    ev = open_source(None, ModelInfo.from_export(result), role="evaluation")
    ref, cand = collect(result.onnx, ev), collect(int8, ev)
    (gate,) = accuracy_gates(ref, cand, result.task, GateConfig())
    assert gate.name == "accuracy_drop" and gate.op == "<=" and gate.threshold == 1.0
    assert gate.ci[0] <= gate.value <= gate.ci[1]
    assert "360 labelled rows" in gate.detail
    # FP32 against itself: exactly no drop, and a zero-width interval.
    (self_gate,) = accuracy_gates(ref, collect(result.onnx, ev), result.task, GateConfig())
    assert self_gate.value == 0 and self_gate.ci == (0.0, 0.0) and self_gate.passed


def test_classifier_fidelity_without_labels(models):
    result, int8 = models
    info = ModelInfo.from_export(result)
    split = open_source(None, info, role="evaluation", samples=100)
    unlabelled = open_source([b.feeds for b in split.batches()], info, role="evaluation")
    assert not unlabelled.has_labels
    ref, cand = collect(result.onnx, unlabelled), collect(int8, unlabelled)
    gates = {g.name: g for g in accuracy_gates(ref, cand, result.task, GateConfig())}
    assert set(gates) == {"top1_agreement", "kl"}
    assert 0.5 <= gates["top1_agreement"].value <= 1 and gates["kl"].value >= 0
    strict = GateConfig(min_top1_agreement=1.0, max_kl=0.0)
    kl = next(g for g in accuracy_gates(ref, cand, result.task, strict) if g.name == "kl")
    assert not kl.passed  # INT8 is never bit-identical


def test_embedding_fidelity_cosine_and_nearest_neighbours():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    ref = Outputs(["sentence_embedding"], [{"sentence_embedding": x}], [None], rows=50)
    near = Outputs(["sentence_embedding"], [{"sentence_embedding": x + 1e-3}], [None], rows=50)
    gates = {g.name: g for g in accuracy_gates(ref, near, "feature-extraction", GateConfig())}
    assert gates["cosine"].value > 0.999 and gates["nn_top1_agreement"].value == 1.0
    assert all(g.passed for g in gates.values())
    shuffled = Outputs(
        ["sentence_embedding"], [{"sentence_embedding": x[::-1].copy()}], [None], rows=50
    )
    bad = {g.name: g for g in accuracy_gates(ref, shuffled, "feature-extraction", GateConfig())}
    assert not bad["cosine"].passed and not bad["nn_top1_agreement"].passed


def test_speed_gate_is_interleaved_per_shape(models):
    result, int8 = models
    gates = speed_gates(result.onnx, int8, result.inputs, result.max_seq_len, FAST)
    assert [g.name for g in gates] == ["speedup_b1_s64", "speedup_b8_s64"]  # digits: seq 64
    for g in gates:
        assert g.value > 0 and g.ci[0] <= g.value <= g.ci[1]
        assert g.provider == "CPUExecutionProvider" and "interleaved" in g.detail
    impossible = speed_gates(
        result.onnx,
        int8,
        result.inputs,
        64,
        GateConfig(min_speedup=100, iterations=3, warmup=1, batch_sizes=(1,)),
    )
    assert not impossible[0].passed


def test_gate_config_from_files_and_flags(tmp_path):
    (tmp_path / "g.toml").write_text("[gates]\nmax_accuracy_drop = 0.5\nbatch_sizes = [1, 4]\n")
    cfg = GateConfig.from_file(tmp_path / "g.toml", min_speedup=1.5, min_cosine=None)
    assert (cfg.max_accuracy_drop, cfg.batch_sizes, cfg.min_speedup) == (0.5, (1, 4), 1.5)
    assert cfg.min_cosine == GateConfig().min_cosine
    (tmp_path / "g.json").write_text('{"min_top1_agreement": 0.9}')
    assert GateConfig.from_file(tmp_path / "g.json").min_top1_agreement == 0.9
    (tmp_path / "bad.json").write_text('{"min_speed": 2}')
    with pytest.raises(ConfigError, match="unknown setting"):
        GateConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="min_speedup"):
        GateConfig(min_speedup=0)
