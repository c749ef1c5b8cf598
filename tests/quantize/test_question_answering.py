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


def test_a_null_answer_is_an_answer_where_the_bundle_says_its_model_may_give_none():
    """With null_answer (a SQuAD 2.0 model), an INT8 whose first token's span comes to beat
    FP32's answer answers nothing there: a different answer. Without it, no answer is
    read, and the spans agree as before; the answer's length is the setting's."""
    start, end, mask, types = _rows()
    ref = _qa(start, end, mask, types)
    cls = start.copy(), end.copy()
    cls[0][:8, 0] = cls[1][:8, 0] = 6.0  # 8 of 40 rows: [CLS] 12 against the span's 10
    cand = _qa(*cls, mask, types)
    null = GateConfig(null_answer=True)
    gate = {g.name: g for g in accuracy_gates(ref, cand, "question-answering", null)}
    assert gate["span_agreement"].value == pytest.approx(32 / 40)
    assert "or none, where the first token's span scores higher" in gate["span_agreement"].detail
    assert _gates(cand, ref)["span_agreement"].value == 1  # none read: the same spans
    broken = start.copy()
    broken[:2, 6] = np.nan  # 2 rows' context scores broken, their [CLS] span's fine
    gate = {
        g.name: g
        for g in accuracy_gates(ref, _qa(broken, end, mask, types), "question-answering", null)
    }
    assert (
        not gate["span_agreement"].passed
        and "2 rows without an answer" in gate["span_agreement"].detail
    )  # not read as "no answer"
    short = GateConfig(max_answer_tokens=1)  # FP32's answer, two tokens, no longer fits
    gate = {g.name: g for g in accuracy_gates(ref, ref, "question-answering", short)}
    assert gate["span_agreement"].value == 1 and "at most 1 tokens" in gate["span_agreement"].detail


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


def _long_pairs(tmp_path) -> Path:
    """Three pairs: two contexts far past 32 tokens, one that fits."""
    long = " ".join(f"Part {i}: the village of Vaduz lies high in the hills." for i in range(12))
    rows = [
        {"text": "Where is the village?", "text_pair": long},
        {"text": "who?", "text_pair": "Zoë lives in Zürich."},
        {"text": "Which part is high?", "text_pair": long + " The end."},
    ]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_long_context_is_gated_in_the_windows_it_is_answered_from(tmp_path, caplog):
    """Evaluation rows of a question answerer are the windows `quantgate infer` reads a long
    context in (``tokenizer.Windows``), each marked with its pair and its part of the
    context, a pair's windows in whatever batches their lengths put them; the span gate
    reads one answer a pair, as tokens of the whole context: the same tokens found in
    another window that overlaps are the same answer."""
    import dataclasses
    import logging

    from quantgate.quantize.data import open_source

    info = dataclasses.replace(minilm_info("question-answering"), max_seq_len=32)
    with caplog.at_level(logging.INFO):
        source = open_source(_long_pairs(tmp_path), info, role="evaluation", batch_size=4)
    assert "2 of 3 evaluation text pairs are longer than the model's 32 tokens" in caplog.text
    batches = list(source.batches())
    assert all(b.windows is not None and b.context is not None for b in batches)
    windows = np.concatenate([b.windows for b in batches])
    assert len(batches) > 1 and source.samples == len(windows) > 3
    assert sorted(set(windows[:, 0].tolist())) == [0, 1, 2] and "windows of 3 text pairs" in (
        source.description
    )
    # FP32 answers pair 0 in its first window; INT8 the same context tokens in its second
    ref_batches, cand_batches, contexts = [], [], []
    where = {}  # (pair, start) -> (batch, row): each window's
    for b in batches:
        shape = b.feeds["input_ids"].shape
        ref = {n: np.zeros(shape, np.float32) for n in ("start_logits", "end_logits")}
        cand = {n: np.zeros(shape, np.float32) for n in ("start_logits", "end_logits")}
        ref_batches.append(ref)
        cand_batches.append(cand)
        contexts.append(b.context)
        for row, (pair, start) in enumerate(b.windows.tolist()):
            where[pair, start] = (len(ref_batches) - 1, row)
    starts = sorted(s for p, s in where if p == 0)  # pair 0's windows' parts
    (b0, r0), (b1, r1) = where[0, starts[0]], where[0, starts[1]]
    begin0 = int(np.argmax(batches[b0].context[r0]))  # the window's first context token
    begin1 = int(np.argmax(batches[b1].context[r1]))
    token = starts[1] + 2  # a context token both windows hold
    ref_batches[b0]["start_logits"][r0, begin0 + token - starts[0]] = 9.0
    ref_batches[b0]["end_logits"][r0, begin0 + token - starts[0]] = 9.0
    cand_batches[b1]["start_logits"][r1, begin1 + token - starts[1]] = 9.0
    cand_batches[b1]["end_logits"][r1, begin1 + token - starts[1]] = 9.0

    def outputs(values) -> Outputs:
        return Outputs(
            ["start_logits", "end_logits"],
            values,
            [b.feeds["attention_mask"] for b in batches],
            rows=len(windows),
            segments=[b.feeds["token_type_ids"] for b in batches],
            contexts=contexts,
            windows=[b.windows for b in batches],
        )

    gate = _gates(outputs(cand_batches), outputs(ref_batches))["span_agreement"]
    assert "on 3 pairs, their windows read as one" in gate.detail
    assert gate.value == 1.0, gate.detail
    moved = [{k: v.copy() for k, v in b.items()} for b in cand_batches]
    moved[b1]["end_logits"][r1, begin1 + token - starts[1] + 1] = 9.5  # one token longer
    assert _gates(outputs(moved), outputs(ref_batches))["span_agreement"].value == 2 / 3
    # scores that are not finite in one window fail the gate, though another window answers
    broken = [{k: v.copy() for k, v in b.items()} for b in cand_batches]
    broken[b0]["start_logits"][r0] = np.nan
    gate = _gates(outputs(broken), outputs(ref_batches))["span_agreement"]
    assert not gate.passed and "1 windows without an answer" in gate.detail, gate.detail


def test_a_long_contexts_pairs_are_kept_whole_and_counted_as_pairs(tmp_path, caplog):
    """A cap on the rows keeps pairs, each with all its windows (an answer from some of them
    is not the one infer gives); the gates' fewest rows are pairs, which the span gate
    counts, not their windows; a pair cut in a library call is pointed to text_windows, a
    single text (which cannot be windowed) is not."""
    import dataclasses
    import logging

    from quantgate.errors import DataError
    from quantgate.quantize.data import open_source
    from quantgate.quantize.gates import check_eval_rows
    from quantgate.quantize.text import tokenize

    info = dataclasses.replace(minilm_info("question-answering"), max_seq_len=32)
    path = _long_pairs(tmp_path)
    every = open_source(path, info, role="evaluation")
    by_pair: dict[int, set] = {}
    for b in every.batches():
        for pair, start in b.windows.tolist():
            by_pair.setdefault(pair, set()).add(start)
    capped = open_source(path, info, role="evaluation", samples=2)
    kept: dict[int, set] = {}
    for b in capped.batches():
        for pair, start in b.windows.tolist():
            kept.setdefault(pair, set()).add(start)
    assert len(kept) == 2 and all(kept[p] == by_pair[p] for p in kept), (kept, by_pair)
    assert capped.pairs == 2 and capped.samples == sum(len(s) for s in kept.values())
    outputs = ("start_logits", "end_logits")
    with pytest.raises(DataError, match=r"has 3 question/context pair\(s\) \(read as \d+ windows"):
        check_eval_rows(every, "question-answering", outputs, None, where="--eval long.jsonl")
    long = " ".join(["word"] * 40)
    with caplog.at_level(logging.WARNING):
        tokenize([("who?", long)], info)
    assert "text_windows reads a long context" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tokenize([long], info)
    assert "cannot be found" in caplog.text and "text_windows" not in caplog.text


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
    data's labels ignored with a warning. Its 24 tokens leave the longer contexts in
    overlapping windows, read as windows through calibration and every gate."""
    from transformers import BertForQuestionAnswering

    model = tiny_bert(tmp_path / "qa", BertForQuestionAnswering)
    texts = english(120)
    for name, part in (("calib", texts[:60]), ("eval", texts[60:])):
        rows = [{"text": " ".join(t.split()[:5]) + "?", "text_pair": t, "label": 1} for t in part]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = subprocess.run(
        [sys.executable, "-m", "quantgate", "export", str(model), "--out", str(tmp_path / "b"),
         "--calibration", str(tmp_path / "calib.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
         "--recipe", "ort-dynamic-per-channel", "--max-seq-len", "24"],
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
    assert "on 60 pairs, their windows read as one" in gates["span_agreement"]["detail"]
    report = (tmp_path / "b" / "report.md").read_text()
    assert "windows of 60 text pairs" in report  # evaluation and calibration alike
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
    # re-gated as a SQuAD 2.0 model's: the setting kept, and infer reads answers by it
    nulled = subprocess.run(
        [sys.executable, "-m", "quantgate", "gate", str(tmp_path / "b"), "--eval",
         str(tmp_path / "eval.jsonl"), "--null-answer", "--max-answer-tokens", "12"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert nulled.returncode in (0, 3), nulled.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    kept = manifest["extra"]["regates"][-1]["gate_config"]
    assert kept["null_answer"] is True and kept["max_answer_tokens"] == 12
    int8 = next(v for v in manifest["variants"] if v["precision"] == "int8")
    detail = next(g["detail"] for g in int8["gates"] if g["name"] == "span_agreement")
    assert "at most 12 tokens" in detail and "or none, where the first token's" in detail
    from quantgate.bundle import load
    from quantgate.cli.infer import _answer_rule

    assert _answer_rule(load(tmp_path / "b")) == {"max_tokens": 12, "null_answer": True}
    shown = subprocess.run(
        [sys.executable, "-m", "quantgate", "inspect", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "answers: a span of at most 12 tokens, or none (SQuAD 2.0: --null-answer)" in (
        " ".join(shown.stdout.split())
    ), shown.stdout


def test_how_answers_are_read_is_warned_about_and_not_kept_for_a_model_that_has_none(caplog):
    import logging

    from quantgate.quantize.gates import unread_answer_rule

    given = GateConfig(null_answer=True, max_answer_tokens=5, min_top1_agreement=0.9)
    with caplog.at_level(logging.WARNING):
        kept = unread_answer_rule("sequence-classification", given)
    assert "null_answer True and max_answer_tokens 5" in caplog.text and "change nothing" in (
        caplog.text
    )
    assert (kept.null_answer, kept.max_answer_tokens, kept.min_top1_agreement) == (False, 30, 0.9)
    assert unread_answer_rule("question-answering", given) is given


def test_a_batched_row_whose_answer_cannot_be_read_agrees_with_nothing():
    """batch_span_agreement: a row whose scores batched are not finite (here its no-answer
    score, where answers may be none) is a disagreement and the gate invalid, as a row alone
    would be: it was counted as agreeing."""
    from quantgate.quantize.gates import _batch_spans

    start, end, mask, types = _rows()
    alone = _qa(start, end, mask, types)
    broken = start.copy()
    broken[:3, 0] = np.inf  # 3 rows' [CLS] start score, batched
    together = _qa(broken, end, mask, types)
    gate = _batch_spans(together, alone, "start_logits", GateConfig(null_answer=True), "detail")
    assert gate.value == pytest.approx(37 / 40) and not gate.passed, gate
    fine = _batch_spans(alone, alone, "start_logits", GateConfig(null_answer=True), "detail")
    assert fine.value == 1 and fine.passed
