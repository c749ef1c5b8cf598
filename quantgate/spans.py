"""Extractive question answering's answer: the span of tokens a model's start and end scores
pick, as Hugging Face's question-answering examples pick it (run_qa.py's postprocessing,
searching every span rather than the 20 best starts and ends; no widening to whole words).

One rule for the gate that compares INT8's answers with FP32's
(``quantize.gates``: ``span_agreement``) and for ``quantgate infer``, which prints the
answer's text: a gate that picked spans otherwise would judge answers nobody is shown. Both
pick from the context's tokens as the tokenizer tells them (``context_mask``: the pair's
second text, no special token). Tokenized arrays (a .npz) carry no such account: the gate
then reads the context from the token types (type 1 but the separator that ends the pair,
the same tokens for BERT's family), and a model without token types (RoBERTa's) from every
real token, as its detail says.

Every question gets a span, as Hugging Face's pipeline answers by default: no "no answer"
(SQuAD 2.0's [CLS] span) is chosen or compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quantgate.tokenizer import Place, Text

# Hugging Face's run_qa.py example caps an answer at 30 tokens (its max_answer_length); its
# pipeline at 15. The longer: a gate then also sees the long answers a client may allow.
MAX_ANSWER_TOKENS = 30


def best_spans(
    start: np.ndarray, end: np.ndarray, allowed: np.ndarray, max_tokens: int = MAX_ANSWER_TOKENS
) -> np.ndarray:
    """(N, 2): each row's best answer span, its first and last token: the highest
    ``start[first] + end[last]`` (a sum of logits: the product of the two softmax
    probabilities) with ``first <= last < first + max_tokens``, both ``allowed`` (a row's
    real tokens; its context's, where known). (-1, -1) for a row with no allowed token or a
    score at one that is not finite: it has no answer, and agrees with no other.

    ``start``, ``end`` and ``allowed`` are (N, T). Row by row: (T, T) candidates at a time,
    1 MB at 512 tokens, whatever the batch."""
    spans = np.full((len(start), 2), -1, dtype=np.int64)
    t = start.shape[1]
    i = np.arange(t)
    valid = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_tokens)  # (T, T)
    for row, (s, e, ok) in enumerate(zip(start, end, allowed.astype(bool), strict=True)):
        if not ok.any() or not (np.isfinite(s[ok]).all() and np.isfinite(e[ok]).all()):
            continue
        scores = s.astype(np.float64)[:, None] + e.astype(np.float64)[None, :]  # (first, last)
        scores[~(valid & ok[:, None] & ok[None, :])] = -np.inf
        spans[row] = np.divmod(int(scores.argmax()), t)
    return spans


def context_mask(
    texts: Sequence[Text], places: Sequence[Sequence[Place]], width: int
) -> np.ndarray:
    """(N, ``width``) bool: each row's context tokens by their ``places`` (one list a row, as
    ``Tokenizer.places`` gives them for ``texts``, right-padded to ``width``): those of a
    pair's second text (none where it made no token: a context of zero-width characters has
    no answer, not one in the question), or of a single text; no special token."""
    mask = np.zeros((len(places), width), bool)
    for row, (text, where) in enumerate(zip(texts, places, strict=True)):
        context = 0 if isinstance(text, str) else 1
        mask[row, : len(where)] = [p is not None and p[0] == context for p in where]
    return mask


def span_probability(start: np.ndarray, end: np.ndarray, allowed: np.ndarray, span) -> float:
    """The span's score as the pipeline reports it: the softmax probability of its first
    token as the start times that of its last as the end, each over the ``allowed`` tokens
    of the row (``start``, ``end``, ``allowed``: (T,))."""
    ok = allowed.astype(bool)

    def softmax_at(x: np.ndarray, k: int) -> float:
        z = x[ok].astype(np.float64)
        return float(np.exp(x[k] - z.max()) / np.exp(z - z.max()).sum())

    first, last = span
    return softmax_at(start, first) * softmax_at(end, last)


@dataclass(frozen=True)
class Answer:
    """An extractive answer: its text as the context spells it, its first and last token,
    and its probability (``span_probability``)."""

    text: str
    first: int
    last: int
    probability: float


def answers(
    texts: Sequence[Text], start: np.ndarray, end: np.ndarray, places: Sequence[Sequence[Place]]
) -> list[Answer | None]:
    """Each row's answer to its (question, context) pair, from a question answerer's
    ``start`` and ``end`` scores (N, T) for ``texts`` as its tokenizer placed their tokens
    (``Tokenizer.places``): the best span of the context (``context_mask``, ``best_spans``),
    as `quantgate infer` prints it. A row without a pair answers from its one text; None
    for a row with no answer (no context token, or scores that are not finite)."""
    allowed = context_mask(texts, places, start.shape[1])
    found: list[Answer | None] = []
    for row, (text, where, (first, last)) in enumerate(
        zip(texts, places, best_spans(start, end, allowed), strict=True)
    ):
        if first < 0:
            found.append(None)
            continue
        (_, begin, _), (_, _, stop) = where[first], where[last]  # context tokens: placed
        source = text if isinstance(text, str) else text[1]
        p = span_probability(start[row], end[row], allowed[row], (first, last))
        found.append(Answer(source[begin:stop], int(first), int(last), p))
    return found


__all__ = [
    "MAX_ANSWER_TOKENS",
    "Answer",
    "answers",
    "best_spans",
    "context_mask",
    "span_probability",
]
