"""FP16 conversion for CUDA, run and gated on the CPU provider."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantgate.errors import QuantizeError
from quantgate.quantize import fp16


def test_fp16_keeps_fp32_io_and_runs_on_the_cpu_provider(tiny_bert_export, feeds, tmp_path):
    model = fp16.to_fp16(tiny_bert_export.onnx)
    path = fp16.save(model, tmp_path / "model.fp16.onnx")
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    fused = {n.op_type for n in model.graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= fused  # the fused graph was converted
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(tiny_bert_export.onnx), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [
        (i.name, i.type) for i in ref.get_inputs()
    ]
    assert {o.type for o in sess.get_outputs()} == {"tensor(float)"}
    for feed in feeds:
        for a, b in zip(ref.run(None, feed), sess.run(None, feed), strict=True):
            assert b.dtype == np.float32 and b.shape == a.shape
            np.testing.assert_allclose(b, a, atol=5e-2, rtol=5e-2)


def test_fidelity_gates_pass_for_fp16_and_fail_for_a_damaged_model(tiny_bert_export, feeds):
    f = fp16.fidelity(tiny_bert_export.onnx, fp16.to_fp16(tiny_bert_export.onnx), feeds)
    assert f.rows == sum(len(next(iter(x.values()))) for x in feeds)
    assert set(f.cosine_mean) == {o.name for o in tiny_bert_export.outputs}
    for name in f.cosine_mean:
        assert f.cosine_mean[name] > 0.9999 and f.cosine_min[name] > 0.999
        assert 0 < f.max_abs_diff[name] < 2e-2  # FP16 rounding is real but small
    gates = f.gates(min_cosine=0.999, max_abs=0.05)
    assert gates and all(g.passed for g in gates)

    damaged = onnx.load(str(tiny_bert_export.onnx))
    rng = np.random.default_rng(0)
    for init in damaged.graph.initializer:  # noise as large as the weights themselves
        arr = onnx.numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 2 and min(arr.shape) > 1:
            noise = rng.normal(0, arr.std(), arr.shape).astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(arr + noise, init.name))
    bad = fp16.fidelity(tiny_bert_export.onnx, damaged, feeds)
    failed = [g for g in bad.gates(min_cosine=0.999) if not g.passed]
    assert failed and all(g.name.startswith("cosine:") and g.op == ">=" for g in failed)
    assert "vs FP32" in failed[0].detail


def test_block_list_keeps_those_ops_fp32(tiny_bert_export):
    kept = fp16._fp32_compute_ops(
        fp16.to_fp16(
            tiny_bert_export.onnx, fp16.Fp16Config(op_block_list=("SkipLayerNormalization",))
        )
    )
    assert kept.get("SkipLayerNormalization", 0) >= 2
    assert "Attention" not in fp16._fp32_compute_ops(fp16.to_fp16(tiny_bert_export.onnx))


def test_an_fp16_model_is_refused(tiny_bert_export):
    model = fp16.to_fp16(tiny_bert_export.onnx)
    with pytest.raises(QuantizeError, match="already holds FP16"):
        fp16.to_fp16(model)
