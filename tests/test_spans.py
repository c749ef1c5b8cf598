"""quantgate.spans: an extractive answer's span, checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest

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
    # its probability over [CLS] and the one context token, both 0, as the pipeline's
    assert answers(texts, scores, scores, places) == [None, Answer("Zoë", 1, 3, 3, 0.25)]


def test_a_pairs_answer_is_its_best_scoring_windows_and_one_answer_in_two_windows_is_one():
    """Windows of two pairs (0, 0, 0, 1): the answer of pair 0 is the window whose span scores
    highest; as tokens of the whole context, the same tokens found in two windows that
    overlap are the same answer, though their places in the windows differ."""
    from quantgate.spans import best_windows, pair_spans, span_scores

    # each window: [CLS] q [SEP] c c c [SEP]; windows 1 and 2 of pair 0 start 2 tokens apart
    allowed = np.zeros((4, 8), bool)
    allowed[:, 3:7] = True
    start, end = np.zeros((4, 8)), np.zeros((4, 8))
    start[1, 5], end[1, 6] = 3.0, 3.0  # window 1: context tokens 2..3 of it, score 6
    start[2, 3], end[2, 4] = 2.0, 2.0  # window 2: the same context tokens (it starts 2 later)
    start[3, 4], end[3, 4] = 1.0, 1.0
    spans = best_spans(start, end, allowed)
    scores = span_scores(start, end, spans)
    pairs, starts = np.array([0, 0, 0, 1]), np.array([0, 0, 2, 0])
    assert best_windows(pairs, scores).tolist() == [1, 3]
    assert best_windows(pairs, scores, 3).tolist() == [1, 3, -1]  # a pair without a window
    shifts = starts - 3  # each window's context begins at its token 3
    assert pair_spans(spans, scores, pairs, shifts).tolist() == [[2, 3], [1, 1]]
    moved = start.copy()
    moved[1, 5] = 0.0  # window 1 loses its answer: window 2 has the same tokens
    spans2 = best_spans(moved, end, allowed)
    scores2 = span_scores(moved, end, spans2)
    assert best_windows(pairs, scores2).tolist() == [2, 3]
    assert pair_spans(spans2, scores2, pairs, shifts).tolist() == [[2, 3], [1, 1]]


def test_answers_read_each_texts_windows_and_name_the_window_found_in():
    from quantgate.spans import Answer, answers

    text = ("q?", "one two three four")
    # two windows of the one pair: [CLS] q ? [SEP] <two context words> [SEP]
    places = [
        [None, (0, 0, 1), (0, 1, 2), None, (1, 0, 3), (1, 4, 7), None],
        [None, (0, 0, 1), (0, 1, 2), None, (1, 4, 7), (1, 8, 13), None],
    ]
    start, end = np.zeros((2, 7)), np.zeros((2, 7))
    start[1, 5], end[1, 5] = 4.0, 4.0  # "three", in the second window
    (found,) = answers([text], start, end, places, np.array([0, 0]))
    assert isinstance(found, Answer) and (found.text, found.window) == ("three", 1)
    assert (found.first, found.last) == (5, 5)


def test_answers_refuse_arguments_that_do_not_belong_together_saying_which():
    """Scores of windows sent in parts and joined wrongly, or windows without their pairs,
    failed inside numpy or zip ("could not broadcast input array", "zip() argument 3 is
    shorter"): a DataError says what was expected, naming text_windows' w.places, w.pairs."""
    from quantgate.errors import DataError
    from quantgate.spans import answers

    text = ("q?", "one two three four")
    places = [  # two windows of the one pair, 7 tokens each
        [None, (0, 0, 1), (0, 1, 2), None, (1, 0, 3), (1, 4, 7), None],
        [None, (0, 0, 1), (0, 1, 2), None, (1, 4, 7), (1, 8, 13), None],
    ]
    scores, pairs = np.zeros((2, 7)), np.array([0, 0])
    for texts, args, message in (
        ([text], (scores[:, :3], scores[:, :3], places, pairs),
         r"a column of scores for each token of a window, found 3 for window 0's 7 tokens "
         r"\(w.places\[0\]\)"),
        ([text], (scores[:1], scores[:1], places, pairs),
         r"for each window of places \(text_windows' w.places: 2 windows\), found 1 row\."),
        ([text], (scores, scores[:, :6], places, pairs), r"found start \(2, 7\), end \(2, 6\)"),
        ([text], (scores[0], scores[0], places, pairs), r"found start \(7,\), end \(7,\)"),
        ([text], (scores, scores, places, None),
         r"without pairs, expected a window a text \(1 text\), found 2 windows\. Pass "
         r"text_windows' w.pairs"),
        ([text, text], (scores[:1], scores[:1], places[:1], None),  # fewer rows than texts
         r"expected a window a text \(2 texts\), found 1 window\."),
        ([text], (scores, scores, places, pairs[:1]),
         r"each window \(2 windows\): \(W,\) whole numbers; found int64 of shape \(1,\)"),
        ([text], (scores, scores, places, np.array([0, 1])),
         r"expected pairs to name texts 0..0 \(of 1 text\), found 1\."),
        ([text], (scores[:1, :3], scores[:1, :3], places[:1], None),  # no pairs: a window a text
         r"found 3 for window 0's 7 tokens"),
    ):  # fmt: skip
        with pytest.raises(DataError, match=message):
            answers(texts, *args)
    assert answers([text], scores, scores, places, pairs)[0] is not None  # as they belong
    wider = np.zeros((2, 9))  # padded past the windows' tokens: read as it was
    assert answers([text], wider, wider, places, [0, 0]) == answers(
        [text], scores, scores, places, pairs
    )


def test_a_null_answer_is_chosen_where_the_first_tokens_span_beats_every_span():
    """SQuAD 2.0's rule (run_qa.py's version_2): no answer where the lowest null score of a
    pair's windows beats its best span's; a model that answers every question never."""
    from quantgate.spans import NO_ANSWER, Answer, answers, null_scores, pair_spans, span_scores

    # [CLS] q [SEP] c c [SEP]: window 0 and 1 of pair 0, window 2 of pair 1
    places = [[None, (0, 0, 1), None, (1, 0, 3), (1, 4, 7), None]] * 3
    texts = [("q", "one two"), ("q", "one two")]
    start, end = np.zeros((3, 6)), np.zeros((3, 6))
    start[:, 3], end[:, 4] = 2.0, 2.0  # every window's span "one two" scores 4
    start[0, 0], end[0, 0] = 3.0, 3.0  # window 0's null: 6, above pair 0's best span
    start[1, 0], end[1, 0] = 1.0, 1.0  # window 1's null: 2, pair 0's lowest: below the span
    start[2, 0], end[2, 0] = 3.0, 3.0  # pair 1's only window: null 6 beats its span
    pairs = np.array([0, 0, 1])
    allowed = np.zeros((3, 6), bool)
    allowed[:, 3:5] = True
    spans = best_spans(start, end, allowed)
    scores, nulls = span_scores(start, end, spans), null_scores(start, end)
    assert nulls.tolist() == [6.0, 2.0, 6.0]
    got = pair_spans(spans, scores, pairs, np.zeros(3, np.int64), nulls)
    assert got.tolist() == [[3, 4], list(NO_ANSWER)]
    assert pair_spans(spans, scores, pairs, np.zeros(3, np.int64)).tolist() == [[3, 4], [3, 4]]
    found = answers(texts, start, end, places, pairs, null_answer=True)
    assert found[0] is not None and found[0].text == "one two"
    assert isinstance(found[1], Answer) and (found[1].text, found[1].window) == ("", 2)
    p = np.exp(3) / (np.exp(3) + np.exp(2) + 1)  # [CLS] against the context's two tokens
    assert (found[1].first, found[1].last) == (0, 0) and np.isclose(found[1].probability, p * p)
    assert [a.text for a in answers(texts, start, end, places, pairs) if a] == ["one two"] * 2
    # the longest answer a setting allows
    assert answers(texts, start, end, places, pairs, max_tokens=1)[0].text in ("one", "two")


def test_an_answers_probability_is_the_pipelines_over_the_context_and_its_first_token():
    """transformers' question-answering pipeline leaves [CLS] in its softmax whether or not
    no answer is allowed (its p_mask keeps it): over the context alone, a span it scores
    0.041 was printed at 0.068."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    from quantgate.spans import answers

    places = [[None, (0, 0, 1), None, (1, 0, 3), (1, 4, 7), None]]  # [CLS] q [SEP] c c [SEP]
    start = np.array([[1.5, 0.3, 0.0, 2.0, 0.5, 0.0]])
    end = np.array([[1.0, 0.0, 0.0, 0.2, 1.8, 0.0]])
    (found,) = answers([("q", "one two")], start, end, places)
    assert found is not None and (found.first, found.last) == (3, 4)
    p_mask = np.array([[0, 1, 1, 0, 0, 1]])  # the pipeline's: all but the context and [CLS]
    starts, ends, scores, _ = select_starts_ends(start, end, p_mask, np.ones((1, 6), int))
    assert (starts[0], ends[0]) == (3, 4)
    assert np.isclose(found.probability, scores[0]), (found.probability, scores[0])


def test_infer_says_no_answer_where_the_null_answer_wins(capsys):
    from quantgate.cli.infer import _print_answers

    places = [[None, (0, 0, 1), None, (1, 0, 3), (1, 4, 7), None]]
    start, end = np.zeros((1, 6)), np.zeros((1, 6))
    start[0, 0], end[0, 0] = 5.0, 5.0
    for null_answer, said in ((True, "no answer: the first token's span"), (False, "'one")):
        _print_answers(
            [("q", "one two")], start, end, places, None, max_tokens=30, null_answer=null_answer
        )
        assert said in capsys.readouterr().out


def test_scores_that_are_not_finite_are_never_read_as_no_answer():
    """A window whose null score is not finite is not a pair's lowest, whichever window it
    is; a window whose span scores are not finite has no answer, not "no answer"."""
    from quantgate.spans import NO_ANSWER, answers, pair_spans

    spans = np.array([[3, 4], [3, 4]])
    scores = np.array([5.0, 5.0])
    pairs, shifts = np.array([0, 0]), np.zeros(2, np.int64)
    for nulls in ([np.nan, 9.0], [9.0, np.nan]):  # the finite 9 beats the span either way
        assert pair_spans(spans, scores, pairs, shifts, np.array(nulls)).tolist() == [
            list(NO_ANSWER)
        ]
    nan = np.array([np.nan, np.nan])
    assert pair_spans(spans, scores, pairs, shifts, nan).tolist() == [[3, 4]]
    places = [[None, (0, 0, 1), None, (1, 0, 3), (1, 4, 7), None]]
    start, end = np.zeros((1, 6)), np.zeros((1, 6))
    start[0, 3] = np.nan  # the context's scores are broken; [CLS]'s are fine
    assert answers([("q", "one two")], start, end, places, null_answer=True) == [None]


def test_no_answer_is_said_by_answer_none_and_a_span_at_token_0_is_not_it():
    from quantgate.spans import Answer

    assert Answer("", 0, 0, 0, 0.9).none
    assert not Answer("Zoë", 0, 0, 0, 0.9).none  # a single text's first token, answered
    assert not Answer("", 1, 3, 3, 0.9).none
