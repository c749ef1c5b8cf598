"""A question answerer's gates: its answer spans against FP32's, over each row's context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from qg_pipeline_helpers import english, minilm_info  # noqa: E402

from quantgate.quantize.decide import GateConfig  # noqa: E402
from quantgate.quantize.gates import Outputs, accuracy_gates  # noqa: E402

ROWS, T = 40, 12


def _qa(start, end, mask, types, context=None) -> Outputs:
    return Outputs(
        ["start_logits", "end_logits"],
        [{"start_logits": start.astype(np.float32), "end_logits": end.astype(np.float32)}],
        [mask],
        rows=len(start),
        segments=[types],
        contexts=[context],
    )


def _rows():
    """Rows of a 4-token question then a context of 6 real tokens and 2 of padding; FP32's
    answer is tokens 6..7 of the context."""
    mask = np.ones((ROWS, T), np.int64)
    mask[:, 10:] = 0
    types = np.zeros((ROWS, T), np.int64)
    types[:, 4:10] = 1
    start, end = np.zeros((ROWS, T)), np.zeros((ROWS, T))
    start[:, 6], end[:, 7] = 5.0, 5.0
    return start, end, mask, types


def _gates(cand: Outputs, ref: Outputs) -> dict:
    return {g.name: g for g in accuracy_gates(ref, cand, "question-answering", GateConfig())}


def test_span_agreement_counts_rows_whose_answer_in_the_context_is_fp32s():
    start, end, mask, types = _rows()
    ref = _qa(start, end, mask, types)
    gates = _gates(ref, ref)
    assert list(gates) == [
        "span_agreement", "cosine:start_logits", "cosine_tail:start_logits",
        "cosine:end_logits", "cosine_tail:end_logits",
    ]  # fmt: skip
    assert gates["span_agreement"].value == 1 and gates["span_agreement"].passed
    moved = end.copy()
    moved[:4, 8] = 6.0  # 4 of 40 rows: the answer ends a token later
    gates = _gates(_qa(start, moved, mask, types), ref)
    assert gates["span_agreement"].value == pytest.approx(36 / 40)
    assert not gates["span_agreement"].passed  # 0.9 < 0.95
    assert "rows whose answer span is FP32's" in gates["span_agreement"].detail


def test_scores_outside_the_context_move_no_answer_and_broken_scores_fail():
    start, end, mask, types = _rows()
    ref = _qa(start, end, mask, types)
    question = start.copy()
    question[:, 1] = 50.0  # the question's token: not where an answer can start
    padding = end.copy()
    padding[:, 11] = 50.0  # padding: no token
    assert _gates(_qa(question, padding, mask, types), ref)["span_agreement"].value == 1
    separator = end.copy()
    separator[:, 9] = 50.0  # the context's last token: the [SEP] that ends the pair
    assert _gates(_qa(start, separator, mask, types), ref)["span_agreement"].value == 1
    broken = start.copy()
    broken[0, 5] = np.nan
    gate = _gates(_qa(broken, end, mask, types), ref)["span_agreement"]
    assert not gate.passed and "1 rows without an answer" in gate.detail
    # without token types (RoBERTa's): any real token, the question's too, but no padding
    plain = _qa(start, end, mask, None)
    gate = _gates(_qa(question, end, mask, None), plain)["span_agreement"]
    assert gate.value == 0
    gates = _gates(_qa(start, padding, mask, None), plain)
    assert gates["span_agreement"].value == 1  # padding holds no answer
    assert gates["cosine:end_logits"].value == 1  # nor counts in the scores' cosine
    assert (
        "of every real token (neither token types nor the tokenizer"
        in gates["span_agreement"].detail
    )
    # the tokenizer's account of the context (text data), token types or none
    context = (types == 1) & (np.arange(T) < 9)  # the context, its [SEP] left out
    told = _qa(start, end, mask, None, context)
    gate = _gates(_qa(question, end, mask, None, context), told)["span_agreement"]
    assert gate.value == 1 and "as the tokenizer tells them" in gate.detail


def test_text_pairs_carry_the_context_the_tokenizer_tells(tmp_path):
    """A question answerer's text data marks each row's context tokens as `quantgate infer`
    reads them (the pair's second text, no [SEP]), for the gate to pick spans from: token
    types alone cannot tell them for a model without any (RoBERTa's)."""
    from quantgate.quantize.data import open_source

    rows = [
        {"text": "who?", "text_pair": "Zoë lives in Zürich."},
        {"text": "a b c d", "text_pair": "e"},
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (batch,) = open_source(path, minilm_info("question-answering"), role="evaluation").batches()
    ids, types = batch.feeds["input_ids"], batch.feeds["token_type_ids"]
    sep = 102  # [SEP]
    want = (types == 1) & (ids != sep) & batch.feeds["attention_mask"].astype(bool)
    assert batch.context is not None and np.array_equal(batch.context, want)
    assert sorted(batch.context.sum(1).tolist()) == [1, 5]  # "e"; zoe lives in zurich .


def test_question_answering_data_is_told_what_a_question_answerer_reads(tmp_path, caplog):
    """SQuAD's rows are told to become pairs (question first); single texts are warned
    about; a context cut to the model's length is said to lose the answers in its cut part."""
    import logging

    from quantgate.errors import DataError
    from quantgate.quantize.data import open_source
    from quantgate.quantize.text import tokenize

    info = minilm_info("question-answering")
    squad = tmp_path / "squad.jsonl"
    row = {"id": "1", "title": "T", "question": "q?", "context": "c.", "answers": {"text": []}}
    squad.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"jq -c '\{text: .question, text_pair: .context\}'"):
        open_source(squad, info, role="evaluation")
    singles = tmp_path / "singles.jsonl"
    singles.write_text("".join(json.dumps({"text": t}) + "\n" for t in english(3)))
    with caplog.at_level(logging.WARNING):
        open_source(singles, info, role="calibration")
        tokenize([("who?", " ".join(["word"] * 300))], info)
    assert "single texts for a question-answering model" in caplog.text
    assert "an answer in the part cut cannot be found" in caplog.text


@pytest.mark.slow
def test_a_question_answering_export_gates_its_spans_alone_and_batched(tiny_bert, tmp_path):
    """`quantgate export` of a ...ForQuestionAnswering model with (question, context) pairs:
    gated on its answer spans against FP32's, and (dynamic INT8, whose scales follow the
    batch) alone against batched as served, and on its start and end scores' cosine; the
    data's labels ignored with a warning."""
    from transformers import BertForQuestionAnswering

    model = tiny_bert(tmp_path / "qa", BertForQuestionAnswering)
    texts = english(120)
    for name, part in (("calib", texts[:60]), ("eval", texts[60:])):
        rows = [{"text": " ".join(t.split()[:5]) + "?", "text_pair": t, "label": 1} for t in part]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = subprocess.run(
        [sys.executable, "-m", "quantgate", "export", str(model), "--out", str(tmp_path / "b"),
         "--calibration", str(tmp_path / "calib.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
         "--recipe", "ort-dynamic-per-channel"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode in (0, 3), run.stderr  # 3: a random model's speed gate may fail
    assert "labels ignored: a question-answering model is gated on its agreement" in run.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["task"] == "question-answering"
    int8 = next(v for v in manifest["variants"] if v["precision"] == "int8")
    gates = {g["name"]: g for g in int8["gates"]}
    for name in ("span_agreement", "batch_span_agreement", "cosine:start_logits",
                 "cosine:end_logits"):  # fmt: skip
        assert name in gates, sorted(gates)
    assert "on 60 rows" in gates["span_agreement"]["detail"]
    assert gates["span_agreement"]["value"] >= 0.9, gates["span_agreement"]  # FP32's twin
    # re-gated on the questions alone: not what it was calibrated on, nor is served
    singles = tmp_path / "singles.jsonl"
    singles.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[60:]))
    regate = subprocess.run(
        [sys.executable, "-m", "quantgate", "gate", str(tmp_path / "b"), "--eval", str(singles)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert regate.returncode == 2, regate.stderr
    assert "single texts, but the data this bundle was calibrated on" in regate.stderr
