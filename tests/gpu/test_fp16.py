"""FP16 conversion for CUDA, run and gated on the CPU provider."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantgate.errors import DataError, QuantizeError
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
    # given a model in memory, it converts a copy: the caller's stays FP32
    mine = onnx.load(str(tiny_bert_export.onnx))
    assert fp16.to_fp16(mine).graph.initializer[0].data_type == onnx.TensorProto.FLOAT16
    assert not any(t.data_type == onnx.TensorProto.FLOAT16 for t in mine.graph.initializer)


def test_fidelity_gates_pass_for_fp16_and_fail_for_a_damaged_model(tiny_bert_export, feeds):
    f = fp16.fidelity(
        tiny_bert_export.onnx, fp16.to_fp16(tiny_bert_export.onnx), feeds, precision="fp16"
    )
    assert f.rows == sum(len(next(iter(x.values()))) for x in feeds)
    assert set(f.cosine_mean) == {o.name for o in tiny_bert_export.outputs}
    for name in f.cosine_mean:
        assert f.cosine_mean[name] > 0.9999 and f.cosine_min[name] > 0.999
        assert 0 < f.max_abs_diff[name] < 2e-2  # FP16 rounding is real but small
    gates = f.gates(min_cosine=0.999)
    assert gates and all(g.passed for g in gates)

    damaged = onnx.load(str(tiny_bert_export.onnx))
    rng = np.random.default_rng(0)
    for init in damaged.graph.initializer:  # noise as large as the weights themselves
        arr = onnx.numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 2 and min(arr.shape) > 1:
            noise = rng.normal(0, arr.std(), arr.shape).astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(arr + noise, init.name))
    bad = fp16.fidelity(tiny_bert_export.onnx, damaged, feeds, precision="fp32")
    failed = [g for g in bad.gates(min_cosine=0.999) if not g.passed]
    kinds = {g.name.split(":")[0] for g in failed}
    assert kinds == {"cosine", "cosine_tail"}  # the mean, and the rows under 0.95 with it
    assert all("vs FP32" in g.detail for g in failed)


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


def transpose_matmul_fp16(path):
    """The smallest graph that crashed ORT 1.32 (quantgate.workarounds): an FP16 Transpose
    feeding a MatMul whose weight is an FP16 initializer, as in a dynamo-exported
    nn.TransformerEncoder converted to FP16."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 0.1, (32, 96)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
            helper.make_node("MatMul", ["t", "w"], ["y"]),
        ],
        "transpose_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", "s", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["s", "b", 96])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return w


def test_an_fp16_graph_that_crashed_onnxruntime_opens_and_runs(tmp_path, caplog):
    from quantgate.sessions import session

    path = tmp_path / "transpose_matmul.onnx"
    w = transpose_matmul_fp16(path)
    assert fp16.crash(path) is None  # in a child process: a regression fails, not kills, pytest
    assert "could not check" not in caplog.text  # None because it opened, not as a shrug
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 32)).astype(np.float16)
    (y,) = session(path, precision="fp16").run(None, {"x": x})
    expected = x.transpose(1, 0, 2).astype(np.float32) @ w.astype(np.float32)
    np.testing.assert_allclose(y.astype(np.float32), expected, atol=2e-2, rtol=2e-2)

    # Without the workaround (the options of an FP32 session) this ORT dies; the check sees it.
    unprotected = fp16.crash(path, precision="fp32")
    if unprotected is None and "could not check" not in caplog.text:
        pytest.skip(
            f"onnxruntime {ort.__version__} no longer crashes here: the workaround "
            "in quantgate.workarounds may be dropped"
        )
    assert "ONNX Runtime crashed (SIGSEGV) creating a session on CPUExecutionProvider" in (
        unprotected
    )


def test_an_fp16_variant_that_cannot_be_built_is_left_out_not_fatal(
    tiny_bert_export, feeds, tmp_path, caplog
):
    from quantgate.quantize import pipeline

    # An FP16 "export": to_fp16 refuses it, as it would any model its converter fails on.
    already = fp16.save(fp16.to_fp16(tiny_bert_export.onnx), tmp_path / "already.onnx")
    variant, section = pipeline._fp16_variant(
        already, lambda: iter(feeds), tmp_path, pipeline.QuantConfig()
    )
    assert variant is None and not (tmp_path / "model.fp16.onnx").exists()
    assert section.startswith("## FP16")
    assert "Left out: the model already holds FP16 initializers" in section
    assert "CUDA serves FP32" in section
    assert "the FP16 variant is left out of the bundle" in caplog.text
    assert "--no-fp16" in caplog.text


def _argmax_model(path, *, logits: bool = True):
    """x (batch, 4) -> logits (batch, 3) and their ArgMax, pred (batch,) int64; without
    ``logits``, pred alone."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32), "w"
    )
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])][
        : int(logits)
    ] + [helper.make_tensor_value_info("pred", TensorProto.INT64, ["batch"])]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]),
         helper.make_node("ArgMax", ["logits"], ["pred"], axis=1, keepdims=0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])], outputs, [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def test_fidelity_passes_over_integer_outputs(tmp_path):
    """A predicted class index beside the logits (ArgMax, int64): FP16 was gated with an R²
    of indices, which says nothing of a flipped class; only float outputs are compared."""
    path = _argmax_model(tmp_path / "m.onnx")
    feeds = [{"x": np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)}]
    f = fp16.fidelity(path, path, feeds, precision="fp32", mask=None)
    assert set(f.cosine_mean) == {"logits"}
    assert [g.name for g in f.gates(min_cosine=0.99)] == ["cosine:logits", "cosine_tail:logits"]


def test_an_fp16_variant_with_no_float_output_to_gate_is_left_out(tmp_path, caplog):
    """A model whose one output is a class index: nothing FP16 changes can be compared, and
    the export went down with it (exit 2, no bundle); FP16 is left out instead."""
    from quantgate.quantize import pipeline

    only = _argmax_model(tmp_path / "pred.onnx", logits=False)
    feeds = [{"x": np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)}]
    with pytest.raises(QuantizeError, match="float outputs, and it has none"):
        fp16.fidelity(only, only, feeds, precision="fp32", mask=None)
    variant, section = pipeline._fp16_variant(
        only, lambda: iter(feeds), tmp_path, pipeline.QuantConfig()
    )
    assert variant is None and "Left out: its fidelity compares the model's float" in section
    assert "the FP16 variant is left out of the bundle" in caplog.text


def test_an_fp16_variant_onnx_runtime_fails_on_is_left_out_not_fatal(tmp_path, caplog):
    """An ONNX Runtime error in the FP16 step (here a feed its session refuses) ended the
    export with a traceback after the whole INT8 search; FP16 is an extra for CUDA and is
    left out with the error's words instead."""
    from quantgate.quantize import pipeline

    path = _argmax_model(tmp_path / "m.onnx")
    feeds = [{"x": np.zeros((8, 5), np.float32)}]  # 5 features where the model takes 4
    variant, section = pipeline._fp16_variant(
        path, lambda: iter(feeds), tmp_path, pipeline.QuantConfig()
    )
    assert variant is None
    assert "Left out: InvalidArgument: " in section and "Got: 5 Expected: 4" in section
    assert "the FP16 variant is left out of the bundle" in caplog.text

    def unreadable():  # the data's fault, not FP16's: the export ends as it would anyway
        raise DataError("evaluation file unreadable")

    with pytest.raises(DataError, match="evaluation file unreadable"):
        pipeline._fp16_variant(path, unreadable, tmp_path, pipeline.QuantConfig())


def _chain(path, nodes, weights):
    """x (batch, 8) -> ``nodes`` -> y (batch, 8), with float ``weights`` by name."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()],
    )  # fmt: skip
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path
    )
    return path


def _as_cuda_stores_it(model: onnx.ModelProto, feed) -> np.ndarray:
    """The FP16 model's output with every FP16 tensor held in FP16 between ops, as CUDA's
    kernels hold it (onnx.reference: numpy's float16), not as the CPU provider runs it."""
    from onnx.reference import ReferenceEvaluator

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {i.name for i in m.graph.input} | {t.name for t in m.graph.initializer} | {""}
    nodes, ordered = list(m.graph.node), []
    while nodes:  # the converter appends its Casts: the reference wants producers first
        node = next(n for n in nodes if all(i in known for i in n.input))
        ordered.append(node)
        known.update(node.output)
        nodes.remove(node)
    del m.graph.node[:]
    m.graph.node.extend(ordered)
    with np.errstate(all="ignore"):
        return ReferenceEvaluator(m).run(None, feed)[0]


def test_values_past_fp16s_range_keep_their_nodes_fp32(tmp_path):
    """FP16 holds at most 65504. An activation past it is inf on CUDA, a weight past it is
    clamped, yet the CPU provider's FP16 run is FP32 between Casts and saw neither: the
    gate passed both at cosine 1.0. Their nodes are found on FP32's run and kept FP32."""
    from onnx import helper

    x = np.random.default_rng(0).uniform(-1, 1, (64, 8)).astype(np.float32)
    exp = _chain(tmp_path / "exp.onnx", [  # exp(12x) reaches 1.6e5; its output, 160
        helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
        helper.make_node("Exp", ["xs"], ["e"]),  # unnamed: named to be kept
        helper.make_node("Mul", ["e", "k"], ["y"], name="shrink"),
    ], {"s": 12.0, "k": 1e-3})  # fmt: skip
    heavy = _chain(tmp_path / "w.onnx", [  # a weight of 1e5, an output under 100
        helper.make_node("Mul", ["x", "w"], ["xw"], name="heavy"),
        helper.make_node("Mul", ["xw", "k"], ["y"], name="light"),
    ], {"w": np.full(8, 1e5), "k": 1e-3})  # fmt: skip
    for path, kept in ((exp, ["Exp_1_0", "shrink"]), (heavy, ["heavy", "light"])):
        want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        plain = fp16.to_fp16(path)
        on_cpu = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
        assert np.isfinite(on_cpu.run(None, {"x": x})[0]).all()  # what the CPU gate saw
        off = _as_cuda_stores_it(plain, {"x": x})
        assert not np.isfinite(off).all() or np.median(np.abs(off / want)) < 0.7  # clamped
        past = fp16.out_of_range(path, [{"x": x}])
        assert list(past.nodes) == kept and past.rows == 64
        assert "2 node(s) kept FP32 for values FP16 may not hold" in past.describe()
        safe = fp16.to_fp16(path, fp16.Fp16Config(node_block_list=past.nodes))
        np.testing.assert_allclose(_as_cuda_stores_it(safe, {"x": x}), want, rtol=1e-2)
    assert set(fp16.out_of_range(exp, [{"x": x}]).tensors) == {"e"}
    assert set(fp16.out_of_range(heavy, [{"x": x}]).weights) == {"w"}
    assert fp16.out_of_range(heavy, [{"x": x * 1e-6}]).nodes == ("heavy",)  # its weight alone


def test_the_fp16_variant_keeps_fp32_where_values_leave_fp16s_range(
    tiny_bert_export, feeds, tmp_path
):
    """In the build: the nodes kept are in the variant's recipe and its report section; a
    transformer's activations (MiniLM's largest: 192) keep none."""
    from onnx import helper

    from quantgate.quantize import pipeline

    x = np.random.default_rng(0).uniform(-1, 1, (16, 8)).astype(np.float32)
    path = _chain(tmp_path / "exp.onnx", [
        helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
        helper.make_node("Exp", ["xs"], ["e"], name="exp"),
        helper.make_node("Mul", ["e", "k"], ["y"], name="shrink"),
    ], {"s": 12.0, "k": 1e-3})  # fmt: skip
    variant, section = pipeline._fp16_variant(
        path, lambda: iter([{"x": x}]), tmp_path, pipeline.QuantConfig()
    )
    assert variant.recipe["fp32_nodes"] == ["exp", "shrink"]
    assert "2 node(s) kept FP32 for values FP16 may not hold" in section and "e 1." in section
    (tmp_path / "bert").mkdir()
    bert, section = pipeline._fp16_variant(
        tiny_bert_export.onnx, lambda: iter(feeds), tmp_path / "bert", pipeline.QuantConfig()
    )
    assert bert.recipe["fp32_nodes"] == [] and "kept FP32" not in section


def test_a_mask_fill_is_no_overflow_and_control_flow_is_said_or_refused(tmp_path):
    """An unfused BERT's mask fill (float32's lowest) kept its Add and Softmax FP32 in every
    layer, for nothing: FP16 holds it as -inf, which is what it means. The subgraphs of an
    If are not measured, which the report says; a value past FP16's range read inside one
    cannot be kept FP32 by the converter, so FP16 is refused (left out), not shipped."""
    from onnx import TensorProto, helper

    x = np.random.default_rng(0).uniform(-1, 1, (16, 8)).astype(np.float32)
    lowest = np.where(np.arange(8) < 4, 0.0, np.finfo(np.float32).min)
    fill = _chain(
        tmp_path / "fill.onnx", [helper.make_node("Add", ["x", "m"], ["y"])], {"m": lowest}
    )
    assert fp16.out_of_range(fill, [{"x": x}]).nodes == ()

    def branch(name, a):
        out = helper.make_tensor_value_info(f"{name}o", TensorProto.FLOAT, None)
        return helper.make_graph([helper.make_node("Mul", [a, "k"], [f"{name}o"])], name, [], [out])

    def with_if(read: str, path):
        return _chain(path, [
            helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
            helper.make_node("Exp", ["xs"], ["e"], name="exp"),
            helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0),
            helper.make_node("Greater", ["sum", "low"], ["c"]),
            helper.make_node("If", ["c"], ["z"], then_branch=branch("t", read),
                             else_branch=branch("f", read), name="branch"),
            helper.make_node("Mul", ["e", "k"], ["ek"], name="shrink"),
            helper.make_node("Add", ["z", "ek"], ["y"], name="add"),
        ], {"s": 12.0, "k": 1e-3, "low": -1e3})  # fmt: skip

    past = fp16.out_of_range(with_if("x", tmp_path / "if.onnx"), [{"x": x}])
    assert past.nodes == ("exp", "shrink") and past.unmeasured == ("branch",)
    assert "the subgraphs of 1 control-flow node(s) (branch) were not measured" in past.describe()
    with pytest.raises(QuantizeError, match=r"e hold values .* inside the subgraph of branch"):
        fp16.out_of_range(with_if("e", tmp_path / "if-e.onnx"), [{"x": x}])
