"""Extractive question answering end to end: a Hugging Face ...ForQuestionAnswering model
exported, served, and asked (question, context) pairs with `quantgate infer -t Q -p C`,
whose printed answers are the ones PyTorch's logits give under the rule of Hugging Face's
question-answering examples (the pipeline itself is gone from transformers 5)."""

from __future__ import annotations

import ast
import inspect
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


def _answer(model, question: str, context: str) -> str:
    """PyTorch's answer, by brute force: of every span of context tokens, start <= end and
    at most 30 tokens, the highest start + end logit (run_qa.py's postprocessing, without its
    top-20 shortlists), as the context's characters."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    enc = tok(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    qa = AutoModelForQuestionAnswering.from_pretrained(model).eval()
    takes = inspect.signature(qa.forward).parameters  # DistilBERT's: no token_type_ids
    with torch.no_grad():
        out = qa(**{k: v for k, v in enc.items() if k in takes})
    start, end = out.start_logits[0].tolist(), out.end_logits[0].tolist()
    context_tokens = [i for i, s in enumerate(enc.sequence_ids(0)) if s == 1]
    first, last = max(
        ((a, b) for a in context_tokens for b in context_tokens if a <= b < a + 30),
        key=lambda span: start[span[0]] + end[span[1]],
    )
    return context[offsets[first][0] : offsets[last][1]]


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
