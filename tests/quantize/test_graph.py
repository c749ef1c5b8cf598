"""quantgate's hand-built INT8 graph: statistics, exact smoothing, the rewrite, on tiny graphs."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tinygraphs.py, the shared tiny models
from tinygraphs import attention, attention_feeds, mlp, mlp_feeds, rel_err, run

from quantgate.errors import DataError, NothingToQuantize, QuantizeError
from quantgate.quantize import graph
from quantgate.quantize.recipes import SMOOTH_STATIC, STATIC, quantize


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_channel_stats_leave_out_padding_rows():
    st = graph.ChannelStats()
    x = np.zeros((1, 3, 2), np.float32)
    x[0, 2] = [100.0, -100.0]  # a padded position with garbage
    x[0, 0] = [1.0, -2.0]
    st.update(x, keep=np.array([[True, True, False]]))
    np.testing.assert_array_equal(st.lo, [0.0, -2.0])
    np.testing.assert_array_equal(st.hi, [1.0, 0.0])
    assert st.count == 2


def test_qparams_cover_the_range_and_represent_zero_exactly():
    lo, hi = -0.3, 5.1
    for qtype, sym in (("uint8", False), ("uint8", True), ("int8", True), ("int8", False)):
        scale, zp = graph.qparams(np.array(lo), np.array(hi), qtype, sym)
        qmin, qmax = (0, 255) if qtype == "uint8" else (-128, 127)
        zp, scale = int(zp), float(scale)  # an integer zero point: 0.0 is exactly the code zp
        assert qmin <= zp <= qmax and scale > 0
        # The codes' range, dequantized, reaches both ends: exactly when symmetric; within
        # half a step when not (rounding the zero point to an integer shifts the grid).
        slack = 0.0 if sym else scale / 2
        assert (qmin - zp) * scale <= lo + slack + 1e-6
        assert (qmax - zp) * scale >= hi - slack - 1e-6
    scale, zp = graph.qparams(np.array(-2.0), np.array(1.0), "int8", True)
    assert zp == 0 and np.isclose(scale, 2.0 / 127)


def test_smoothing_is_an_exact_fp32_rewrite(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    feeds = mlp_feeds(4)
    model = onnx.load(str(src))
    gemms, _ = graph.find_gemms(model, ("MatMul",))
    stats = graph.calibrate(model, [g.x for g in gemms], lambda: iter(feeds))
    graph.apply_smoothing(model, gemms, stats, 75.0)
    onnx.save(model, str(tmp_path / "smoothed.onnx"))
    assert ops(tmp_path / "smoothed.onnx").count("Mul") == 2
    for f in feeds:
        ref, got = run(src, f), run(tmp_path / "smoothed.onnx", f)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)


def test_only_weight_gemms_are_quantized(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    feeds = mlp_feeds(8)
    qm = quantize(src, SMOOTH_STATIC, lambda: iter(feeds), tmp_path / "int8.onnx")
    assert set(qm.quantized_nodes) == {"up", "down"}  # not the activation x activation "scores"
    got = ops(qm.path)
    assert got.count("MatMulIntegerToFloat") == 2 and got.count("QuantizeLinear") == 2
    assert got.count("MatMul") == 1  # scores stays FP32
    assert "DequantizeLinear" not in got  # outputs are never re-quantized
    for f in feeds[:2]:
        ref, q = run(src, f), run(qm.path, f)
        assert rel_err(ref[0], q[0]) < 0.03
        np.testing.assert_array_equal(ref[1], q[1])


def test_a_weight_shared_through_identity_is_quantized_for_every_layer(tmp_path):
    """ALBERT's layers share weights: the exporter writes each once and every later layer
    reads it through an Identity node. Both reads are weight GEMMs, quantized each; the
    Identity and the FP32 weight leave the INT8 file."""
    from onnx import TensorProto, numpy_helper
    from onnx import helper as oh

    w = np.random.default_rng(0).normal(0, 0.3, (8, 8)).astype(np.float32)
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["h"], name="layer0"),
        oh.make_node("Identity", ["w"], ["w_again"], name="shared"),
        oh.make_node("MatMul", ["h", "w_again"], ["y"], name="layer1"),
    ]
    info = lambda n: oh.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "S", 8])  # noqa: E731
    g = oh.make_graph(nodes, "shared", [info("x")], [info("y")], [numpy_helper.from_array(w, "w")])
    src = tmp_path / "shared.onnx"
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), str(src))
    gemms, _ = graph.find_gemms(onnx.load(str(src)), ("MatMul",))
    assert [(t.node, t.w) for t in gemms] == [("layer0", "w"), ("layer1", "w")]
    feeds = [{"x": np.random.default_rng(i).normal(size=(2, 4, 8)).astype(np.float32)}
             for i in range(8)]  # fmt: skip
    qm = quantize(src, SMOOTH_STATIC, lambda: iter(feeds), tmp_path / "int8.onnx")
    assert set(qm.quantized_nodes) == {"layer0", "layer1"}
    got = ops(qm.path)
    assert got.count("MatMulIntegerToFloat") == 2 and "MatMul" not in got and "Identity" not in got
    assert "w" not in {i.name for i in onnx.load(str(qm.path)).graph.initializer}
    assert rel_err(run(src, feeds[0])[0], run(qm.path, feeds[0])[0]) < 0.05


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_gemm_with_bias_is_quantized_as_a_matmul_with_its_bias(tmp_path, trans_b):
    """GPT-2's Conv1D layers export as Gemm (x @ W + b on (B*T, K) rows): each becomes
    MatMulIntegerToFloat with the bias as its 7th input, stored transposed or not; one
    with an alpha is left FP32 and named."""
    from onnx import TensorProto, numpy_helper
    from onnx import helper as oh

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (8, 6)).astype(np.float32)
    b = rng.normal(0, 0.3, 6).astype(np.float32)
    nodes = [
        oh.make_node("Gemm", ["x", "w", "b"], ["y"], name="conv1d", transB=trans_b),
        oh.make_node("Gemm", ["x", "w", "b"], ["z"], name="scaled", alpha=0.5, transB=trans_b),
    ]
    io = lambda n, k: oh.make_tensor_value_info(n, TensorProto.FLOAT, ["R", k])  # noqa: E731
    weight = numpy_helper.from_array(w.T.copy() if trans_b else w, "w")
    g = oh.make_graph(nodes, "gemm", [io("x", 8)], [io("y", 6), io("z", 6)],
                      [weight, numpy_helper.from_array(b, "b")])  # fmt: skip
    src = tmp_path / "gemm.onnx"
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), str(src))
    feeds = [{"x": rng.normal(size=(12, 8)).astype(np.float32)} for _ in range(8)]
    qm = quantize(src, SMOOTH_STATIC, lambda: iter(feeds), tmp_path / "int8.onnx")
    assert qm.quantized_nodes == ("conv1d",) and qm.kept_fp32 == ("scaled",)
    assert ops(qm.path).count("MatMulIntegerToFloat") == 1
    ref, got = run(src, feeds[0]), run(qm.path, feeds[0])
    assert rel_err(ref[0], got[0]) < 0.03
    np.testing.assert_array_equal(ref[1], got[1])


def test_smoothing_cuts_the_error_of_outlier_channels(tmp_path):
    src = mlp(tmp_path / "mlp.onnx", outlier=60.0)
    feeds = mlp_feeds(8, outlier=60.0)
    plain = quantize(src, STATIC, lambda: iter(feeds), tmp_path / "plain.onnx")
    smooth = quantize(src, SMOOTH_STATIC, lambda: iter(feeds), tmp_path / "smooth.onnx")
    errs = {}
    for name, qm in (("plain", plain), ("smooth", smooth)):
        errs[name] = np.mean([rel_err(run(src, f)[0], run(qm.path, f)[0]) for f in feeds])
    assert errs["smooth"] < 0.5 * errs["plain"], errs


def test_one_pass_range_after_smoothing_is_exact(tmp_path):
    """The per-tensor range of x/s derived from per-channel min/max equals the measured one."""
    src = mlp(tmp_path / "mlp.onnx")
    feeds = mlp_feeds(4)
    model = onnx.load(str(src))
    gemms, _ = graph.find_gemms(model, ("MatMul",))
    stats = graph.calibrate(model, ["x"], lambda: iter(feeds))
    s = graph.smoothing_scales(stats["x"].absmax, 75.0)
    assert s.max() > 1  # the outlier channel is divided
    graph.apply_smoothing(model, [g for g in gemms if g.x == "x"], stats, 75.0)
    measured = graph.calibrate(model, ["x_smoothed"], lambda: iter(feeds))["x_smoothed"]
    assert np.isclose((stats["x"].lo / s).min(), measured.lo.min(), rtol=1e-6)
    assert np.isclose((stats["x"].hi / s).max(), measured.hi.max(), rtol=1e-6)


def test_calibration_reads_each_feed_once_and_keeps_no_samples(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    seen = []

    def calibration():
        for i, f in enumerate(mlp_feeds(30)):
            seen.append(i)
            yield f

    stats = graph.calibrate(onnx.load(str(src)), ["x", "h"], calibration)
    assert seen == list(range(30))  # one pass
    assert stats["h"].lo.shape == (24,) and stats["h"].count == 30 * 2 * 6


def test_calibration_leaves_padded_positions_out_of_every_tensor(tmp_path):
    """A padded position's activations are whatever the model makes of padding: they set no
    range. The mask is the feed's, matched to each tensor calibrate reads (an input, an
    inner activation); with it dropped the ranges took in the padding's 1e4s."""
    feeds = mlp_feeds(3)
    mask = np.ones((2, 6), np.int64)
    mask[1, 4:] = 0  # the second row's last two positions are padding
    for f in feeds:
        f["x"][1, 4:, :] = 1e4
        f["attention_mask"] = mask
    stats = graph.calibrate(
        onnx.load(str(mlp(tmp_path / "m.onnx"))), ["x", "h"], lambda: iter(feeds)
    )
    real = np.concatenate([f["x"][mask.astype(bool)] for f in feeds])  # (rows, K)
    np.testing.assert_array_equal(stats["x"].hi, real.max(0))
    assert stats["h"].hi.max() < 1e3  # the padding's 1e4s through the up MatMul: far more
    assert stats["x"].count == stats["h"].count == 3 * int(mask.sum())


def test_keep_fp32_and_unknown_names(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    feeds = mlp_feeds(4)
    qm = quantize(
        src, SMOOTH_STATIC.with_keep_fp32(["down"]), lambda: iter(feeds), tmp_path / "q.onnx"
    )
    assert qm.quantized_nodes == ("up",) and qm.kept_fp32 == ("down",)
    assert ops(qm.path).count("MatMulIntegerToFloat") == 1
    with pytest.raises(QuantizeError, match="does not have"):
        quantize(
            src, SMOOTH_STATIC.with_keep_fp32(["nope"]), lambda: iter(feeds), tmp_path / "x.onnx"
        )


def test_empty_calibration_is_a_data_error(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    with pytest.raises(DataError, match="no feeds"):
        quantize(src, SMOOTH_STATIC, lambda: iter([]), tmp_path / "q.onnx")


def test_fused_attention_becomes_qattention(tmp_path):
    src = attention(tmp_path / "attn.onnx")
    feeds = attention_feeds(6)
    qm = quantize(src, SMOOTH_STATIC, lambda: iter(feeds), tmp_path / "q.onnx")
    assert set(qm.quantized_nodes) == {"attn", "out_proj"}
    got = ops(qm.path)
    assert "QAttention" in got and "Attention" not in got and "MatMulIntegerToFloat" in got
    for f in feeds[:3]:
        ref, q = run(src, f)[0], run(qm.path, f)[0]
        assert rel_err(ref, q) < 0.03


def test_attention_with_unsupported_inputs_stays_fp32(tmp_path):
    src = attention(tmp_path / "attn.onnx")
    m = onnx.load(str(src))
    attn = next(n for n in m.graph.node if n.name == "attn")
    attn.attribute.append(onnx.helper.make_attribute("qkv_hidden_sizes", [16, 16, 16]))
    onnx.save(m, str(src))
    feeds = attention_feeds(2)
    qm = quantize(src, SMOOTH_STATIC, lambda: iter(feeds), tmp_path / "q.onnx")
    assert "attn" in qm.kept_fp32 and qm.quantized_nodes == ("out_proj",)


def test_per_tensor_and_reduce_range_weights(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    feeds = mlp_feeds(4)
    r = dataclasses.replace(STATIC, name="pt", per_channel=False, reduce_range=True)
    qm = quantize(src, r, lambda: iter(feeds), tmp_path / "q.onnx")
    init = {
        i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(qm.path)).graph.initializer
    }
    wq = init["up_Wq"]
    assert init["up_Wscale"].shape == () and np.abs(wq.astype(int)).max() <= 64
    assert rel_err(run(src, feeds[0])[0], run(qm.path, feeds[0])[0]) < 0.1


def test_a_recipe_with_nothing_to_quantize_says_so_and_what_the_graph_holds(tmp_path):
    """That is the recipe's lot, not the model's (SqueezeBERT's convolutions): another recipe
    may have something to quantize."""
    from onnx import TensorProto
    from onnx import helper as oh

    io = lambda n: oh.make_tensor_value_info(n, TensorProto.FLOAT, ["R", 4])  # noqa: E731
    g = oh.make_graph([oh.make_node("Relu", ["x"], ["y"], name="relu")], "g", [io("x")], [io("y")])
    src = tmp_path / "relu.onnx"
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), str(src))
    feeds = [{"x": np.ones((2, 4), np.float32)}]
    with pytest.raises(QuantizeError) as err:
        quantize(src, SMOOTH_STATIC, lambda: iter(feeds), tmp_path / "int8.onnx")
    said = str(err.value)
    assert "quantizes MatMul, Attention, Gemm nodes with weights, and found none" in said, said
    assert "most common ops: Relu 1" in said and "export the model with --no-quantize" in said
    assert "This recipe has nothing to quantize here; where no recipe has" in said, said
    assert isinstance(err.value, NothingToQuantize)  # a search says it at INFO, not WARNING

    # weights a recipe of MatMuls does not read (GPT-2's Conv1D exports as Gemm): named,
    # where "the graph's most common ops" listed Constant and Unsqueeze
    w = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    g = oh.make_graph(
        [oh.make_node("Gemm", ["x", "w"], ["y"], name="fc")], "g", [io("x")], [io("y")], [w]
    )
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), str(src))
    matmuls = dataclasses.replace(SMOOTH_STATIC, op_types=("MatMul",))
    with pytest.raises(
        NothingToQuantize, match=r"the graph's weight matrices are read by Gemm 1\)"
    ):
        quantize(src, matmuls, lambda: iter(feeds), tmp_path / "int8.onnx")
