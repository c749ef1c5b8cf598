"""Extractive question answering end to end: a Hugging Face ...ForQuestionAnswering model
exported, served, and asked (question, context) pairs with `quantgate infer -t Q -p C`,
whose printed answers are the ones PyTorch's logits give under the rule of Hugging Face's
question-answering examples (the pipeline itself is gone from transformers 5)."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys

import pytest
from conftest import ServerProcess

QUESTIONS = (
    ("Where does Zoë live?", "Zoë lives in Zürich, near the lake, with two cats."),
    ("What does a lambda make?", "A lambda expression makes an anonymous function object."),
    ("Who wrote it?", "It was written by the team in 2026, after many reviews of the draft."),
)


def _quantgate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantgate", *args],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def _answer(
    model, question: str, context: str, limit: int | None = None, null: bool = False
) -> str:
    """PyTorch's answer, by brute force: of every span of context tokens, start <= end and
    at most 30 tokens, the highest start + end logit (run_qa.py's postprocessing, without its
    top-20 shortlists), as the context's characters; a context longer than ``limit`` tokens
    read in transformers' own overlapping windows (return_overflowing_tokens, stride), the
    answer the best-scoring window's; with ``null``, "" where the [CLS] span's score, its
    lowest over the windows, beats it (run_qa.py's version_2 rule)."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    cut = {}
    if limit is not None:
        room = limit - sum(s != 1 for s in tok(question, context).sequence_ids())
        stride = min(limit // 2, 128)  # the question-answering pipeline's doc_stride
        assert room - stride >= room // 4  # (which quantgate keeps for these questions)
        cut = dict(
            truncation="only_second", max_length=limit, stride=stride,
            return_overflowing_tokens=True, padding=True,
        )  # fmt: skip
    enc = tok([question], [context], return_offsets_mapping=True, return_tensors="pt", **cut)
    offsets = enc.pop("offset_mapping").tolist()
    enc.pop("overflow_to_sample_mapping", None)
    qa = AutoModelForQuestionAnswering.from_pretrained(model).eval()
    takes = inspect.signature(qa.forward).parameters  # DistilBERT's: no token_type_ids
    with torch.no_grad():
        out = qa(**{k: v for k, v in enc.items() if k in takes})
    found, nulls = [], []  # (score, window, first, last); each window's [CLS] span's score
    logits = zip(out.start_logits.tolist(), out.end_logits.tolist(), strict=True)
    for w, (start, end) in enumerate(logits):
        nulls.append(start[0] + end[0])
        context_tokens = [i for i, s in enumerate(enc.sequence_ids(w)) if s == 1]
        found += [
            (start[a] + end[b], w, a, b)
            for a in context_tokens
            for b in context_tokens
            if a <= b < a + 30
        ]
    score, w, first, last = max(found, key=lambda f: f[0])
    if null and min(nulls) > score:
        return ""
    return context[offsets[w][first][0] : offsets[w][last][1]]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_infer_answers_as_the_question_answering_pipeline_does(tiny_bert, tmp_path, family):
    """The answer is the best span of the context's tokens (start <= end, at most 30 tokens),
    as the context spells it ("Zürich", not the vocabulary's "zurich"), the tokens the model
    picked (not widened to whole words); for a model without token types (DistilBERT) too,
    where only the tokenizer knows which tokens are the context's."""
    import transformers

    if family == "bert":
        model = tiny_bert(tmp_path / "qa", transformers.BertForQuestionAnswering)
    else:
        model = tiny_bert(
            tmp_path / "qa", transformers.DistilBertForQuestionAnswering,
            transformers.DistilBertConfig, hidden_dim=64,
        )  # fmt: skip
    exported = _quantgate("export", str(model), "--out", str(tmp_path / "b"), "--no-quantize")
    assert exported.returncode == 0, exported.stderr
    assert "start_logits: max abs diff" in exported.stdout, exported.stdout
    srv = ServerProcess(tmp_path / "b")
    try:
        args = [a for q, c in QUESTIONS for a in ("-t", q, "-p", c)]
        r = _quantgate("infer", "--url", srv.url, "--bundle", str(tmp_path / "b"), *args)
    finally:
        assert srv.terminate() == 0, srv.log
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("start_logits, end_logits [3, "), r.stdout
    printed = [ast.literal_eval(line.split("  (tokens")[0].strip()) for line in lines[2::2]]
    want = [_answer(model, q, c) for q, c in QUESTIONS]
    assert printed == want, r.stdout
    assert all(answer in context for answer, (_, context) in zip(printed, QUESTIONS, strict=True))


# A context of some 200 tokens: read in overlapping windows of 32
LONG = (
    "Which city lies by the lake?",
    " ".join(f"Part {i}: the village of Vaduz{i} lies high in the hills." for i in range(14))
    + " The city by the lake is Zürich.",
)


@pytest.mark.slow
def test_a_context_longer_than_the_model_is_answered_from_overlapping_windows(tiny_bert, tmp_path):
    """A context past the model's length is read as run_qa.py and the pipeline read it:
    windows holding the question and overlapping parts of the context, the answer the
    best-scoring window's (the same span as transformers' own windows give PyTorch), not
    one from a cut context; the windows are sent in requests the server takes (its max
    batch size, 2 here, is fewer)."""
    import transformers

    model = tiny_bert(tmp_path / "qa", transformers.BertForQuestionAnswering)
    exported = _quantgate(
        "export", str(model), "--out", str(tmp_path / "b"), "--no-quantize", "--max-seq-len", "32"
    )
    assert exported.returncode == 0, exported.stderr
    srv = ServerProcess(tmp_path / "b", "--max-batch-size", "2")
    try:
        q, c = LONG
        short_q, short_c = QUESTIONS[0]
        args = ["-t", q, "-p", c, "-t", short_q, "-p", short_c]
        r = _quantgate("infer", "--url", srv.url, "--bundle", str(tmp_path / "b"), *args)
        js = _quantgate("infer", "--url", srv.url, "--bundle", str(tmp_path / "b"), "--json", *args)
        one = _quantgate(
            "infer", "--url", srv.url, "--bundle", str(tmp_path / "b"), "-o", "start_logits", *args
        )
        nulled = _quantgate(
            "infer", "--url", srv.url, "--bundle", str(tmp_path / "b"), "--null-answer", *args
        )
    finally:
        assert srv.terminate() == 0, srv.log
    assert r.returncode == 0, r.stderr
    assert "cut" not in r.stderr, r.stderr  # read whole, not cut
    assert js.returncode == 0, js.stderr
    lines = r.stdout.splitlines()
    long_line, short_line = lines[2], lines[4]
    assert " (window " in long_line and " of " in long_line, r.stdout
    windows = int(long_line.split(" of ")[-1].split(",")[0])
    assert windows >= 6, r.stdout  # some 200 tokens, 32 a window
    assert lines[0].startswith(f"start_logits, end_logits [{windows + 1}, 32]"), r.stdout
    assert " (tokens " in short_line, r.stdout  # one window: no window said
    printed = [ast.literal_eval(line.split("  (")[0].strip()) for line in (long_line, short_line)]
    assert printed == [_answer(model, q, c, 32), _answer(model, short_q, short_c, 32)], r.stdout
    # from Python, as docs/python.md says: text_windows, the model, spans.answers
    import onnxruntime as ort

    from quantgate.bundle import load
    from quantgate.quantize import text_windows
    from quantgate.spans import answers

    feeds, w = text_windows(tmp_path / "b", [LONG, QUESTIONS[0]])
    assert len(w) == windows + 1 and w.pairs.tolist() == [0] * windows + [1]
    assert json.loads(js.stdout)["pairs"] == w.pairs.tolist()  # --json: each row's -t
    assert f"rows: windows of the --text pairs {w.pairs.tolist()}" in one.stdout, one.stdout
    # --null-answer: no answer where the [CLS] span beats every span, as PyTorch's rule says
    assert nulled.returncode == 0, nulled.stderr
    said = [
        ""
        if "no answer: the first token's span" in line
        else ast.literal_eval(line.split("  (")[0].strip())
        for line in nulled.stdout.splitlines()[2::2]
    ]
    assert said == [
        _answer(model, q, c, 32, null=True),
        _answer(model, short_q, short_c, 32, null=True),
    ]
    sess = ort.InferenceSession(str(load(tmp_path / "b").file("fp32")))
    start, end = sess.run(["start_logits", "end_logits"], feeds)
    found = answers([LONG, QUESTIONS[0]], start, end, w.places, w.pairs)
    assert [a.text for a in found if a is not None] == printed
