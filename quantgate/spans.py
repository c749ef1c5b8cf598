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

A context longer than the model is read in overlapping windows (``tokenizer.Windows``, as
run_qa.py's doc_stride): a pair's answer is its best-scoring window's (``best_windows``),
and the gate compares answers as tokens of the whole context (``pair_spans``), so an
answer found in two windows that overlap is one answer.

Every question gets a span, as Hugging Face's pipeline answers by default; a SQuAD 2.0
model's bundle (gate setting ``null_answer``) may answer none: where the score of the span
at the first token ([CLS]), its lowest over a pair's windows, beats every span's, as
run_qa.py's version_2 rule (``null_scores``, ``pair_choices``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quantgate.errors import DataError
from quantgate.tokenizer import Place, Text

# Hugging Face's run_qa.py example caps an answer at 30 tokens (its max_answer_length); its
# pipeline at 15. The longer: a gate then also sees the long answers a client may allow.
MAX_ANSWER_TOKENS = 30
# A pair's answer where no answer beats every span (``pair_spans``, with null scores): unlike
# any span, and unlike (-1, -1), a pair without an answer at all (scores not finite)
NO_ANSWER = (-2, -2)


def best_spans(
    start: np.ndarray, end: np.ndarray, allowed: np.ndarray, max_tokens: int = MAX_ANSWER_TOKENS
) -> np.ndarray:
    """(N, 2): each row's best answer span, its first and last token: the highest
    ``start[first] + end[last]`` (a sum of logits: the product of the two softmax
    probabilities) with ``first <= last < first + max_tokens``, both ``allowed`` (a row's
    real tokens; its context's, where known). A score of -inf (a token the model masks)
    never starts or ends the answer. (-1, -1) for a row with no allowed token, a NaN or
    +inf score at one, or no span of finite score: it has no answer, and agrees with no
    other.

    ``start``, ``end`` and ``allowed`` are (N, T). Row by row: (T, T) candidates at a time,
    1 MB at 512 tokens, whatever the batch."""
    spans = np.full((len(start), 2), -1, dtype=np.int64)
    t = start.shape[1]
    i = np.arange(t)
    valid = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_tokens)  # (T, T)
    for row, (s, e, ok) in enumerate(zip(start, end, allowed.astype(bool), strict=True)):
        if not ok.any() or unreadable(s[ok]).any() or unreadable(e[ok]).any():
            continue
        scores = s.astype(np.float64)[:, None] + e.astype(np.float64)[None, :]  # (first, last)
        scores[~(valid & ok[:, None] & ok[None, :])] = -np.inf
        best = int(scores.argmax())
        if np.isfinite(scores.flat[best]):
            spans[row] = np.divmod(best, t)
    return spans


def unreadable(scores: np.ndarray) -> np.ndarray:
    """Where a score is NaN or +inf: no answer can be ranked by it (-inf only masks)."""
    return np.isnan(scores) | np.isposinf(scores)


def span_scores(start: np.ndarray, end: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """(N,) float64: each row's ``spans`` score, ``start[first] + end[last]`` (-inf for a row
    without a span): what run_qa.py ranks one example's windows' answers by."""
    rows = np.arange(len(spans))
    first, last = np.maximum(spans, 0).T
    scores = start[rows, first].astype(np.float64) + end[rows, last].astype(np.float64)
    return np.where(spans[:, 0] >= 0, scores, -np.inf)


def best_windows(pairs: np.ndarray, scores: np.ndarray, count: int | None = None) -> np.ndarray:
    """(P,) for each pair 0..P-1 (``pairs``: (W,) each window's; P: ``count``, else the
    last pair's), the window whose answer scores highest (the first of a tie); -1 for a pair
    without a window."""
    best = np.full(int(pairs.max(initial=-1)) + 1 if count is None else count, -1, np.int64)
    top = np.full(len(best), -np.inf)
    for window, (pair, score) in enumerate(zip(pairs.tolist(), scores.tolist(), strict=True)):
        if best[pair] < 0 or score > top[pair]:
            best[pair], top[pair] = window, score
    return best


def null_scores(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(N,) float64: each row's score of no answer, SQuAD 2.0's: the span of its first token
    ([CLS], where right-padded rows begin), ``start[:, 0] + end[:, 0]``."""
    return start[:, 0].astype(np.float64) + end[:, 0].astype(np.float64)


def lowest_nulls(pairs: np.ndarray, nulls: np.ndarray, count: int | None = None) -> np.ndarray:
    """(P,) for each pair, its window whose null score is lowest (run_qa.py's
    min_null_prediction: the window that most believes an answer is there); -1 for none."""
    return best_windows(pairs, -nulls, count)


def pair_choices(
    pairs: np.ndarray,
    spans: np.ndarray,
    scores: np.ndarray,
    nulls: np.ndarray | None = None,
    count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's answer over its windows (``pairs``: (W,) each window's pair; ``spans``,
    ``scores`` and ``nulls``, each window's), run_qa.py's rule: (P,) the window of its
    best-scoring span, -1 where no window has one (scores not finite); and (P,) where
    ``nulls`` are given (a model that may answer none), the window of its lowest finite
    null score where that beats the span ("no answer": it stands over the span), else -1."""
    best = best_windows(pairs, scores, count)
    some = best >= 0  # a pair with windows; none of them may have a span (-inf)
    best[some] = np.where(spans[best[some], 0] >= 0, best[some], -1)
    none = np.full(len(best), -1, np.int64)
    if nulls is not None:
        finite = np.where(np.isfinite(nulls), nulls, np.inf)  # never the lowest
        lowest = lowest_nulls(pairs, finite, len(best))
        for pair, (window, empty) in enumerate(zip(best.tolist(), lowest.tolist(), strict=True)):
            if window >= 0 and np.isfinite(finite[empty]) and finite[empty] > scores[window]:
                none[pair] = empty
    return best, none


def pair_spans(
    spans: np.ndarray,
    scores: np.ndarray,
    pairs: np.ndarray,
    shifts: np.ndarray,
    nulls: np.ndarray | None = None,
) -> np.ndarray:
    """(P, 2): each pair's answer over its windows (``pair_choices``), the best-scoring window's
    span as indices among the pair's whole context's tokens: one answer found in two
    overlapping windows is one answer. ``shifts`` (W,) turn a window's token index into
    that index (its part's first token among the context's, ``Windows.starts``, less where
    its part begins in it). (-1, -1) for a pair without an answer; with ``nulls`` (a model
    that may answer none), ``NO_ANSWER`` where no answer beats the span."""
    best, none = pair_choices(pairs, spans, scores, nulls)
    out = np.full((len(best), 2), -1, np.int64)
    found = best >= 0
    out[found] = spans[best[found]] + shifts[best[found], None]
    out[none >= 0] = NO_ANSWER
    return out


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
    """An extractive answer: its text as the context spells it, the window it was read
    from (a row of the scores), its first and last token there, and its probability
    (``span_probability``, in that window). No answer (``null_answer``): text "" at tokens
    0..0, the first token's span."""

    text: str
    window: int
    first: int
    last: int
    probability: float

    @property
    def none(self) -> bool:
        """Whether this is no answer (SQuAD 2.0's, ``null_answer``), not a span."""
        return self.text == "" and self.first == self.last == 0


def answers(
    texts: Sequence[Text],
    start: np.ndarray,
    end: np.ndarray,
    places: Sequence[Sequence[Place]],
    pairs: np.ndarray | None = None,
    *,
    max_tokens: int = MAX_ANSWER_TOKENS,
    null_answer: bool = False,
) -> list[Answer | None]:
    """Each text's answer to its (question, context) pair, from a question answerer's
    ``start`` and ``end`` scores (W, T) for the texts' windows as its tokenizer placed their
    tokens (``Tokenizer.places``, or ``Windows.places``; ``pairs``: the text each window
    reads, ``Windows.pairs``; None: a window a text): the best span of a window's context
    (``context_mask``, ``best_spans``, at most ``max_tokens``) in the window where it scores
    highest (``best_windows``), as `quantgate infer` prints it. With ``null_answer`` (a SQuAD
    2.0 model), no answer where the pair's lowest finite null score beats that span's: an
    ``Answer`` of text "" at the first token, the window's probability of no answer. A row
    without a pair answers from its one text; None for a text with no answer at all (no
    context token, or scores that are not finite). A DataError where the arguments do not
    belong together (``_windows_read``)."""
    start, end = np.asarray(start), np.asarray(end)
    pairs = _windows_read(texts, start, end, places, pairs)
    read = [texts[p] for p in pairs.tolist()]  # each window's text
    allowed = context_mask(read, places, start.shape[1])
    spans = best_spans(start, end, allowed, max_tokens)
    scores = span_scores(start, end, spans)
    nulls = null_scores(start, end) if null_answer else None
    best, none = pair_choices(pairs, spans, scores, nulls, len(texts))
    # the pipeline's probabilities: over the context and the first token ([CLS], which its
    # p_mask always leaves in), whether or not no answer is allowed (over the context alone,
    # 0.068 for a span it scores 0.041)
    allowed[:, 0] = True
    found: list[Answer | None] = []
    for text, window, empty in zip(texts, best.tolist(), none.tolist(), strict=True):
        if empty >= 0:
            p = span_probability(start[empty], end[empty], allowed[empty], (0, 0))
            found.append(Answer("", empty, 0, 0, p))
            continue
        if window < 0:
            found.append(None)
            continue
        first, last = spans[window]
        (_, begin, _), (_, _, stop) = places[window][first], places[window][last]  # context's
        source = text if isinstance(text, str) else text[1]
        p = span_probability(start[window], end[window], allowed[window], (first, last))
        found.append(Answer(source[begin:stop], window, int(first), int(last), p))
    return found


def _windows_read(
    texts: Sequence[Text],
    start: np.ndarray,
    end: np.ndarray,
    places: Sequence[Sequence[Place]],
    pairs: np.ndarray | None,
) -> np.ndarray:
    """(W,) the text each window reads, once ``answers``' arguments are found to belong
    together: a row of scores for each window of ``places``, as wide as its tokens, and a
    text for each. A DataError saying which does not fit, where numpy (or zip) would fail
    on it with words of its own: the scores of windows sent in parts, joined wrongly, or
    windows without the ``pairs`` that say whose they are."""
    if start.ndim != 2 or start.shape != end.shape:
        raise DataError(
            f"answers: expected start and end scores of one shape (W, T), a row for each "
            f"window and a column for each of its tokens; found start {start.shape}, end "
            f"{end.shape}. Pass the model's start_logits and end_logits for the same rows"
        )
    windows = len(start)
    if len(places) != windows:
        raise DataError(
            f"answers: expected a row of scores for each window of places (text_windows' "
            f"w.places: {_count(len(places), 'window')}), found {_count(windows, 'row')}. Pass "
            "every window's scores, in w.places' order (sent in parts: joined in order, "
            "np.concatenate)"
        )
    if pairs is None:
        if windows != len(texts):
            raise DataError(
                f"answers: without pairs, expected a window a text ({_count(len(texts), 'text')}"
                f"), found {_count(windows, 'window')}. Pass text_windows' w.pairs, the text "
                "each window reads"
            )
        pairs = np.arange(windows)
    pairs = np.asarray(pairs)
    if pairs.shape != (windows,) or (windows and not np.issubdtype(pairs.dtype, np.integer)):
        raise DataError(
            f"answers: expected pairs to give the text of each window "
            f"({_count(windows, 'window')}): (W,) whole numbers; found {pairs.dtype} of shape "
            f"{pairs.shape}. Pass text_windows' w.pairs, made with these windows' w.places"
        )
    if windows and not 0 <= pairs.min() <= pairs.max() < len(texts):
        bad = pairs[(pairs < 0) | (pairs >= len(texts))][0]
        raise DataError(
            f"answers: expected pairs to name texts 0..{len(texts) - 1} (of "
            f"{_count(len(texts), 'text')}), found {bad}. "
            "Pass the texts text_windows was given, with its w.pairs"
        )
    longest = max(range(windows), key=lambda w: len(places[w]), default=None)
    if longest is not None and len(places[longest]) > start.shape[1]:
        raise DataError(
            f"answers: expected a column of scores for each token of a window, found "
            f"{start.shape[1]} for window {longest}'s {len(places[longest])} tokens "
            f"(w.places[{longest}]). Pass the scores the model gave the feeds text_windows "
            "made with these w.places"
        )
    return pairs.astype(np.int64)


def _count(n: int, thing: str) -> str:
    """``n`` things, in words: "1 window", "2 windows"."""
    return f"{n} {thing}{'' if n == 1 else 's'}"


__all__ = [
    "MAX_ANSWER_TOKENS",
    "NO_ANSWER",
    "Answer",
    "answers",
    "best_spans",
    "best_windows",
    "pair_choices",
    "context_mask",
    "lowest_nulls",
    "null_scores",
    "pair_spans",
    "span_probability",
    "unreadable",
    "span_scores",
]
