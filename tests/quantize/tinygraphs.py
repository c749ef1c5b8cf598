"""Tiny real ONNX graphs built with onnx.helper, for the quantization engine's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

K, N, SEQ = 16, 24, 6


def mlp(path: Path, *, outlier: float = 40.0, seed: int = 0) -> Path:
    """x (B, S, K) -> up MatMul -> Relu -> down MatMul -> y, plus a scores MatMul of two
    activations (x @ x^T) that must never be quantized. The caller's feeds put an outlier
    channel into x; ``outlier`` scales channel 3 of ``h`` (the down MatMul's input)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (K, N)).astype(np.float32)
    w1[:, 3] *= outlier / 10  # an outlier channel in h
    w2 = rng.normal(0, 0.3, (N, K)).astype(np.float32)
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["h0"], name="up"),
        oh.make_node("Relu", ["h0"], ["h"], name="relu"),
        oh.make_node("MatMul", ["h", "w2"], ["y"], name="down"),
        oh.make_node("Transpose", ["x"], ["xt"], name="t", perm=[0, 2, 1]),
        oh.make_node("MatMul", ["x", "xt"], ["scores"], name="scores"),
    ]
    g = oh.make_graph(
        nodes,
        "mlp",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K])],
        [
            oh.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", K]),
            oh.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "S", "S"]),
        ],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    return path


def mlp_feeds(n: int, *, seed: int = 1, outlier: float = 30.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(0, 1, (2, SEQ, K)).astype(np.float32)
        x[..., 5] *= outlier  # an outlier channel in x (the up MatMul's input)
        out.append({"x": x})
    return out


def attention(path: Path, hidden: int = 16, heads: int = 2, seed: int = 0) -> Path:
    """A fused com.microsoft.Attention (what ORT's BERT fusion produces) with a mask_index."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.3, (hidden, 3 * hidden)).astype(np.float32)
    b = rng.normal(0, 0.1, (3 * hidden,)).astype(np.float32)
    nodes = [
        oh.make_node("Cast", ["mask"], ["mask32"], name="cast", to=TensorProto.INT32),
        oh.make_node(
            "Attention",
            ["x", "w", "b", "mask32"],
            ["ctx"],
            name="attn",
            domain="com.microsoft",
            num_heads=heads,
        ),
        oh.make_node("MatMul", ["ctx", "wo"], ["y"], name="out_proj"),
    ]
    wo = rng.normal(0, 0.3, (hidden, hidden)).astype(np.float32)
    g = oh.make_graph(
        nodes,
        "attn",
        [
            oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", hidden]),
            oh.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"]),
        ],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", hidden])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(wo, "wo"),
        ],
    )
    m = oh.make_model(
        g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("com.microsoft", 1)]
    )
    onnx.save(m, str(path))
    return path


def attention_feeds(n: int, hidden: int = 16, seed: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(0, 1, (2, SEQ, hidden)).astype(np.float32)
        x[..., 1] *= 20.0
        mask = np.ones((2, SEQ), np.int64)
        mask[1, 4:] = 0  # a padded row
        out.append({"x": x, "mask": mask})
    return out


def run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return s.run(None, {k: v for k, v in feeds.items() if k in names})


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))
