"""Per-node sensitivity: what keeping each quantized node FP32 buys at the outputs, most first."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

sys.path.insert(0, str(Path(__file__).parent))  # tinygraphs.py, the shared tiny models
from tinygraphs import SEQ, K, attention, attention_feeds, mlp, mlp_feeds, rel_err, run

from quantgate.errors import QuantizeError
from quantgate.quantize.fidelity import row_cosine
from quantgate.quantize.recipes import ORT_DYNAMIC, STATIC, quantize
from quantgate.quantize.sensitivity import node_sensitivity


def test_the_node_with_the_outlier_input_ranks_first(tmp_path):
    # "down" reads h, whose channel 3 is ~100x the others: per-tensor uint8 crushes the rest.
    src = mlp(tmp_path / "mlp.onnx", outlier=600.0)
    feeds = mlp_feeds(6, outlier=1.0)
    qm = quantize(src, STATIC, lambda: iter(feeds), tmp_path / "q.onnx")
    scores = node_sensitivity(src, qm, feeds[:3])
    assert [n for n, _ in scores] == ["down", "up"]
    assert scores[0][1] > 1.5 * scores[1][1] and scores[1][1] < 0.02
    # keeping it FP32 is what the search loop does next
    kept = quantize(
        src, STATIC.with_keep_fp32([scores[0][0]]), lambda: iter(feeds), tmp_path / "k.onnx"
    )
    assert [n for n, _ in node_sensitivity(src, kept, feeds[:3])] == ["up"]


def test_attention_and_top_k(tmp_path):
    src = attention(tmp_path / "attn.onnx")
    feeds = attention_feeds(3)
    qm = quantize(src, STATIC, lambda: iter(feeds), tmp_path / "q.onnx")
    scores = node_sensitivity(src, qm, feeds, top_k=1)
    assert len(scores) == 1 and scores[0][0] in {"attn", "out_proj"} and 0 < scores[0][1] < 0.1


def test_ort_dynamic_model(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    feeds = mlp_feeds(3)
    r = dataclasses.replace(ORT_DYNAMIC, fuse_first=True)
    qm = quantize(src, r, lambda: iter(feeds), tmp_path / "q.onnx")
    scores = node_sensitivity(src, qm, feeds)
    assert {n for n, _ in scores} == {"up", "down"} and all(0 < e < 0.1 for _, e in scores)


def test_wrong_fp32_graph_falls_back_to_the_source_or_is_refused(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    other = attention(tmp_path / "attn.onnx")
    feeds = mlp_feeds(2)
    qm = quantize(src, STATIC, lambda: iter(feeds), tmp_path / "q.onnx")
    assert {n for n, _ in node_sensitivity(other, qm, feeds)} == {"up", "down"}  # qm.source
    qm = dataclasses.replace(qm, source=None)
    with pytest.raises(QuantizeError, match="lacks nodes"):
        node_sensitivity(other, qm, feeds)


def _branches(path: Path) -> Path:
    """y = noisy(x) + loud(x_clean): "noisy" reads x with its outlier channel (per-tensor uint8
    crushes the others: a large error of its own) but its weights are 1e-3 of "loud"'s, so
    its error barely reaches y; "loud" reads x without the outlier (a small error of its own)
    and makes nearly all of y, so its error is nearly all of y's."""
    rng = np.random.default_rng(0)
    wn = rng.normal(0, 1e-3, (K, K)).astype(np.float32)
    wn[5] = 0  # the outlier channel sets the range, the others carry the value
    keep = np.ones(K, np.float32)
    keep[5] = 0
    wl = rng.normal(0, 1.0, (K, K)).astype(np.float32)
    nodes = [
        oh.make_node("MatMul", ["x", "wn"], ["yn"], name="noisy"),
        oh.make_node("Mul", ["x", "keep"], ["xc"], name="clean"),
        oh.make_node("MatMul", ["xc", "wl"], ["yl"], name="loud"),
        oh.make_node("Add", ["yn", "yl"], ["y"], name="add"),
    ]
    g = oh.make_graph(
        nodes,
        "branches",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", K])],
        [
            numpy_helper.from_array(wn, "wn"),
            numpy_helper.from_array(keep, "keep"),
            numpy_helper.from_array(wl, "wl"),
        ],
    )
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    return path


def _cosine_error(src: Path, model: Path, feeds) -> float:
    """1 - cosine of each row of y to FP32's, averaged: what the ranking claims to lower."""
    ref = np.concatenate([run(src, f)[0] for f in feeds]).reshape(-1, SEQ * K)
    got = np.concatenate([run(model, f)[0] for f in feeds]).reshape(-1, SEQ * K)
    return float(np.mean(1 - row_cosine(ref, got)))


def test_the_node_that_costs_the_output_most_ranks_first_not_the_noisiest(tmp_path):
    src = _branches(tmp_path / "b.onnx")
    feeds = mlp_feeds(6)  # channel 5 of x 30x the others
    qm = quantize(src, STATIC, lambda: iter(feeds), tmp_path / "q.onnx")
    # the noisy node's own error is far the larger: the old, local ranking put it first
    x = np.concatenate([f["x"] for f in feeds])
    for node, w, xin in [("noisy", "wn", x), ("loud", "wl", x * _init(src, "keep"))]:
        own = rel_err(xin @ _init(src, w), _node_output(qm.path, node, feeds))
        assert (own > 0.05) if node == "noisy" else (own < 0.02), (node, own)
    scores = node_sensitivity(src, qm, feeds[:3])
    assert [n for n, _ in scores][0] == "loud", scores
    # against explicit ablation: each node kept FP32 in a real quantization, its error measured
    base = _cosine_error(src, qm.path, feeds)
    gain = {}
    for node in ("noisy", "loud"):
        kept = quantize(
            src, STATIC.with_keep_fp32([node]), lambda: iter(feeds), tmp_path / "k.onnx"
        )
        gain[node] = base - _cosine_error(src, kept.path, feeds)
    assert gain["loud"] > 10 * max(gain["noisy"], 0), gain
    # the score is that gain (on half the rows), in the gate's unit
    assert scores[0][1] == pytest.approx(gain["loud"], rel=0.5), (scores, gain)


def _init(path: Path, name: str) -> np.ndarray:
    m = onnx.load(str(path))
    return next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == name)


def _node_output(path: Path, node: str, feeds) -> np.ndarray:
    """The INT8 graph's own output of ``node`` (its tensor kept the FP32 name)."""
    m = onnx.load(str(path))
    fp32_out = {"noisy": "yn", "loud": "yl"}[node]
    m.graph.output.append(oh.make_tensor_value_info(fp32_out, TensorProto.FLOAT, None))
    tmp = path.with_name(f"{node}-out.onnx")
    onnx.save(m, str(tmp))
    return np.concatenate([run(tmp, f)[-1] for f in feeds])
