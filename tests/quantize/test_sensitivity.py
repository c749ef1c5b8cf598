"""Per-node sensitivity: the error each quantized node introduces, worst first."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tinygraphs.py, the shared tiny models
from tinygraphs import attention, attention_feeds, mlp, mlp_feeds

from quantgate.errors import QuantizeError
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
