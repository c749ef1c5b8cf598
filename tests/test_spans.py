"""quantgate.spans: an extractive answer's span, checked against brute force."""

from __future__ import annotations

import numpy as np

from quantgate.spans import best_spans, span_probability


def _brute(start, end, allowed, max_tokens):
    best, span = -np.inf, (-1, -1)
    for a in range(len(start)):
        for b in range(a, min(a + max_tokens, len(start))):
            if allowed[a] and allowed[b] and start[a] + end[b] > best:
                best, span = start[a] + end[b], (a, b)
    return span


def test_the_best_span_is_the_highest_start_plus_end_of_allowed_tokens_in_order():
    rng = np.random.default_rng(0)
    start, end = rng.normal(size=(50, 40)), rng.normal(size=(50, 40))
    allowed = rng.random((50, 40)) < 0.7
    allowed[:, 0] = False  # [CLS]
    for max_tokens in (1, 3, 30):
        got = best_spans(start, end, allowed, max_tokens)
        want = [_brute(s, e, ok, max_tokens) for s, e, ok in zip(start, end, allowed, strict=True)]
        assert [tuple(map(int, g)) for g in got] == want
        assert ((got[:, 1] - got[:, 0]) < max_tokens).all() and (got[:, 1] >= got[:, 0]).all()


def test_an_end_before_its_start_or_a_token_not_allowed_is_never_chosen():
    start = np.array([[0.0, 9.0, 0.0, 0.0, 5.0]])
    end = np.array([[8.0, 0.0, 0.0, 1.0, 9.0]])  # the best end (0) comes before the best start
    assert best_spans(start, end, np.ones((1, 5), bool)).tolist() == [[1, 4]]
    allowed = np.array([[True, True, True, True, False]])  # the last token: the question's
    assert best_spans(start, end, allowed).tolist() == [[1, 3]]


def test_a_row_without_allowed_tokens_or_with_scores_that_are_not_finite_has_no_answer():
    start, end = np.zeros((3, 4)), np.zeros((3, 4))
    allowed = np.ones((3, 4), bool)
    allowed[0] = False
    start[1, 2] = np.nan
    end[2, 1] = np.inf
    assert best_spans(start, end, allowed).tolist() == [[-1, -1]] * 3
    start[1, 2] = 0.0
    allowed[1, 2] = True
    end[2, 1] = 0.0
    assert best_spans(start, end, allowed)[1:].tolist() == [[0, 0], [0, 0]]  # ties: the first


def test_a_spans_probability_is_its_start_times_its_end_softmax_over_allowed_tokens():
    start, end = np.log(np.array([1.0, 2, 1, 100])), np.log(np.array([1.0, 1, 2, 100]))
    allowed = np.array([True, True, True, False])  # the 100s are not the context's
    assert np.isclose(span_probability(start, end, allowed, (1, 2)), 0.5 * 0.5)


def test_a_pair_whose_context_made_no_token_has_no_answer_not_one_in_the_question():
    """A context of zero-width characters passes the blank check and tokenizes to nothing:
    the question's tokens were taken for the context, and a span of them sliced out of the
    context's characters (an empty answer at probability 0.9)."""
    from quantgate.spans import Answer, answers, context_mask

    # [CLS] who ? [SEP] [SEP]: the pair's second text placed no token
    places = [[None, (0, 0, 3), (0, 3, 4), None, None], [None, (0, 0, 1), None, (1, 0, 3), None]]
    texts = [("who?", "\u200b\u00ad"), ("a", "Zoë")]
    mask = context_mask(texts, places, 6)
    assert mask.tolist() == [[False] * 6, [False, False, False, True, False, False]]
    scores = np.zeros((2, 6))
    scores[:, 1] = 5.0  # the question's first token scores highest
    assert answers(texts, scores, scores, places) == [None, Answer("Zoë", 3, 3, 1.0)]
