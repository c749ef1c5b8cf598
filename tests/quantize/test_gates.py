"""The accuracy gates on real ONNX Runtime sessions: accuracy with its paired interval, fidelity."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import dynamic_int8  # noqa: E402
from tinygraphs import SEQ, K, mlp, mlp_feeds  # noqa: E402

from quantgate.bundle import GateResult, TensorSpec  # noqa: E402
from quantgate.errors import ConfigError, DataError  # noqa: E402
from quantgate.quantize import fp16  # noqa: E402
from quantgate.quantize.data import ModelInfo, open_source  # noqa: E402
from quantgate.quantize.decide import GateConfig, uncertain  # noqa: E402
from quantgate.quantize.fidelity import Fidelity, r2_gate, row_cosine  # noqa: E402
from quantgate.quantize.gates import (  # noqa: E402
    Judged,
    Kind,
    Outputs,
    accuracy_gates,
    batch_consistency,
    check_evaluation,
    collect,
    kind_of,
    labels_at_chance,
    token_labels_at_chance,
)
from quantgate.quantize.report import gate_table  # noqa: E402
from quantgate.quantize.stats import wilson  # noqa: E402

FAST = GateConfig(iterations=5, warmup=1, batch_sizes=(1, 8))


def test_a_share_of_agreeing_rows_has_wilsons_interval():
    """30 of 30 rows agreeing: a lower bound of 0.886, not a collapsed (1.0, 1.0)."""
    gate = accuracy_gates(*_agreeing(rows=30), "sequence-classification", GateConfig())
    (top1,) = [g for g in gate if g.name == "top1_agreement"]
    assert top1.value == 1 and top1.ci[0] == pytest.approx(0.886, abs=1e-3)
    assert "Wilson score interval over 30 rows" in top1.detail


def test_kl_is_exact_and_a_tied_top_class_is_no_agreement():
    x = np.zeros((40, 3), np.float32)
    x[:, 0] = 5  # FP32: class 0, class 1 at e^-5 of it
    y = x.copy()
    y[:, 1] = -100  # the candidate all but rules class 1 out: a real loss of probability
    ref, cand = (Outputs(["logits"], [{"logits": v}], [None], rows=40) for v in (x, y))
    gates = {g.name: g for g in accuracy_gates(ref, cand, "sequence-classification", GateConfig())}
    log_p = np.array([0, -5, -5]) - np.log(1 + 2 * np.exp(-5))
    log_q = np.array([0, -105, -5]) - np.log(1 + np.exp(-100) + np.exp(-5))
    exact = float((np.exp(log_p) * (log_p - log_q)).sum())  # about 0.66; clamped at 1e-12: 0.15
    assert gates["kl"].value == pytest.approx(exact, rel=1e-6) and exact > 0.6
    flat = Outputs(["logits"], [{"logits": np.zeros_like(x)}], [None], rows=40)  # saturated
    gates = {g.name: g for g in accuracy_gates(ref, flat, "sequence-classification", GateConfig())}
    assert gates["top1_agreement"].value == 0  # argmax alone would credit class 0 on each row


def test_an_unchanged_model_loses_nothing_on_rows_fp32_itself_ties():
    """A tie for the top class is no hit and no agreement on its own, but the same tie in
    FP32 and the candidate is the same answer: an identical candidate drops nothing."""
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    x[:8] = 0  # FP32 ties every class on 8 rows
    labels = np.arange(60) % 4
    ref = Outputs(["logits"], [{"logits": x}], [None], labels=labels, rows=60)
    gates = {g.name: g for g in accuracy_gates(ref, ref, "sequence-classification", GateConfig())}
    assert (
        gates["accuracy_drop"].value == 0
        and "0 row(s) newly wrong" in gates["accuracy_drop"].detail
    )
    unlabelled = Outputs(["logits"], [{"logits": x}], [None], rows=60)
    gates = {g.name: g for g in accuracy_gates(unlabelled, unlabelled, "sequence-classification",
                                               GateConfig())}  # fmt: skip
    assert gates["top1_agreement"].value == 1 and gates["kl"].value == 0
    assert gates["kl"].ci == (0.0, 0.0) and "bootstrap" in gates["kl"].detail  # not a share
    masked = x.copy()
    masked[:, 3] = -np.inf  # a class FP32 masks: no probability, no KL, no fault
    m = Outputs(["logits"], [{"logits": masked}], [None], rows=60)
    gates = {g.name: g for g in accuracy_gates(m, m, "sequence-classification", GateConfig())}
    assert gates["kl"].value == 0 and all(g.passed for g in gates.values())
    assert "max abs 0" in gates["kl"].detail
    labelled = Outputs(["logits"], [{"logits": masked}], [None], labels=labels % 3, rows=60)
    drop, *_ = accuracy_gates(labelled, labelled, "sequence-classification", GateConfig())
    assert drop.value == 0 and drop.passed  # was a 100-point drop: every row "non-finite"
    worse = masked.copy()
    worse[:5, 0] = np.inf  # the candidate's own non-finite scores still fail it
    w = Outputs(["logits"], [{"logits": worse}], [None], rows=60)
    gates = {g.name: g for g in accuracy_gates(m, w, "sequence-classification", GateConfig())}
    assert not gates["top1_agreement"].passed


def test_rows_in_the_data_twice_count_once_for_nearest_neighbours():
    """A duplicate finds its copy nearest under both models: 100 duplicated rows of 300 took
    a distorted candidate's agreement from 0.79 to 0.90 in the audit's simulation."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = x + rng.normal(scale=0.3, size=x.shape).astype(np.float32)

    def nn(a, b):
        gates = accuracy_gates(embeddings(a), embeddings(b), "feature-extraction", GateConfig())
        return {g.name: g for g in gates}["nn_top1_agreement"]

    once, twice = nn(x, y), nn(np.concatenate([x, x[:100]]), np.concatenate([y, y[:100]]))
    assert twice.value == once.value and twice.ci == once.ci
    near = np.nextafter(x[:100], np.float32(np.inf))  # copies that differ in their last bit
    assert nn(np.concatenate([x, near]), np.concatenate([y, y[:100]])).value == once.value
    assert "nearest other row by cosine (300 distinct)" in twice.detail
    few = nn(np.tile(x[:2], (15, 1)), np.tile(y[:2], (15, 1)))  # 30 rows, 2 distinct
    assert not few.passed and "fewer than the 30 distinct rows it needs" in few.detail


def test_a_cosine_of_exactly_one_on_every_row_is_no_share_of_rows():
    """Identical outputs give a cosine of 1.0 on each row: a measurement, whose interval is
    the bootstrap's (1, 1), not a proportion's Wilson interval (0.89 at 30 rows)."""
    x = np.ones((30, 4), np.float32)
    same = Outputs(["sentence_embedding"], [{"sentence_embedding": x}], [None], rows=30)
    gates = {g.name: g for g in accuracy_gates(same, same, "feature-extraction", GateConfig())}
    assert gates["cosine"].ci == pytest.approx((1.0, 1.0)) and "bootstrap" in gates["cosine"].detail
    assert "Wilson" in gates["nn_top1_agreement"].detail


def _agreeing(rows: int) -> tuple[Outputs, Outputs]:
    """FP32 and a candidate with the same logits on every row, no labels."""
    logits = np.random.default_rng(0).normal(size=(rows, 10)).astype(np.float32)
    same = Outputs(["logits"], [{"logits": logits}], [None], rows=rows)
    return same, same


def test_labels_must_be_class_indices():
    logits = np.random.default_rng(0).normal(size=(40, 10)).astype(np.float32)
    one_off = np.arange(40) % 3
    one_off[7] = 5
    for labels, found, why in (
        (
            np.arange(40) % 10 + 1,
            r"1\.\.10: 4 of 40 rows out of range \(label 10\)",
            "They look 1-based",
        ),
        (np.arange(40) % 10 - 1, r"-1\.\.8: 4 of 40 rows out of range \(label -1\)", "Is this the"),
        (
            np.arange(40) % 20,
            r"0\.\.19: 20 of 40 rows out of range \(label 10, 11, ",
            "Is this the",
        ),
        (
            np.where(one_off == 5, 12, one_off),
            r"0\.\.12: 1 of 40 rows out of range \(label 12\)",
            "Is",
        ),
    ):
        ref = Outputs(["logits"], [{"logits": logits}], [None], labels=labels, rows=40)
        with pytest.raises(
            DataError, match=rf"class indices 0\.\.9 .* found labels {found}.*{why}"
        ):
            check_evaluation(ref, "sequence-classification")


def test_accuracy_gate_with_labels_on_real_sessions(models):
    result, int8 = models
    ev = open_source(None, ModelInfo.from_export(result), role="evaluation")
    ref, cand = collect(result.onnx, ev), collect(int8, ev)
    # the test checkpoint is trained for 5 steps: its answers may not follow the labels yet,
    # and then INT8 is gated on agreement with FP32 as well (labels_at_chance)
    gate, *agreement = accuracy_gates(ref, cand, result.task, GateConfig())
    assert [g.name for g in agreement] == (
        ["top1_agreement", "kl"] if labels_at_chance(ref, "logits") else []
    )
    assert gate.name == "accuracy_drop" and gate.op == "<=" and gate.threshold == 1.0
    assert gate.ci[0] <= gate.value <= gate.ci[1]
    assert "360 labelled rows" in gate.detail
    # FP32 against itself: exactly no drop, and a zero-width interval.
    self_gate, *_ = accuracy_gates(ref, collect(result.onnx, ev), result.task, GateConfig())
    assert self_gate.value == 0 and self_gate.passed
    assert self_gate.ci[0] < 0 < self_gate.ci[1]  # no flip seen: the rows cannot show none


def test_labels_the_model_does_not_follow_do_not_blind_the_accuracy_gate(caplog):
    """Shuffled labels (or labels numbered in another order than the model's classes) put
    FP32 at chance, and INT8 too however broken: a drop of 0, a pass. Random labels on the
    digits model put FP32 at 11.9% and passed an INT8 broken to 9% (exit 0). Such rows are
    gated on agreement with FP32 as well, with a warning; labels the model follows are not."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 10)).astype(np.float32)
    right = x.argmax(-1)
    right[:40] = (right[:40] + 1) % 10  # 90% accurate: a trained model
    broken = rng.normal(size=(400, 10)).astype(np.float32)  # an INT8 that lost everything

    def gates(labels, candidate):
        ref = Outputs(["logits"], [{"logits": x}], [None], labels=labels, rows=400)
        cand = Outputs(["logits"], [{"logits": candidate}], [None], labels=labels, rows=400)
        check_evaluation(ref, "sequence-classification")
        return {
            g.name: g for g in accuracy_gates(ref, cand, "sequence-classification", GateConfig())
        }

    with caplog.at_level(logging.WARNING, logger="quantgate.quantize.gates"):
        followed = gates(right, broken)
    assert set(followed) == {"accuracy_drop"} and not followed["accuracy_drop"].passed
    assert "do not follow" not in caplog.text
    shuffled = rng.permutation(right)
    with caplog.at_level(logging.WARNING, logger="quantgate.quantize.gates"):
        blind = gates(shuffled, broken)
    # both at chance, the drop is noise (it may pass): not what decides
    assert abs(blind["accuracy_drop"].value) < 5
    assert not blind["top1_agreement"].passed and set(blind) == {
        "accuracy_drop",
        "top1_agreement",
        "kl",
    }
    assert "the labels do not follow the model's answers: FP32's own top class is the label on" in (
        caplog.text
    )
    assert "whose labels tell too little (FP32's own top class" in blind["top1_agreement"].detail
    assert gates(shuffled, x)["top1_agreement"].passed  # an INT8 that answers as FP32 passes


def _scored(truth: list[int], predicted: list[int], classes: int = 2) -> Outputs:
    """Rows labelled ``truth`` whose FP32 top class is ``predicted``."""
    logits = np.eye(classes, dtype=np.float32)[np.array(predicted)]
    return Outputs(
        ["logits"], [{"logits": logits}], [None], labels=np.array(truth), rows=len(truth)
    )


def test_a_trained_classifier_on_skewed_or_few_labels_is_not_taken_for_chance():
    """Chance is the agreement beyond what the class shares give (Cohen's kappa), not a high
    accuracy: 98.6% on a 98/2 set was flagged when judged by accuracy against chance
    (96.5% lower bound, 96.7% chance); so was 70% of 40 balanced rows."""
    skewed = _scored([0] * 490 + [1] * 10, [0] * 488 + [1] * 2 + [0] * 5 + [1] * 5)
    assert labels_at_chance(skewed, "logits") is None
    few = _scored([0] * 20 + [1] * 20, [0] * 14 + [1] * 6 + [1] * 14 + [0] * 6)
    assert labels_at_chance(few, "logits") is None
    rng = np.random.default_rng(0)
    shuffled = _scored(list(rng.integers(0, 2, 500)), [0] * 490 + [1] * 10)
    assert "no agreement beyond chance" in labels_at_chance(shuffled, "logits")


def test_labels_of_one_class_do_not_blind_the_accuracy_gate(caplog):
    """Every row labelled class 0 and FP32 right on all of them: an INT8 broken to answer 0
    on every row has no drop. It passed on the accuracy gate alone, where FP32 wrong on two
    rows (or no labels at all) had it gated on agreement with FP32 too, and failed: cleaner
    labels made a weaker gate. Now one class is gated on agreement as well, and said so."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    x[:, 0] += 6  # FP32's top class is 0 on every row; the other scores still say something
    collapsed = np.tile(np.array([10, 0, 0, 0, 0], np.float32), (200, 1))
    ref = Outputs(["logits"], [{"logits": x}], [None], labels=np.zeros(200, int), rows=200)
    cand = Outputs(["logits"], [{"logits": collapsed}], [None], rows=200)
    with caplog.at_level(logging.WARNING, logger="quantgate.quantize.gates"):
        check_evaluation(ref, "sequence-classification")
    assert "every one of the 200 rows is labelled class 0: labels of one class" in caplog.text
    assert "shuffled" not in caplog.text  # not the advice for labels the model does not follow
    gates = {g.name: g for g in accuracy_gates(ref, cand, "sequence-classification", GateConfig())}
    assert gates["accuracy_drop"].value == 0 and gates["accuracy_drop"].passed
    assert not gates["kl"].passed and "labelled class 0" in gates["kl"].detail
    assert labels_at_chance(_scored([0] * 50, [0] * 49 + [1]), "logits") is not None


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


def _logits_moved(gate: GateResult) -> float:
    """The largest logit change a batch_top1_agreement gate's detail reports."""
    return float(gate.detail.split("max logit change ")[1].split(";")[0])


def test_batch_consistency_of_dynamic_int8_against_fp32(models):
    """Dynamic INT8 scales activations per batch: run alone, a row's logits move; FP32's
    do not (beyond float rounding)."""
    result, int8 = models
    ev = open_source(None, ModelInfo.from_export(result), role="evaluation")
    gates = {
        name: batch_consistency(path, ev, result.task, GateConfig())
        for name, path in (("fp32", result.onnx), ("int8", int8))
    }
    assert all(g.name == "batch_top1_agreement" and g.threshold == 0.95 for g in gates.values())
    assert gates["fp32"].value == 1.0 and gates["fp32"].passed
    assert _logits_moved(gates["fp32"]) < 1e-4 < _logits_moved(gates["int8"]), gates
    assert "each of 360 rows run alone vs in a batch (of up to 16, right-padded" in (
        gates["int8"].detail
    )
    # Rows that came padded on the left are batched as the server batches them, on the
    # right: FP32 does not move, whichever side the data was padded on.
    rows = []
    for b in ev.batches():
        ids, mask = b.feeds["input_ids"].copy(), b.feeds["attention_mask"].copy()
        ids[:, 8:], mask[:, 8:] = ids[:, :-8].copy(), 1  # shift right: 8 pads on the left
        ids[:, :8], mask[:, :8] = 0, 0
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": b.labels})
    left = open_source(rows, ModelInfo.from_export(result), role="evaluation")
    moved = batch_consistency(result.onnx, left, result.task, GateConfig())
    assert moved.value == 1.0 and _logits_moved(moved) < 1e-4, moved.detail


def test_batch_consistency_fails_a_model_whose_rows_move_each_other(tmp_path):
    """A model that subtracts the batch's mean (as a per-batch activation scale can): alone
    every row scores 0, 0, 0; in a batch its top class is whichever column it leads in."""
    import onnx
    from onnx import TensorProto, helper

    axes = ["B", "T"]
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Slice", ["f", "zero", "three", "one"], ["f3"]),
         helper.make_node("ReduceMean", ["f3"], ["mean"], axes=[0], keepdims=1),
         helper.make_node("Sub", ["f3", "mean"], ["logits"])],
        "batch-mean",
        [helper.make_tensor_value_info(n, TensorProto.INT64, axes)
         for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 3])],
        [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
         helper.make_tensor("three", TensorProto.INT64, [1], [3]),
         helper.make_tensor("one", TensorProto.INT64, [1], [1])],
    )  # fmt: skip
    path = tmp_path / "batch-mean.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    rng = np.random.default_rng(0)
    rows = [
        {"input_ids": rng.integers(1, 10, (16, 4)), "attention_mask": np.ones((16, 4), np.int64)}
        for _ in range(4)
    ]
    info = ModelInfo(
        tuple(TensorSpec(n, "int64", ("B", "T")) for n in ("input_ids", "attention_mask")),
        "sequence-classification",
        4,
    )
    ev = open_source(rows, info, role="evaluation")
    gate = batch_consistency(path, ev, "sequence-classification", GateConfig())
    assert gate.name == "batch_top1_agreement" and gate.value < 0.6 and not gate.passed


def test_embedding_fidelity_cosine_and_nearest_neighbours():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    ref = Outputs(["sentence_embedding"], [{"sentence_embedding": x}], [None], rows=50)
    near = Outputs(["sentence_embedding"], [{"sentence_embedding": x + 1e-3}], [None], rows=50)
    gates = {g.name: g for g in accuracy_gates(ref, near, "feature-extraction", GateConfig())}
    assert gates["cosine"].value > 0.999 and gates["nn_top1_agreement"].value == 1.0
    assert all(g.passed for g in gates.values())
    lo, hi = gates["cosine"].ci  # resampled rows: the mean of 50 near-1 cosines
    assert lo <= gates["cosine"].value <= hi and hi - lo < 1e-5
    # every row agrees, but 50 rows cannot show an agreement above 0.93 (Wilson)
    assert gates["nn_top1_agreement"].ci == pytest.approx((wilson(50, 50, 0.95)[0], 1.0))
    assert "(worst row 1.00000, best 1.00000)" in gates["cosine"].detail
    assert "on 50 unlabelled rows" in gates["cosine"].detail
    labelled = Outputs(["sentence_embedding"], ref.batches, [None], np.arange(50) % 3, rows=50)
    again = accuracy_gates(labelled, near, "feature-extraction", GateConfig())
    assert [g.value for g in again] == [g.value for g in gates.values()]  # labels change nothing
    assert "on 50 rows (labels unused)" in again[0].detail
    shuffled = Outputs(
        ["sentence_embedding"], [{"sentence_embedding": x[::-1].copy()}], [None], rows=50
    )
    bad = {g.name: g for g in accuracy_gates(ref, shuffled, "feature-extraction", GateConfig())}
    assert not bad["cosine"].passed and not bad["nn_top1_agreement"].passed


def test_a_row_zero_in_fp32_and_the_candidate_agrees_in_every_cosine_gate():
    """A pooled vector of 0s under both models (identical outputs) scored a cosine of 0 in
    the embedding gates (1 in the per-output ones); one that is 0 in FP32 and 1e-7 in the
    candidate scored -1. Both are agreement now; a real vector against FP32's 0 is not."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    x[7] = 0
    ref = Outputs(["sentence_embedding"], [{"sentence_embedding": x}], [None], rows=40)
    gates = {g.name: g for g in accuracy_gates(ref, ref, "feature-extraction", GateConfig())}
    assert gates["cosine"].value == 1 and all(g.passed for g in gates.values()), gates
    y = x.copy()
    y[7] = 1e-7
    cos = row_cosine(x, y)
    assert cos[7] == 1 and (cos > 0.9999).all()
    y[7] = x[0]
    assert row_cosine(x, y)[7] == -1  # FP32 has no direction here; the candidate has one
    x[7] = 1e-9 * x[0]  # negligible, not 0, in FP32 alone: its direction is float noise
    assert row_cosine(x, y)[7] == -1  # it scored the cosine of that noise: 1 here


H = 16  # the tiny embedder's hidden size


def embedder(path: Path, *, outlier: float | None = None, sentence: bool = True) -> Path:
    """A tiny embedding model, x (B, S, K) and attention_mask (B, S): ``last_hidden_state`` =
    x @ w per token; ``sentence_embedding`` = (x mean-pooled over real tokens) @ we, a path
    of its own. ``outlier`` puts one large weight into w, on x's near-silent channel 0: its
    per-tensor INT8 scale then rounds the other weights of w coarsely (the token states are
    damaged), while we, and so the sentence embedding, quantize as well as ever."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx import helper as oh

    rng = np.random.default_rng(0)
    w, we = rng.normal(0, 1, (2, K, H)).astype(np.float32)
    if outlier is not None:
        w[0, 0] = outlier
    consts = {"w": w, "we": we, "axis1": np.array([1]), "axis2": np.array([2])}
    nodes = [
        oh.make_node("MatMul", ["x", "w"], ["last_hidden_state"], name="tokens"),
        oh.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        oh.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        oh.make_node("Mul", ["x", "m3"], ["xm"]),
        oh.make_node("ReduceSum", ["xm", "axis1"], ["total"], keepdims=0),
        oh.make_node("ReduceSum", ["m3", "axis1"], ["count"], keepdims=0),
        oh.make_node("Div", ["total", "count"], ["pooled"]),
        oh.make_node("MatMul", ["pooled", "we"], ["sentence_embedding"], name="sentence"),
    ]
    outputs = [oh.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["B", "S", H])]
    if sentence:
        outputs.append(oh.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["B", H]))
    else:
        nodes = nodes[:1]
    g = oh.make_graph(
        nodes,
        "embedder",
        [
            oh.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K]),
            oh.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"]),
        ],
        outputs,
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    onnx.save(oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    return path


def embedder_rows(batches: int = 6) -> list[dict[str, np.ndarray]]:
    """Batches of 8 rows, every other row padded after 4 of its SEQ tokens; x's channel 0 is
    near silent (what the outlier weight multiplies)."""
    rng = np.random.default_rng(1)
    out = []
    for _ in range(batches):
        x = rng.normal(0, 1, (8, SEQ, K)).astype(np.float32)
        x[..., 0] *= 0.01
        mask = np.ones((8, SEQ), np.int64)
        mask[::2, 4:] = 0
        out.append({"x": x, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def embedder_outputs(tmp_path_factory):
    """(FP32, INT8) outputs over 48 rows of each embedder: dynamic INT8 of a sound one, and of
    one whose token states INT8 damages (``embedder``); and the model without a sentence
    embedding."""
    tmp = tmp_path_factory.mktemp("embedder")
    info = ModelInfo(
        (TensorSpec("x", "float32", ("B", SEQ, K)), TensorSpec("attention_mask", "int64", ("B", SEQ))),
        "feature-extraction",
        SEQ,
    )  # fmt: skip
    ev = open_source(embedder_rows(), info, role="evaluation")
    out = {}
    for kind, kw in (("sound", {}), ("damaged", {"outlier": 200.0}),
                     ("tokens only", {"sentence": False})):  # fmt: skip
        src = embedder(tmp / f"{kind}.onnx", **kw)
        int8 = dynamic_int8(src, tmp / f"{kind}.int8.onnx")
        out[kind] = collect(src, ev), collect(int8, ev)
    return out


def test_an_embedding_int8_is_gated_on_its_token_states_too(embedder_outputs):
    """The server serves last_hidden_state as well: INT8 that damages it fails, however good
    its sentence_embedding is."""
    ref, cand = embedder_outputs["sound"]
    sound = accuracy_gates(ref, cand, "feature-extraction", GateConfig())
    assert [g.name for g in sound] == [
        "cosine", "cosine_tail", "nn_top1_agreement",
        "cosine:last_hidden_state", "cosine_tail:last_hidden_state",
    ]  # fmt: skip
    assert all(g.passed for g in sound)
    tokens = sound[3]
    assert tokens.value > 0.999 and tokens.threshold == GateConfig().min_cosine == 0.99
    assert tokens.ci[0] <= tokens.value <= tokens.ci[1] and not uncertain(tokens)
    assert "vs FP32 on 48 rows; mean cosine per row" in tokens.detail
    assert "95% bootstrap interval over rows (1000 resamples)" in tokens.detail
    upper = accuracy_gates(ref, cand, "feature-extraction", GateConfig(ci_rule="upper"))[3]
    assert upper.passed and upper.ci == tokens.ci  # its lower bound clears 0.99 too
    assert "its lower bound must be >= the threshold" in upper.detail

    ref, cand = embedder_outputs["damaged"]
    damaged = {g.name: g for g in accuracy_gates(ref, cand, "feature-extraction", GateConfig())}
    assert damaged["cosine"].value == pytest.approx(sound[0].value)  # the same sentence path
    assert damaged["cosine"].passed and damaged["nn_top1_agreement"].passed
    bad = damaged["cosine:last_hidden_state"]
    assert not bad.passed and bad.value < 0.95 and bad.ci[1] < 0.99  # clearly, not by chance
    assert "the point estimate must be >= the threshold" in bad.detail
    assert gate_table(list(damaged.values()))[-2].startswith(
        f"| cosine:last_hidden_state | {bad.value:.4f} | [{bad.ci[0]:.4f}, {bad.ci[1]:.4f}] | "
        ">= 0.99 | **FAIL** | vs FP32 on 48 rows; mean cosine per row (worst row "
    )
    # A looser min_cosine for the embedding is a looser one for its token states too; their
    # tail still fails: 7 of the 48 rows are under 0.9.
    loose = {
        g.name: g
        for g in accuracy_gates(ref, cand, "feature-extraction", GateConfig(min_cosine=0.9))
    }
    assert [n for n, g in loose.items() if not g.passed] == ["cosine_tail:last_hidden_state"]
    assert "rows with cosine < 0.95: " in loose["cosine_tail:last_hidden_state"].detail


def test_token_states_are_compared_on_real_tokens_only(embedder_outputs):
    """What INT8 leaves at padded positions does not count in the cosine (masks exclude
    padding); NaN there still fails the gate (``test_cosine_gate_fails_on_nan_in_padding``)."""
    ref, cand = embedder_outputs["sound"]
    noisy = Outputs(cand.names, [], cand.masks, rows=cand.rows)
    for batch, mask in zip(cand.batches, cand.masks, strict=True):
        h = batch["last_hidden_state"].copy()
        h[mask == 0] = 1e3  # garbage, but finite, at every padded position
        noisy.batches.append({**batch, "last_hidden_state": h})
    before = accuracy_gates(ref, cand, "feature-extraction", GateConfig())
    after = accuracy_gates(ref, noisy, "feature-extraction", GateConfig())
    assert [g.value for g in after] == [g.value for g in before]
    assert all(g.passed for g in after)


def test_a_last_hidden_state_gated_mean_pooled_is_gated_per_token_too(embedder_outputs):
    """Without a sentence_embedding output, the embedding gates compare last_hidden_state
    mean-pooled; a client receives it per token, so that is gated as well."""
    ref, cand = embedder_outputs["tokens only"]
    gates = accuracy_gates(ref, cand, "feature-extraction", GateConfig())
    assert [g.name for g in gates] == [
        "cosine", "cosine_tail", "nn_top1_agreement",
        "cosine:last_hidden_state", "cosine_tail:last_hidden_state",
    ]  # fmt: skip
    assert gates[0].detail.startswith("last_hidden_state vs FP32")  # the pooled rows
    assert all(g.passed for g in gates)


def test_a_classifiers_other_float_outputs_are_gated_on_cosine():
    """A classifier that also serves float states: its logits get the accuracy (or top-1 and
    KL) gates, its other float outputs a cosine each; an integer output has no cosine, and
    is gated on exact agreement."""
    rng = np.random.default_rng(0)
    y = np.arange(60) % 10
    x = rng.normal(size=(60, 10)).astype(np.float32)
    x[np.arange(60), y] += 5
    h = rng.normal(size=(60, SEQ, H)).astype(np.float32)
    names = ["logits", "hidden", "predicted"]
    ref = {"logits": x, "hidden": h, "predicted": x.argmax(-1)}
    damaged = {**ref, "hidden": h + rng.normal(scale=0.5, size=h.shape).astype(np.float32)}
    for labels, first in ((y, ["accuracy_drop"]), (None, ["top1_agreement", "kl"])):
        a = Outputs(names, [ref], [None], labels=labels, rows=60)
        gates = accuracy_gates(a, a, "sequence-classification", GateConfig())
        assert [g.name for g in gates] == [
            *first, "agreement:predicted", "cosine:hidden", "cosine_tail:hidden"
        ]  # fmt: skip
        assert all(g.passed for g in gates)
        b = Outputs(names, [damaged], [None], labels=labels, rows=60)
        got = {g.name: g for g in accuracy_gates(a, b, "sequence-classification", GateConfig())}
        assert not got["cosine:hidden"].passed and all(got[n].passed for n in first)


def test_the_tail_gate_fails_what_a_mean_cosine_hides():
    """Three rows in a hundred gone wrong (cosine about 0) cost a mean of 0.9999 only 0.03:
    the mean passes 0.95, the share of rows under tail_cosine does not. A NaN row is one."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 32)).astype(np.float32)
    y = x + rng.normal(scale=0.01, size=x.shape).astype(np.float32)
    y[:3] = rng.normal(size=(3, 32))  # unrelated rows
    cfg = GateConfig(min_cosine=0.95)
    gates = {
        g.name: g for g in accuracy_gates(embeddings(x), embeddings(y), "feature-extraction", cfg)
    }
    assert gates["cosine"].passed and gates["cosine"].value > 0.96
    tail = gates["cosine_tail"]
    assert not tail.passed and tail.value == pytest.approx(0.03) and tail.op == "<="
    assert (tail.threshold, tail.ci) == (0.02, pytest.approx(wilson(3, 100, 0.95)))
    assert "share of rows with cosine < 0.95: 3 of 100; 95% Wilson score interval" in tail.detail
    assert uncertain(tail)  # 3 of 100 against 2%: another sample could pass it
    wide = GateConfig(min_cosine=0.95, max_tail_share=0.05)
    assert {
        g.name: g for g in accuracy_gates(embeddings(x), embeddings(y), "feature-extraction", wide)
    }["cosine_tail"].passed
    # every output's own tail: a NaN row counts as low, like a row pointing elsewhere
    h = np.repeat(x[:, None, :], 4, axis=1)  # (B, T, H)
    g = h.copy()
    g[:3] = np.nan
    ref, cand = (
        Outputs(["h"], [{"h": h}], [None], rows=100),
        Outputs(["h"], [{"h": g}], [None], rows=100),
    )
    got = {r.name: r for r in accuracy_gates(ref, cand, "custom", cfg)}
    assert got["cosine_tail:h"].value == pytest.approx(0.03) and not got["cosine_tail:h"].passed


def test_an_output_of_one_value_per_row_is_gated_on_its_r_squared():
    """A row of one value has a cosine of +-1 whatever the value: a score scaled by 1.5 (a
    regression head, a reranker's relevance) passed at cosine 1.0. R² against FP32 takes
    its place, at 1 - 2 (1 - min_cosine), for a classifier's single logit too."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 1)).astype(np.float32) + 3
    noisy = x + rng.normal(scale=0.05, size=x.shape).astype(np.float32)

    def gates(y, task="custom", name="score", cfg=None):
        a, b = (
            Outputs([name], [{name: x}], [None], rows=100),
            Outputs([name], [{name: y}], [None], rows=100),
        )
        return {g.name: g for g in accuracy_gates(a, b, task, cfg or GateConfig())}

    scaled = gates(x * 1.5)
    assert list(scaled) == ["r2:score"]  # no cosine, no tail
    r2 = scaled["r2:score"]
    assert not r2.passed and r2.value < 0 and r2.threshold == pytest.approx(0.98)
    assert "one value per row: R² of the candidate's values against FP32's" in r2.detail
    good = gates(noisy)["r2:score"]
    assert good.passed and good.ci[0] <= good.value <= good.ci[1] and good.value > 0.99
    assert "FP32's std over the rows 0.962" in good.detail and "barely vary" not in good.detail
    # a head whose value barely moves over the rows (random weights): the detail says so
    still = Outputs(["score"], [{"score": 5 + 1e-5 * x}], [None], rows=100)
    rounded = Outputs(["score"], [{"score": 5 + 1e-5 * noisy}], [None], rows=100)
    (r2,) = accuracy_gates(still, rounded, "custom", GateConfig())
    assert "FP32's values barely vary over these rows (std 9.6" in r2.detail, r2.detail
    assert "against a mean size of 5), and R² weighs the error against that spread" in r2.detail
    flat = Fidelity.measure([({"s": x[:, 0]}, {"s": noisy[:, 0]}, None)], ["s"])  # (batch,)
    assert [g.name for g in flat.gates(min_cosine=0.99) if g.passed] == ["r2:s"]
    strict = gates(noisy, cfg=GateConfig(min_cosine=0.9999))["r2:score"]
    assert strict.threshold == pytest.approx(0.9998) and not strict.passed
    nan = noisy.copy()
    nan[3] = np.nan
    assert not gates(nan)["r2:score"].passed
    logit = gates(x * 1.5, "sequence-classification", "logits")
    assert list(logit) == ["r2"] and not logit["r2"].passed  # not top-1 (1.0) and KL (0)
    assert gates(noisy, "sequence-classification", "logits")["r2"].passed
    fid = Fidelity.measure([({"s": x}, {"s": noisy}, None)], ["s"])
    assert [(g.name, round(g.threshold, 6)) for g in fid.gates(min_cosine=0.999)] == [
        ("r2:s", 0.998)
    ]
    # labelled 0/1: the sign's accuracy, and the value's R² beside it
    labels = (x[:, 0] > 3).astype(np.int64)
    a = Outputs(["logits"], [{"logits": x - 3}], [None], labels=labels, rows=100)
    b = Outputs(["logits"], [{"logits": (x - 3) * 1.5}], [None], labels=labels, rows=100)
    got = {g.name: g for g in accuracy_gates(a, b, "sequence-classification", GateConfig())}
    assert got["accuracy_drop"].passed and not got["r2"].passed  # the same signs, 1.5x values
    # one value per row in every batch, or a cosine: a batch of one-token rows is no score
    h = rng.normal(size=(4, 3))
    mixed = Fidelity.measure(
        [({"h": h[:, :1]}, {"h": h[:, :1]}, None), ({"h": h}, {"h": -h}, None)], ["h"]
    )
    assert [g.name for g in mixed.gates(min_cosine=0.99) if not g.passed] == [
        "cosine:h",
        "cosine_tail:h",
    ]
    few = Fidelity.measure([({"s": x[:1]}, {"s": x[:1]}, None)], ["s"]).gates(min_cosine=0.99)
    assert not few[0].passed and "R² needs 2 rows or more" in few[0].detail


def test_a_token_classifier_is_gated_token_by_token_on_real_tokens():
    """Top-1 agreement and KL per real token (padding is not served as an answer), pooled
    over tokens; the judged logits get no cosine of their own, other outputs do."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12, 5)).astype(np.float32)  # (B, T, classes)
    mask = np.ones((40, 12), np.int64)
    mask[:, 8:] = 0  # 8 real tokens a row
    y = x.copy()
    y[mask == 0] = rng.normal(size=(int((mask == 0).sum()), 5))  # padding: anything
    top = x.argmax(-1)
    y[:4, 0, :] = 0
    y[np.arange(4), 0, (top[:4, 0] + 1) % 5] = 10  # 4 real tokens flipped
    h = rng.normal(size=(40, 6)).astype(np.float32)

    def outputs(logits):
        return Outputs(["logits", "h"], [{"logits": logits, "h": h}], [mask], rows=40)

    gates = {
        g.name: g
        for g in accuracy_gates(outputs(x), outputs(y), "token-classification", GateConfig())
    }
    assert list(gates) == ["token_top1_agreement", "token_kl", "cosine:h", "cosine_tail:h"]
    agree = gates["token_top1_agreement"]
    assert agree.value == pytest.approx(1 - 4 / 320) and agree.passed
    assert agree.ci[0] < agree.value <= agree.ci[1] <= 1
    assert "logits vs FP32 on 320 real tokens of 40 unlabelled rows" in agree.detail
    kl = gates["token_kl"]
    assert kl.value > 0 and kl.ci[0] <= kl.value <= kl.ci[1]
    same = {
        g.name: g
        for g in accuracy_gates(outputs(x), outputs(x), "token-classification", GateConfig())
    }
    assert same["token_top1_agreement"].value == 1 and same["token_kl"].value == pytest.approx(
        0, abs=1e-12
    )
    assert same["token_top1_agreement"].ci[0] < 0.95  # 40 rows that all agree: no proof of 100%
    broken = y.copy()
    broken[5, 2, 0] = np.nan  # a real token's NaN fails it
    bad = {
        g.name: g
        for g in accuracy_gates(outputs(x), outputs(broken), "token-classification", GateConfig())
    }
    assert not bad["token_top1_agreement"].passed and not bad["token_kl"].passed


def test_a_token_classifier_with_token_labels_is_gated_on_its_accuracy_drop():
    """Labels per token (-100 where none, as Hugging Face aligns them): the accuracy drop
    over labelled real tokens, with Tango's interval over the tokens' effective number."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 10, 4)).astype(np.float32)
    x[..., 0] += 3  # FP32 says class 0 everywhere
    mask = np.ones((40, 10), np.int64)
    mask[:, 7:] = 0  # 7 real tokens a row
    tags = np.zeros((40, 10), np.int64)
    tags[:, 0] = -100  # [CLS]: no label
    tags[:, 7:] = 2  # padding's labels do not count either
    y = x.copy()
    y[:3, 1:3, 0] = -9  # 6 labelled tokens newly wrong
    y[30, 5, 0] = -9
    y[30, 0, 0] = -9  # [CLS] flipped: unlabelled, not counted

    def outputs(logits, labels=tags):
        return Outputs(["logits"], [{"logits": logits}], [mask], labels=labels, rows=40)

    got = {
        g.name: g
        for g in accuracy_gates(outputs(x), outputs(y), "token-classification", GateConfig())
    }
    # every labelled token is tag 0: agreement with FP32 is gated beside the accuracy
    assert list(got) == ["token_accuracy_drop", "token_top1_agreement", "token_kl"]
    drop = got["token_accuracy_drop"]
    assert drop.name == "token_accuracy_drop" and drop.op == "<="
    assert drop.value == pytest.approx(100 * 7 / (40 * 6))  # 240 labelled real tokens
    assert "240 labelled tokens of 40 rows, 7 tokens newly wrong, 0 newly right" in drop.detail
    assert drop.ci[0] < drop.value < drop.ci[1] and not drop.passed  # 2.9 points > 1
    assert "over 40 tokens' worth" in drop.detail  # 4 rows flipped: each row counts as one
    same = accuracy_gates(outputs(x), outputs(x), "token-classification", GateConfig())[0]
    assert same.value == 0 and same.passed
    from quantgate.quantize.stats import clustered_paired_interval

    n = np.r_[np.full(100, 20), np.zeros(300)]  # 300 rows without a label do not count
    _, ci, worth = clustered_paired_interval(np.zeros(400), np.zeros(400), n, 0.95)
    assert worth == 100 and ci[1] == pytest.approx(wilson(0, 100, 0.95)[1] * 100, rel=0.05)
    every = clustered_paired_interval(n, np.zeros(400), n, 0.95)  # every token flipped
    assert every[0] == 100 and all(np.isfinite(every[1])) and every[2] == 100
    wrong = tags.copy()
    wrong[0, 1] = 4  # the model has 4 classes
    with pytest.raises(DataError, match="class indices 0..3"):
        check_evaluation(outputs(x, wrong), "token-classification")


@pytest.mark.parametrize(
    "bad", [{"tail_cosine": 1.5}, {"max_tail_share": -0.1}, {"max_tail_share": 2.0}]
)
def test_tail_settings_out_of_range_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        GateConfig(**bad)


def embeddings(x: np.ndarray) -> Outputs:
    return Outputs(["sentence_embedding"], [{"sentence_embedding": x}], [None], rows=len(x))


def logits(x: np.ndarray) -> Outputs:
    return Outputs(["logits"], [{"logits": x}], [None], rows=len(x))


def test_nearest_neighbour_interval_resamples_each_rows_agreement():
    """The interval is that of a proportion over 400 rows, centred on it: the neighbours are
    searched once among all rows (a re-search inside a resample would find a row's drawn
    copy nearest, agree by construction and shift the interval up)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    noisy = x + rng.normal(scale=0.2, size=x.shape).astype(np.float32)
    gates = accuracy_gates(embeddings(x), embeddings(noisy), "feature-extraction", GateConfig())
    cosine, _, nn = gates
    for g in (cosine, nn):
        assert g.ci[0] < g.value < g.ci[1]
    assert "95% bootstrap interval over rows (1000 resamples)" in cosine.detail
    assert "95% Wilson score interval over 400 rows" in nn.detail
    p = nn.value
    assert 0.3 < p < 0.8
    half = 1.96 * np.sqrt(p * (1 - p) / 400)  # the normal approximation of a proportion
    assert (nn.ci[1] - nn.ci[0]) / 2 == pytest.approx(half, rel=0.2)
    assert (nn.ci[0] + nn.ci[1]) / 2 == pytest.approx(p, abs=0.01)
    narrow = accuracy_gates(
        embeddings(x), embeddings(noisy), "feature-extraction", GateConfig(confidence=0.5)
    )[2]
    assert nn.ci[0] < narrow.ci[0] <= p <= narrow.ci[1] < nn.ci[1]


def agreeing(rows: int, disagree: int) -> tuple[Outputs, Outputs]:
    """Logits of FP32 and a candidate whose top-1 class differs on ``disagree`` of ``rows``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 10)).astype(np.float32)
    top = x.argmax(-1)
    x[np.arange(rows), top] += 3  # a clear top class
    y = x + rng.normal(scale=0.05, size=x.shape).astype(np.float32)
    y[np.arange(disagree), (top[:disagree] + 1) % 10] += 10  # another class on top
    return logits(x), logits(y)


def test_a_threshold_inside_the_interval_is_decided_by_ci_rule_and_said_to_be_uncertain():
    """380 of 400 rows agree: 0.95 against a 0.95 threshold, an interval of about +-0.02."""
    ref, cand = agreeing(400, 20)

    def top1(**cfg):
        gates = accuracy_gates(ref, cand, "sequence-classification", GateConfig(**cfg))
        return next(g for g in gates if g.name == "top1_agreement")

    at = top1(min_top1_agreement=0.95)
    assert at.value == pytest.approx(0.95) and at.ci[0] < 0.95 < at.ci[1]
    assert at.passed and uncertain(at)
    assert at.detail.endswith(
        "; the point estimate must be >= the threshold: it passes by less than its 95% "
        "interval, within the measurement's uncertainty"
    )
    below = top1(min_top1_agreement=0.955)
    assert not below.passed and uncertain(below)
    assert "it fails by less than its 95% interval" in below.detail
    clear = top1(min_top1_agreement=0.8)
    assert clear.passed and not uncertain(clear) and "by less than" not in clear.detail
    conservative = top1(min_top1_agreement=0.95, ci_rule="upper")  # the lower bound decides
    assert not conservative.passed and conservative.ci == at.ci
    assert not uncertain(conservative)  # failed by the rule chosen, not by the sample drawn
    assert conservative.detail.endswith(
        "; its lower bound must be >= the threshold: the point estimate passes, its lower "
        "bound does not"
    )
    assert top1(min_top1_agreement=0.9, ci_rule="upper").passed  # clear of its lower bound

    # KL, a <= gate: its upper bound decides under "upper".
    kl = next(g for g in accuracy_gates(ref, cand, "sequence-classification", GateConfig())
              if g.name == "kl")  # fmt: skip
    assert kl.ci[0] < kl.value < kl.ci[1]
    inside = (kl.value + kl.ci[1]) / 2
    gates = {
        rule: next(
            g for g in accuracy_gates(
                ref, cand, "sequence-classification", GateConfig(max_kl=inside, ci_rule=rule)
            ) if g.name == "kl"
        )
        for rule in ("point", "upper")
    }  # fmt: skip
    assert gates["point"].passed and "it passes by less than its 95%" in gates["point"].detail
    assert not gates["upper"].passed
    assert "its upper bound must be <= the threshold: the point estimate passes" in (
        gates["upper"].detail
    )


def test_an_accuracy_drop_inside_its_interval_is_said_to_be_uncertain():
    y = np.arange(400) % 10
    x = np.eye(10, dtype=np.float32)[y] * 5  # FP32 right on every row
    z = x.copy()
    z[:3] = np.roll(z[:3], 1, axis=1)  # 3 rows newly wrong: 0.75 points
    ref = Outputs(["logits"], [{"logits": x}], [None], labels=y, rows=400)
    cand = Outputs(["logits"], [{"logits": z}], [None], labels=y, rows=400)
    (drop,) = accuracy_gates(ref, cand, "sequence-classification", GateConfig())
    assert drop.value == pytest.approx(0.75) and drop.ci[0] < 1.0 < drop.ci[1]
    assert drop.passed and "it passes by less than its 95% interval" in drop.detail
    (strict,) = accuracy_gates(ref, cand, "sequence-classification", GateConfig(ci_rule="upper"))
    assert not strict.passed and "its upper bound must be <= the threshold" in strict.detail


def test_nearest_neighbours_do_not_depend_on_the_block_size(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    noisy = x + rng.normal(scale=0.5, size=x.shape).astype(np.float32)
    ref = Outputs(["sentence_embedding"], [{"sentence_embedding": x}], [None], rows=50)
    cand = Outputs(["sentence_embedding"], [{"sentence_embedding": noisy}], [None], rows=50)

    def agreement():
        out = accuracy_gates(ref, cand, "feature-extraction", GateConfig())
        return next(g.value for g in out if g.name == "nn_top1_agreement")

    whole = agreement()  # one block of 50 x 50
    monkeypatch.setattr("quantgate.quantize.gates.NN_BLOCK", 7 * 50)  # blocks of 7 rows
    assert agreement() == whole and 0 < whole < 1


def test_cosine_of_an_output_is_the_fp16_fidelity_metric(tmp_path):
    """``cosine:<output>`` means one thing, whether the INT8 or the FP16 gates report it."""
    src = mlp(tmp_path / "mlp.onnx")
    int8 = dynamic_int8(src, tmp_path / "int8.onnx")
    info = ModelInfo((TensorSpec("x", "float32", ("B", SEQ, K)),), "custom", SEQ)
    ev = open_source(mlp_feeds(4), info, role="evaluation")
    out = accuracy_gates(collect(src, ev), collect(int8, ev), "custom", GateConfig())
    fid = fp16.fidelity(src, int8, ev(), precision="int8").gates(min_cosine=GateConfig().min_cosine)
    assert {g.name: g.value for g in out} == pytest.approx({g.name: g.value for g in fid})
    assert [g.name for g in out][:2] == ["cosine:y", "cosine_tail:y"]
    for g, f in zip(out, fid, strict=True):  # the same interval over the same rows
        assert g.ci == pytest.approx(f.ci) and g.ci[0] <= g.value <= g.ci[1]
        assert g.provider is None
    assert "worst row" in out[0].detail and "rows with cosine < 0.95: 0 of 8" in out[1].detail
    # The same words, but for where the candidate ran (the FP16 gates' own provider).
    assert [g.detail for g in out] == [
        g.detail.replace(", CPUExecutionProvider;", ";") for g in fid
    ]


def test_cosine_gate_fails_on_nan_in_padding_that_a_client_receives():
    """Padded positions do not count in the cosine, but the server returns them: a NaN there
    makes a masked mean, ``(h * mask).sum(1)``, NaN. The gate counts the whole output."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 8)).astype(np.float32)  # (B, T, H)
    mask = np.ones((4, 5), np.int64)
    mask[:, 3:] = 0
    y = x.copy()
    y[0, 4] = np.nan  # one padded position of row 0: 8 values
    ref = Outputs(["h"], [{"h": x}], [mask], rows=4)
    cand = Outputs(["h"], [{"h": y}], [mask], rows=4)
    gate, tail = accuracy_gates(ref, cand, "custom", GateConfig())
    assert gate.name == "cosine:h" and gate.value == pytest.approx(1.0)
    assert not gate.passed and ", 8 non-finite values;" in gate.detail
    assert "by less than" not in gate.detail  # NaN fails it, not the interval
    assert tail.name == "cosine_tail:h" and tail.value == 0  # no row's real tokens moved


def test_mean_abs_error_is_over_real_positions_not_padding():
    x = np.zeros((2, 4, 3), np.float32)  # (B, T, H)
    y = x + 0.5  # every value off by 0.5, padding too
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    fid = Fidelity.measure([({"h": x}, {"h": y}, mask)], ["h"])
    assert fid.mean_abs_diff["h"] == pytest.approx(0.5) and fid.max_abs_diff["h"] == 0.5


def test_gate_table_names_the_configured_confidence():
    rows = gate_table([GateResult("accuracy_drop", 0.3, 1.0, "<=", True, ci=(0.0, 0.6))], 0.9)
    assert "| 90% interval |" in rows[0] and "[0.0000, 0.6000]" in rows[2]


def test_gate_config_from_a_directory_says_it_is_one(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory; gate settings") as e:
        GateConfig.from_file(tmp_path)
    # a library caller typed no flag: the file is named, not --gate-config (the CLI's)
    assert str(e.value).startswith(f"{tmp_path}: ")


def test_gate_config_from_files_and_flags(tmp_path):
    (tmp_path / "g.toml").write_text("[gates]\nmax_accuracy_drop = 0.5\nbatch_sizes = [1, 4]\n")
    cfg = GateConfig.from_file(tmp_path / "g.toml", min_speedup=1.5, min_cosine=None)
    assert (cfg.max_accuracy_drop, cfg.batch_sizes, cfg.min_speedup) == (0.5, (1, 4), 1.5)
    assert cfg.min_cosine == GateConfig().min_cosine
    (tmp_path / "g.json").write_text('{"min_top1_agreement": 0.9, "provider": "cuda"}')
    from_json = GateConfig.from_file(tmp_path / "g.json")
    assert from_json.min_top1_agreement == 0.9
    assert from_json.provider == "CUDAExecutionProvider"  # spelled as --device spells it
    (tmp_path / "bad.json").write_text('{"min_speedp": 2}')
    with pytest.raises(ConfigError) as e:
        GateConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ConfigError) as made:
        GateConfig(min_speedp=2)
    # one mistake, one wording, whether a file or a keyword made it: only who leads differs
    said = "unknown field 'min_speedp' (did you mean 'min_speedup'?)"
    assert str(e.value).startswith(f"{tmp_path / 'bad.json'}: {said}; GateConfig's fields: ")
    assert str(made.value).startswith(f"GateConfig: {said}; its fields: ")
    assert str(e.value).split(" fields: ")[1] == str(made.value).split(" fields: ")[1]
    # the CLI flag's name for a setting, and a wrong type beside it: both said at once
    (tmp_path / "flag.toml").write_text('min_top1 = 0.9\nmin_speedup = "1.3"\n')
    with pytest.raises(ConfigError) as e:
        GateConfig.from_file(tmp_path / "flag.toml")
    assert "unknown field 'min_top1' (did you mean 'min_top1_agreement'?)" in str(e.value)
    assert "min_speedup = '1.3': expected a number" in str(e.value)
    (tmp_path / "gates.yaml").write_text("min_speedup: 1.3\n")
    with pytest.raises(
        ConfigError, match="a .yaml file; gate settings are read from .toml or .json"
    ):
        GateConfig.from_file(tmp_path / "gates.yaml")
    with pytest.raises(ConfigError, match="min_speedup 0.0: expected a finite number > 0"):
        GateConfig(min_speedup=0)
    with pytest.raises(ConfigError, match="iterations 2: expected >= 3") as e:
        GateConfig(iterations=2, eval_samples=0)
    assert "eval_samples 0: expected >= 1" in str(e.value)
    (tmp_path / "types.toml").write_text(
        'min_speedup = "1.5"\nbatch_sizes = [1, "32"]\niterations = 7.5\neval_samples = 200\n'
    )
    with pytest.raises(ConfigError) as e:
        GateConfig.from_file(tmp_path / "types.toml")
    for words in ("min_speedup = '1.5': expected a number", "batch_sizes = [1, '32']: expected a tuple (or list) of whole numbers", "iterations = 7.5: expected a whole number"):  # fmt: skip
        assert words in str(e.value), str(e.value)
    assert "eval_samples" not in str(e.value)  # an int where the default is None is right


def test_non_finite_logits_fail_the_accuracy_gate_whatever_argmax_picks():
    """NaN logits argmax to class 0: on rows labelled 0 they used to count as right."""
    rng = np.random.default_rng(0)
    y = np.arange(200) % 10
    x = rng.normal(size=(200, 10)).astype(np.float32)
    x[np.arange(200), y] += 5  # FP32 right on every row
    nan = x.copy()
    nan[y == 0] = np.nan  # 20 rows, all labelled 0
    ref = Outputs(["logits"], [{"logits": x}], [None], labels=y, rows=200)
    cand = Outputs(["logits"], [{"logits": nan}], [None], labels=y, rows=200)
    (gate,) = accuracy_gates(ref, cand, "sequence-classification", GateConfig())
    assert not gate.passed and gate.value == pytest.approx(10.0)
    assert "20 rows with non-finite INT8 logits" in gate.detail
    ref.labels = cand.labels = None  # without labels: top-1 agreement counts them as disagreeing
    gates = {g.name: g for g in accuracy_gates(ref, cand, "sequence-classification", GateConfig())}
    assert gates["top1_agreement"].value == pytest.approx(0.9) and not gates["kl"].passed


def test_repeated_rows_are_refused_before_anything_is_measured():
    """100 copies of one text: the nearest-neighbour gate "failed" (exit 3, the bundle marked
    failed) for a reason only report.md told; a data problem is refused as one, before any
    candidate is measured."""
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    rows = np.repeat(x, 25, axis=0)  # 100 rows, 4 distinct
    out = Outputs(["sentence_embedding"], [{"sentence_embedding": rows}], [None], rows=100)
    with pytest.raises(DataError, match=r"has 100 rows but only 4 distinct ones.* at least 30"):
        check_evaluation(out, "feature-extraction")


def test_too_few_evaluation_rows_cannot_pass_the_gates():
    """With 2 rows each row's nearest other row is the other one: agreement 1.0 by design."""
    rng = np.random.default_rng(0)
    for task, name, rows in (("feature-extraction", "sentence_embedding", 2),
                             ("sequence-classification", "logits", 10)):  # fmt: skip
        x = rng.normal(size=(rows, 10)).astype(np.float32)
        out = Outputs([name], [{name: x}], [None], labels=np.zeros(rows, np.int64), rows=rows)
        with pytest.raises(DataError, match=rf"has {rows} row\(s\).* at least 30"):
            check_evaluation(out, task)
    x = rng.normal(size=(30, 10)).astype(np.float32)
    out = Outputs(["logits"], [{"logits": x}], [None], labels=np.zeros(30, np.int64), rows=30)
    assert accuracy_gates(out, out, "sequence-classification", GateConfig())[0].passed


def test_gate_config_refuses_settings_it_would_ignore_or_never_pass(tmp_path):
    # threads -1 ran on ONNX Runtime's default, and the manifest recorded -1 as the setting
    with pytest.raises(ConfigError, match="threads -1: expected >= 0"):
        GateConfig(threads=-1)
    # a byte-order mark, as Windows editors save one: "Invalid statement (at line 1,
    # column 1)" for a line reading min_speedup = 1.1, or "decode using utf-8-sig"
    for suffix, text in ((".toml", "min_speedup = 1.1\r\n"), (".json", '{"min_speedup": 1.1}')):
        (tmp_path / f"bom{suffix}").write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert GateConfig.from_file(tmp_path / f"bom{suffix}").min_speedup == 1.1
    (tmp_path / "latin.toml").write_bytes("# caf\xe9\nmin_speedup = 1.1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 \(byte 0xe9 at offset 5\); save it as UTF-8"):
        GateConfig.from_file(tmp_path / "latin.toml")
    (tmp_path / "mixed.toml").write_text("iterations = 3\n[gates]\nwarmup = 1\n")
    with pytest.raises(ConfigError, match=r"both in a \[gates\] table and outside it"):
        GateConfig.from_file(tmp_path / "mixed.toml")
    for setting in ("max_accuracy_drop", "min_speedup", "max_kl"):
        with pytest.raises(ConfigError, match=f"{setting} nan"):
            GateConfig(**{setting: float("nan")})
        # the manifest (JSON) could not record it: a re-gate would read the default back
        with pytest.raises(ConfigError, match=f"{setting} inf: expected a finite number"):
            GateConfig(**{setting: float("inf")})
    (tmp_path / "inf.toml").write_text("max_kl = inf\n")
    with pytest.raises(ConfigError, match="max_kl inf"):
        GateConfig.from_file(tmp_path / "inf.toml")
    with pytest.raises(ConfigError, match="max_kl -0.1: expected a finite number >= 0"):
        GateConfig(max_kl=-0.1)


def test_labels_an_embedding_cannot_use_are_warned_about_once_not_per_candidate(caplog):
    x = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    ref = Outputs(["sentence_embedding"], [{"sentence_embedding": x}], [None],
                  labels=np.zeros(40, np.int64), rows=40)  # fmt: skip
    with caplog.at_level("WARNING", logger="quantgate.quantize.gates"):
        check_evaluation(ref, "feature-extraction")  # the search, once before its candidates
        for _ in range(3):
            accuracy_gates(ref, ref, "feature-extraction", GateConfig())
    assert caplog.text.count("labels ignored") == 1


def test_a_gate_over_some_nan_rows_reports_the_mean_of_the_others_and_fails():
    """KL over logits of which one row is NaN: the value is the finite rows' mean (the
    manifest can hold it, a reader learns how far the rest are), the gate fails."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    y = x.copy()
    y[2] = np.nan
    ref = Outputs(["logits"], [{"logits": x}], [None], rows=40)
    cand = Outputs(["logits"], [{"logits": y}], [None], rows=40)
    gates = {g.name: g for g in accuracy_gates(ref, cand, "sequence-classification", GateConfig())}
    assert gates["kl"].value == pytest.approx(0.0, abs=1e-9) and not gates["kl"].passed
    assert gates["kl"].ci is None


def test_labels_for_a_model_that_did_not_say_it_classifies_are_refused(caplog):
    """A user's module of task "custom" returning (batch, 3) scores, given labelled rows:
    the accuracy gate would silently give way to per-output cosines. Refused, with the fix;
    an embedding model's labels are ignored with a word, as before."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 3)).astype(np.float32)
    ref = Outputs(["output_0"], [{"output_0": scores}], [None], labels=np.arange(40) % 3, rows=40)
    with pytest.raises(DataError, match=r"the model's task is 'custom' and no output is named"):
        check_evaluation(ref, "custom")
    with caplog.at_level("WARNING", logger="quantgate.quantize.gates"):
        check_evaluation(ref, "feature-extraction")
    assert "labels ignored: the model (task feature-extraction) has no output of class" in (
        caplog.text
    )
    # an output quantgate knows as an embedding by its name is judged as one, task or not
    emb = Outputs(["sentence_embedding"], [{"sentence_embedding": scores}], [None],
                  labels=np.arange(40) % 3, rows=40)  # fmt: skip
    check_evaluation(emb, "custom")


def test_the_output_named_logits_is_the_one_judged_as_logits():
    """A user's model returning (embedding, logits): the top-1 gate must judge the logits,
    not the embedding that comes first, and the embedding gets a cosine gate of its own."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    logits = rng.normal(size=(60, 3)).astype(np.float32)
    flipped = logits[:, ::-1].copy()  # the top class moves on most rows
    ref = Outputs(["embedding", "logits"], [{"embedding": emb, "logits": logits}], [None], rows=60)
    cand = Outputs(
        ["embedding", "logits"], [{"embedding": emb, "logits": flipped}], [None], rows=60
    )
    gates = {g.name: g for g in accuracy_gates(ref, cand, "sequence-classification", GateConfig())}
    assert not gates["top1_agreement"].passed and gates["top1_agreement"].value < 0.6
    assert gates["cosine:embedding"].passed


_ROWS, _T = 40, 5
_SHAPES = {
    "2d": (_ROWS, 3), "3d": (_ROWS, _T, 4), "emb": (_ROWS, 8), "lhs": (_ROWS, _T, 8),
    "tokens": (_ROWS, _T),
}  # fmt: skip


@pytest.mark.parametrize(
    ("task", "outputs", "kind", "judged"),
    [
        ("sequence-classification", {"emb": "emb", "logits": "2d"}, Kind.CLASSIFIER, "logits"),
        ("sequence-classification", {"scores": "2d", "pooled": "emb"}, Kind.CLASSIFIER, "scores"),
        ("custom", {"logits": "2d"}, Kind.CLASSIFIER, "logits"),  # named so, task or not
        ("custom", {"logits": "3d"}, Kind.OTHER, None),  # no (batch, classes) logits
        ("token-classification", {"hidden": "lhs", "logits": "3d"},
         Kind.TOKEN_CLASSIFIER, "logits"),
        ("token-classification", {"tags": "3d"}, Kind.TOKEN_CLASSIFIER, "tags"),
        ("token-classification", {"tags": "3d", "logits": "2d"}, Kind.CLASSIFIER, "logits"),
        ("multi-label-classification", {"sentence_embedding": "emb", "logits": "2d"},
         Kind.MULTI_LABEL, "logits"),
        ("feature-extraction", {"last_hidden_state": "lhs"}, Kind.EMBEDDING, "last_hidden_state"),
        ("feature-extraction", {"last_hidden_state": "lhs", "sentence_embedding": "emb"},
         Kind.EMBEDDING, "sentence_embedding"),
        ("custom", {"sentence_embedding": "emb"}, Kind.EMBEDDING, "sentence_embedding"),
        ("custom", {"last_hidden_state": "lhs"}, Kind.OTHER, None),  # tokens of what model?
        ("question-answering", {"start_logits": "tokens", "end_logits": "tokens"},
         Kind.QUESTION_ANSWERER, "start_logits"),
        ("custom", {"start_logits": "tokens", "end_logits": "tokens"}, Kind.OTHER, None),
        ("question-answering", {"start": "tokens", "end": "tokens"}, Kind.OTHER, None),
        ("feature-extraction", {"ids": "ids"}, Kind.OTHER, None),
    ],
)  # fmt: skip
def test_a_models_kind_is_read_from_its_outputs_and_task(task, outputs, kind, judged):
    """Which gates a model gets: its kind, and the output they judge."""
    batch = {
        name: np.zeros((_ROWS, _T), np.int64) if shape == "ids" else np.zeros(_SHAPES[shape])
        for name, shape in outputs.items()
    }
    assert kind_of(Outputs(list(outputs), [batch], [None], rows=_ROWS), task) == Judged(
        kind, judged
    )


def test_the_batch_gate_judges_the_output_the_accuracy_gates_judge(tmp_path):
    """A model said to tag tokens whose 2-D output is named "logits" (beside a per-token
    one) is judged as a classifier by its accuracy gates: its batch gate judges the same
    logits, as a classifier's, not the per-token output it never ran alone."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Slice", ["f", "zero", "three", "one"], ["logits"]),
         helper.make_node("Unsqueeze", ["f", "two"], ["f3"]),
         helper.make_node("Mul", ["f3", "w"], ["tags"])],
        "two-kinds",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "T"])
         for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 3]),
         helper.make_tensor_value_info("tags", TensorProto.FLOAT, ["B", "T", 4])],
        [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
         helper.make_tensor("three", TensorProto.INT64, [1], [3]),
         helper.make_tensor("one", TensorProto.INT64, [1], [1]),
         helper.make_tensor("two", TensorProto.INT64, [1], [2]),
         helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 4], [1, -1, 2, 0.5])],
    )  # fmt: skip
    path = tmp_path / "two-kinds.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    rng = np.random.default_rng(0)
    rows = [
        {"input_ids": rng.integers(1, 10, (8, 5)), "attention_mask": np.ones((8, 5), np.int64)}
        for _ in range(4)
    ]
    task = "token-classification"
    info = ModelInfo(
        tuple(TensorSpec(n, "int64", ("B", "T")) for n in ("input_ids", "attention_mask")), task, 5
    )
    ev = open_source(rows, info, role="evaluation")
    ref = collect(path, ev)
    assert [g.name for g in accuracy_gates(ref, ref, task, GateConfig())][:2] == [
        "top1_agreement",
        "kl",
    ]
    gate = batch_consistency(path, ev, task, GateConfig())
    assert gate.name == "batch_top1_agreement" and gate.detail.startswith("logits: ")
    assert gate.value == 1.0 and gate.passed


def test_a_runtime_failure_is_not_read_as_bad_data(tmp_path):
    """Feeds that passed check_feeds and still make ONNX Runtime fail: an invalid argument
    (a dtype the graph does not take) is the data's fault, a DataError; a kernel failing
    (a Reshape that cannot be done) is the runtime's, a QuantizeFailed naming the provider,
    which exits 1 (not 2, "your input")."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh

    from quantgate.errors import QuantizeFailed, exit_code

    def model(dtype, path):
        x = oh.make_tensor_value_info("x", dtype, ["batch", "n"])
        y = oh.make_tensor_value_info("y", dtype, None)
        shape = oh.make_tensor("shape", TensorProto.INT64, [2], [-1, 7])
        graph = oh.make_graph(
            [oh.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y], [shape]
        )
        onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), path)
        return path

    info = ModelInfo((TensorSpec("x", "float32", ("batch", "n")),), "fill-mask", 0)
    data = open_source({"x": np.zeros((4, 5), np.float32)}, info, role="evaluation")
    with pytest.raises(
        QuantizeFailed, match=r"ONNX Runtime failed running f\.onnx on CPU.*Reshape"
    ) as e:
        collect(model(TensorProto.FLOAT, tmp_path / "f.onnx"), data)
    assert exit_code(e.value) == 1
    with pytest.raises(DataError) as bad:
        collect(model(TensorProto.INT64, tmp_path / "i.onnx"), data)
    assert exit_code(bad.value) == 2
    unknown = oh.make_graph([oh.make_node("NoSuchOp", ["x"], ["y"])], "g",
                            [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
                            [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)])  # fmt: skip
    onnx.save(oh.make_model(unknown, opset_imports=[oh.make_opsetid("", 17)]), tmp_path / "u.onnx")
    with pytest.raises(QuantizeFailed, match=r"ONNX Runtime cannot open u\.onnx on CPU.*NoSuchOp"):
        collect(tmp_path / "u.onnx", data)  # not a traceback: the session's opening too
    with pytest.raises(DataError, match=r"i\.onnx failed on a batch of .*INVALID_ARGUMENT"):
        collect(model(TensorProto.INT64, tmp_path / "i.onnx"), data)


def test_r_squared_has_no_interval_where_undefined_resamples_reach_its_tail():
    """Three rows of 40 hold a value, the rest 0: 4.4% of resamples draw none of them, where
    FP32 is constant and R² undefined. They were dropped and the rest gave a lower bound
    near 1; counted as the worst, the lower end is undefined, so there is no interval."""
    x = np.zeros(40)
    x[:3] = 1.0
    y = x + np.random.default_rng(0).normal(scale=1e-4, size=40)
    gate = r2_gate("r2", x, y, 0.99, GateConfig(), "a two-valued score")
    assert gate.value > 0.99 and gate.ci is None and gate.passed  # by its value
    strict = r2_gate("r2", x, y, 0.99, GateConfig(ci_rule="upper"), "a two-valued score")
    assert not strict.passed and "it has no interval" in strict.detail  # no bound to pass on
    many = np.arange(40.0)
    assert r2_gate("r2", many, many + 0.01, 0.99, GateConfig(), "a score").ci is not None


def test_a_near_tie_between_two_neighbours_is_no_disagreement():
    """Sentences with two near-duplicate neighbours: FP32 puts them 0.002 apart, and the
    candidate's per-row error (cosine 0.9999 to FP32) turns which is nearest. That counted as
    a disagreement and failed sound models on same-domain text; a swap between neighbours
    FP32 puts far apart still does."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 32))
    x = np.concatenate([base, base + 0.05 * rng.normal(size=base.shape)])  # 40 rows, pairs
    x = np.concatenate([x, base + 0.051 * rng.normal(size=base.shape)])  # a third, as near
    y = x + 0.02 * rng.normal(size=x.shape)  # enough to swap near ties, not far neighbours
    ref, cand = (Outputs(["sentence_embedding"], [{"sentence_embedding": v}], [None], rows=60)
                 for v in (x, y))  # fmt: skip
    gates = {g.name: g for g in accuracy_gates(ref, cand, "feature-extraction", GateConfig())}
    nn = gates["nn_top1_agreement"]
    ties = int(re.search(r"a near tie; (\d+) row", nn.detail).group(1))
    assert nn.value == 1.0 and ties > 0, nn.detail  # agreeing, some only by a near tie
    strict = accuracy_gates(ref, cand, "feature-extraction", GateConfig(min_cosine=0.99999))
    assert {g.name: g for g in strict}["nn_top1_agreement"].value < 1  # no tie that close


def test_an_integer_output_is_gated_on_exact_agreement_not_on_its_values():
    """A predicted class index beside the logits: an R² (or a cosine) of indices says how
    far 3 is from 7. Its gate is the share of rows FP32 and the candidate give the same
    index, with Wilson's interval; the logits keep their own gates."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(100, 5)).astype(np.float32)
    pred = logits.argmax(1)
    moved = pred.copy()
    moved[:8] = (moved[:8] + 1) % 5  # 8 rows of 100 predicted otherwise

    def gates(p):
        a = Outputs(["logits", "pred"], [{"logits": logits, "pred": pred}], [None], rows=100)
        b = Outputs(["logits", "pred"], [{"logits": logits, "pred": p}], [None], rows=100)
        return {g.name: g for g in accuracy_gates(a, b, "custom", GateConfig())}

    same = gates(pred)
    assert "r2:pred" not in same and "cosine:pred" not in same
    assert same["agreement:pred"].value == 1 and same["agreement:pred"].passed
    low, high = same["agreement:pred"].ci
    assert 0.95 < low < 1 and high == pytest.approx(1)  # 100 of 100: Wilson's, not a point
    worse = gates(moved)["agreement:pred"]
    assert worse.value == pytest.approx(0.92) and not worse.passed  # under min_top1 0.95
    assert "rows whose pred is exactly FP32's (92)" in worse.detail


def test_a_per_token_integer_output_is_compared_at_real_tokens_only():
    """A tagger's predicted tag per token (its graph names the sequence axis for its second,
    as ``collect`` reads it): what FP32 and INT8 make of the padding differs, and is no
    answer; only the real tokens count."""
    rng = np.random.default_rng(2)
    tags = rng.integers(0, 5, size=(40, 12))
    mask = (np.arange(12)[None] < rng.integers(3, 12, 40)[:, None]).astype(np.int64)
    noisy = np.where(mask == 1, tags, rng.integers(0, 5, size=tags.shape))  # padding differs

    def agreement(y):
        a = Outputs(["tags"], [{"tags": tags}], [mask], rows=40, along_sequence=frozenset({"tags"}))
        b = Outputs(["tags"], [{"tags": y}], [mask], rows=40)
        return {g.name: g for g in accuracy_gates(a, b, "custom", GateConfig())}["agreement:tags"]

    assert agreement(noisy).value == 1
    moved = noisy.copy()
    moved[0, 0] = (moved[0, 0] + 1) % 5  # a real token of one row
    assert agreement(moved).value == pytest.approx(39 / 40)


def test_a_rows_integer_values_as_many_as_its_tokens_are_all_compared():
    """Top-k ids (batch, k) are a row's k values, whatever the batch's padded length: where
    k happened to equal it, the ids at "padded" columns were excused, and an INT8 agreeing
    on no row passed at 1.0. Only a width that follows the batches' lengths, or a graph that
    says so, makes an output per token."""
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 50, size=(40, 5))
    other = ids.copy()
    other[:, 4] += 1  # every row's last id moved
    mask = np.ones((40, 5), np.int64)
    mask[:, 3:] = 0  # padded to 5: 3 real tokens a row

    def agreement(x, y, masks, **kw):
        a = Outputs(["topk"], [{"topk": v} for v in x], masks, rows=40, **kw)
        b = Outputs(["topk"], [{"topk": v} for v in y], masks, rows=40)
        return {g.name: g for g in accuracy_gates(a, b, "custom", GateConfig())}["agreement:topk"]

    assert agreement([ids], [other], [mask]).value == 0
    two = [mask[:20], mask[20:, :4]]  # two batches padded to 5 and 4: k stays 5
    assert agreement([ids[:20], ids[20:]], [other[:20], other[20:]], two).value == 0
    # a tagger's tags follow the batches' lengths: per token, padding excused
    tags = [ids[:20], ids[20:, :4]]
    moved = [other[:20], other[20:, :4]]
    assert agreement(tags, moved, two).value == 1


def test_a_candidate_with_a_nan_score_fails_its_agreement_gates_saying_why():
    """One NaN among 200 rows: the KL's mean over the other rows was shown (0.0) beside a
    FAIL whose detail said only "max abs nan"; the detail now names the rows."""
    x = np.random.default_rng(1).normal(size=(200, 5)).astype(np.float32)
    y = x.copy()
    y[0, 0] = np.nan
    ref = Outputs(["logits"], [{"logits": x}], [None], rows=200)
    cand = Outputs(["logits"], [{"logits": y}], [None], rows=200)
    gates = {g.name: g for g in accuracy_gates(ref, cand, "sequence-classification", GateConfig())}
    assert not gates["top1_agreement"].passed and not gates["kl"].passed
    for gate in gates.values():
        assert "1 rows with non-finite candidate scores (any fails)" in gate.detail, gate.detail
    assert "1 of 200 rows not finite, left out of the mean" in gates["kl"].detail


def test_a_multi_label_classifier_is_gated_on_its_decisions_and_its_scores_cosine():
    """A sigmoid per label, judged as a softmax classifier: scores all shifted down by one
    kept every row's top label and softmax (top-1 agreement 1, KL 0) and turned off labels
    on most rows. Its decisions (a score above 0) and its scores' cosine are gated."""
    x = np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32)
    ref = Outputs(["logits"], [{"logits": x}], [None], rows=200)
    task = "multi-label-classification"

    def gates(y):
        cand = Outputs(["logits"], [{"logits": y}], [None], rows=200)
        return {g.name: g for g in accuracy_gates(ref, cand, task, GateConfig())}

    shifted = gates(x - 1)
    assert set(shifted) == {"decision_agreement", "cosine:logits", "cosine_tail:logits"}
    assert not shifted["decision_agreement"].passed and shifted["decision_agreement"].value < 0.5
    assert "rows of 5 labels: rows whose every label is on or off as FP32's" in (
        shifted["decision_agreement"].detail
    )
    scaled = gates(x * 1.5)  # every decision kept, the scores' direction too
    assert all(g.passed for g in scaled.values()), scaled
    softmax = {g.name: g for g in accuracy_gates(
        ref, Outputs(["logits"], [{"logits": x - 1}], [None], rows=200),
        "sequence-classification", GateConfig())}  # fmt: skip
    assert softmax["top1_agreement"].passed and softmax["kl"].passed  # what it was judged by
    # a forward that returns sigmoid's probabilities: a label is on above 0.5, not 0
    p = 1 / (1 + np.exp(-x))
    probs = Outputs(["probs"], [{"probs": p}], [None], rows=200)
    moved = Outputs(["probs"], [{"probs": 1 / (1 + np.exp(-(x - 0.5)))}], [None], rows=200)
    (decided, *_) = accuracy_gates(probs, moved, task, GateConfig())
    assert decided.name == "decision_agreement" and not decided.passed, decided
    assert "(a score above 0.5)" in decided.detail


def test_a_multi_label_classifiers_sentence_embedding_is_gated_beside_its_scores():
    """Served beside its scores, a sentence_embedding had no gate at all (its embedding is no
    nearest-neighbour task, and the scores took the cosine gate): it gets its own cosine,
    and its rows need no 30 distinct embeddings."""
    rng = np.random.default_rng(1)
    scores, emb = rng.normal(size=(40, 5)), rng.normal(size=(40, 8))
    emb[10:] = emb[0]  # 11 distinct rows: too few for a nearest-neighbour gate, none here
    names = ["logits", "sentence_embedding"]
    ref = Outputs(names, [{"logits": scores, "sentence_embedding": emb}], [None], rows=40)
    check_evaluation(ref, "multi-label-classification")
    broken = Outputs(names, [{"logits": scores, "sentence_embedding": -emb}], [None], rows=40)
    gates = {
        g.name: g for g in accuracy_gates(ref, broken, "multi-label-classification", GateConfig())
    }
    assert gates["decision_agreement"].passed and gates["cosine:logits"].passed
    assert not gates["cosine:sentence_embedding"].passed


def test_token_labels_for_a_model_judged_as_a_classifier_are_refused_as_such():
    """A model said to tag tokens whose 2-D output is named "logits" is judged as a
    classifier: labels per token were counted as rows out of range ("88 of 64 rows")."""
    batch = {"logits": np.zeros((_ROWS, 3)), "tags": np.zeros((_ROWS, _T, 4))}
    ref = Outputs(["logits", "tags"], [batch], [None], labels=np.zeros((_ROWS, _T), np.int64),
                  rows=_ROWS)  # fmt: skip
    with pytest.raises(DataError, match=r"labels of shape \(40, 5\): one per token, but logits"):
        check_evaluation(ref, "token-classification")


def test_fp32s_own_nan_on_an_evaluation_row_is_refused_not_blamed_on_the_candidate():
    """An identical candidate failed every gate, its detail saying the *candidate's* scores
    were not finite, where FP32 itself answered NaN on a row. NaN at a padded token (mask 0),
    which no gate reads, is not FP32's answer."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 4)).astype(np.float32)
    logits[3, 1] = np.nan
    with pytest.raises(
        DataError, match=r"FP32 itself answers NaN or infinity in 'logits' on 1 of 40 "
    ):
        check_evaluation(Outputs(["logits"], [{"logits": logits}], [None], rows=40),
                         "sequence-classification")  # fmt: skip
    hidden = rng.normal(size=(40, 6, 8)).astype(np.float32)
    mask = np.ones((40, 6), dtype=np.int64)
    mask[:, 4:] = 0
    hidden[:, 5] = np.nan  # padding only
    check_evaluation(
        Outputs(["last_hidden_state"], [{"last_hidden_state": hidden}], [mask], rows=40),
        "feature-extraction",
    )
    hidden[7, 2, 0] = np.nan  # a real token
    with pytest.raises(DataError, match="'last_hidden_state' on 1 of 40 evaluation row"):
        check_evaluation(
            Outputs(["last_hidden_state"], [{"last_hidden_state": hidden}], [mask], rows=40),
            "feature-extraction",
        )
    # +infinity is no score either (-infinity is a masked one's); and a sentence embedding as
    # wide as the batch is long holds no tokens to mask
    logits[3, 1] = np.inf
    with pytest.raises(DataError, match="NaN or infinity in 'logits' on 1 of 40"):
        check_evaluation(Outputs(["logits"], [{"logits": logits}], [None], rows=40),
                         "sequence-classification")  # fmt: skip
    logits[3, 1] = -np.inf
    check_evaluation(Outputs(["logits"], [{"logits": logits}], [None], rows=40),
                     "sequence-classification")  # fmt: skip
    # rows read whole (an .npz) are named by their indices there, not by the gates' order
    logits[[3, 25], 0] = np.nan
    order = rng.permutation(40)
    halves = [{"logits": logits[:20]}, {"logits": logits[20:]}]
    named = Outputs(["logits"], halves, [None, None], rows=40, indices=[order[:20], order[20:]])
    found = ", ".join(map(str, sorted([order[3], order[25]])))
    with pytest.raises(DataError, match=rf"on 2 of 40 evaluation row\(s\) \(indices as in its "
                       rf"arrays, from 0: {found}\)"):  # fmt: skip
        check_evaluation(named, "sequence-classification")
    pooled = rng.normal(size=(40, 6)).astype(np.float32)  # 6 wide, in a batch of 6 tokens
    pooled[9, 5] = np.nan  # where the mask has padding
    with pytest.raises(DataError, match="'sentence_embedding' on 1 of 40"):
        check_evaluation(
            Outputs(["sentence_embedding"], [{"sentence_embedding": pooled}], [mask], rows=40),
            "feature-extraction",
        )


def test_a_tagger_with_one_logit_per_token_is_gated_on_its_sign():
    """A binary tagger's (batch, sequence, 1) logits, taken as one class, gave top-1
    agreement 1.0 and KL 0 whatever INT8 did: every tag flipped passed. A token's single
    logit is read as [0, logit], as a classifier's is: its tag is its sign, and its token
    labels are 0 and 1."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 12, 1)).astype(np.float32)
    mask = np.ones((40, 12), np.int64)

    def gates(y, labels=None):
        ref = Outputs(["logits"], [{"logits": x}], [mask], labels=labels, rows=40)
        cand = Outputs(["logits"], [{"logits": y}], [mask], rows=40)
        check_evaluation(ref, "token-classification")
        return {g.name: g for g in accuracy_gates(ref, cand, "token-classification", GateConfig())}

    same = gates(x)
    assert same["token_top1_agreement"].value == 1 and same["token_kl"].value == pytest.approx(0)
    flipped = gates(-x)
    assert flipped["token_top1_agreement"].value == 0 and not flipped["token_kl"].passed
    tags = (x[..., 0] > 0).astype(np.int64)  # FP32 right on every token
    drop = gates(-x, tags)["token_accuracy_drop"]
    assert drop.value == pytest.approx(100) and not drop.passed
    assert gates(x, tags)["token_accuracy_drop"].value == 0


def test_token_labels_the_model_does_not_follow_do_not_blind_the_accuracy_gate(caplog):
    """Token labels numbered in another order than the model's tags (its label2id), or all
    one tag: FP32 is at chance on them, and an INT8 answering noise passed its accuracy
    drop. Such tokens are gated on agreement with FP32 as well, with a warning; labels the
    model follows are not."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 10, 4)).astype(np.float32)
    mask = np.ones((40, 10), np.int64)
    mask[:, 8:] = 0
    right = x.argmax(-1)
    right[:5, 1] = (right[:5, 1] + 1) % 4  # a trained tagger: right on most tokens
    right[mask == 0] = -100
    noise = rng.normal(size=x.shape).astype(np.float32)

    def gates(labels, candidate):
        ref = Outputs(["logits"], [{"logits": x}], [mask], labels=labels, rows=40)
        cand = Outputs(["logits"], [{"logits": candidate}], [mask], rows=40)
        check_evaluation(ref, "token-classification")
        return {g.name: g for g in accuracy_gates(ref, cand, "token-classification", GateConfig())}

    with caplog.at_level(logging.WARNING, logger="quantgate.quantize.gates"):
        followed = gates(right, noise)
    assert set(followed) == {"token_accuracy_drop"} and not followed["token_accuracy_drop"].passed
    assert "do not follow" not in caplog.text
    renumbered = np.where(right >= 0, (right + 1) % 4, right)  # label2id off by one
    with caplog.at_level(logging.WARNING, logger="quantgate.quantize.gates"):
        blind = gates(renumbered, noise)
    assert blind["token_accuracy_drop"].passed  # FP32 and the noise both at chance
    assert not blind["token_top1_agreement"].passed and not blind["token_kl"].passed
    assert "rows whose labels tell too little (FP32's own top class is the label on" in (
        blind["token_top1_agreement"].detail
    )
    assert "the labels do not follow the model's answers" in caplog.text
    assert "labelled tokens (worth" in caplog.text  # a sentence's tokens move together
    assert gates(renumbered, x)["token_top1_agreement"].passed  # INT8 answering as FP32
    one = np.where(right >= 0, 0, right)  # every labelled token tag 0
    ref = Outputs(["logits"], [{"logits": x}], [mask], labels=one, rows=40)
    assert token_labels_at_chance(ref, "logits").startswith(
        "every one of the 320 labelled tokens is labelled class 0"
    )
    assert not gates(one, np.where(np.arange(4) == 0, 9, 0) + 0 * x)["token_top1_agreement"].passed


def test_scores_both_models_mask_at_minus_infinity_are_no_fault():
    """A question answerer whose head sets the question's tokens, or the padding, to -inf
    (masked_fill): FP32's -inf is accepted, and an identical candidate failed its span gate
    (no span read from a row holding -inf) and its cosine gates (-1 for the row, and every
    -inf counted as a fault). A -inf both give is a masked score; one the candidate alone
    gives is still a fault."""
    rng = np.random.default_rng(7)
    start, end = (rng.normal(size=(40, 16)).astype(np.float32) for _ in range(2))
    mask = np.ones((40, 16), np.int64)
    mask[:, 12:] = 0
    for s in (start, end):
        s[:, 1:4] = -np.inf  # the question's tokens
        s[mask == 0] = -np.inf  # and the padding
    names = ["start_logits", "end_logits"]

    def gates(a, b):
        ref = Outputs(names, [{"start_logits": start, "end_logits": end}], [mask], rows=40)
        cand = Outputs(names, [{"start_logits": a, "end_logits": b}], [mask], rows=40)
        check_evaluation(ref, "question-answering")
        return {g.name: g for g in accuracy_gates(ref, cand, "question-answering", GateConfig())}

    same = gates(start, end)
    assert all(g.passed for g in same.values()), [g for g in same.values() if not g.passed]
    assert same["span_agreement"].value == 1 and same["cosine:start_logits"].value == 1
    alone = start.copy()
    alone[0, 6] = -np.inf  # a context token only the candidate masks
    moved = gates(alone, end)
    assert not moved["cosine:start_logits"].passed
    assert "1 non-finite values" in moved["cosine:start_logits"].detail


def test_a_cosine_gate_does_not_depend_on_how_the_rows_were_batched():
    """A row is negligible below 1e-6 of FP32's median row norm over all the rows: read per
    batch, a batch of near-zero rows (an output a model zeroes for short inputs, batched by
    length) had its own tiny median, and float noise's direction failed the gate."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(40, 8))
    x[:10] *= 1e-9  # ten rows the model all but zeroes
    y = x + rng.normal(size=x.shape) * 1e-12  # float noise
    y[:10] = rng.normal(size=(10, 8)) * 1e-13

    def cosine(cuts):
        batches = [({"out": x[a:b]}, {"out": y[a:b]}, None) for a, b in cuts]
        return Fidelity.measure(batches, ["out"]).cosine_mean["out"]

    assert cosine([(0, 40)]) == cosine([(0, 10), (10, 40)]) == pytest.approx(1)
