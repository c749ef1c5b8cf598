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

import numpy as np

from quantgate.tokenizer import Place

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


def context_mask(places: Sequence[Sequence[Place]], width: int) -> np.ndarray:
    """(N, ``width``) bool: each row's context tokens by their ``places`` (one list a row, as
    ``Tokenizer.places`` gives them, right-padded to ``width``): those of the pair's second
    text, or of a single text where a row has no pair; no special token."""
    mask = np.zeros((len(places), width), bool)
    for row, where in enumerate(places):
        texts = {p[0] for p in where if p is not None}
        context = 1 if 1 in texts else 0
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


__all__ = ["MAX_ANSWER_TOKENS", "best_spans", "context_mask", "span_probability"]
