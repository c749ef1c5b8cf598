"""The intervals beside every gate: do they hold the truth as often as they say?"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from quantgate.quantize.stats import (
    bootstrap_mean,
    clustered_paired_interval,
    clustered_share_interval,
    median_coverage,
    median_interval,
    paired_interval,
    wilson,
)


def test_paired_interval_of_the_accuracy_drop():
    same = np.ones(300, bool)
    drop, (lo, hi) = paired_interval(same, same, 0.95)
    # no row flipped: no drop seen, but 300 rows cannot rule out one of about a point
    assert drop == 0 and -1.3 < lo < 0 < hi < 1.3
    a = np.ones(300, bool)
    b = a.copy()
    b[:6] = False  # six rows newly wrong: a 2-point drop
    drop, (lo, hi) = paired_interval(a, b, 0.95)
    assert drop == pytest.approx(2.0)
    assert 0 < lo < drop < hi < 4.5
    b[6:9] = True  # irrelevant: already right in both
    assert paired_interval(a, b, 0.95)[0] == pytest.approx(2.0)


@pytest.mark.parametrize(("n", "accuracy", "newly_wrong", "newly_right"), [
    (100, 0.9, 0.01, 0.0), (360, 0.9, 0.01, 0.0), (360, 0.9, 0.015, 0.005),
    (360, 0.55, 0.01, 0.0),  # a hard task: Newcombe's hybrid interval collapsed here
])  # fmt: skip
def test_the_drops_interval_holds_the_true_drop_as_often_as_it_says(
    n, accuracy, newly_wrong, newly_right
):
    """Where INT8 lives, few rows flipped: a bootstrap of the rows covered the true drop in 63%
    (n 100) and 86% (n 360) of runs; Tango's score interval holds it in at least 92%, and
    the true drop is above its upper bound (which would pass a bad model) at most 5% of the
    time, on an easy task and on a hard one."""
    rng = np.random.default_rng(0)
    truth, runs, above, inside = (newly_wrong - newly_right) * 100, 600, 0, 0
    for _ in range(runs):
        u = rng.random(n)
        a = rng.random(n) < accuracy  # FP32 right on this share of rows
        b = a.copy()
        b[a & (u < newly_wrong / accuracy)] = False
        b[~a & (u < newly_right / (1 - accuracy))] = True
        _, (lo, hi) = paired_interval(a, b, 0.95)
        inside += lo <= truth <= hi
        above += truth > hi
    assert inside / runs >= 0.92 and above / runs <= 0.05, (inside / runs, above / runs)


def test_a_share_of_rows_gets_wilsons_interval_which_never_collapses():
    assert wilson(30, 30, 0.95)[0] == pytest.approx(0.886, abs=1e-3)  # not (1.0, 1.0)
    lo, hi = wilson(57, 60, 0.95)
    assert lo < 0.95 < hi  # 57 of 60 agreeing does not show 0.95 either way


def test_the_speedups_interval_brackets_its_median_as_often_as_it_says():
    """Order statistics: 15 pair ratios give x(4)..x(12), which holds the true median in 96.5%
    of samples whatever their distribution (a bootstrap of the median: 91-93%)."""
    assert median_interval(np.arange(1, 16), 0.95) == (4, 12)
    assert median_interval(np.arange(1, 17), 0.95) == (4, 13)
    rng = np.random.default_rng(0)
    ratios = 1.2 * np.exp(rng.normal(0, 0.1, size=(2000, 16)))  # true median 1.2
    inside = [lo <= 1.2 <= hi for lo, hi in (median_interval(r, 0.95) for r in ratios)]
    assert 0.95 <= np.mean(inside) <= 0.99


def test_tokens_of_a_row_count_as_less_than_independent_ones():
    """Wilson's interval over the tokens' effective number: a row's tokens that all flip
    together are worth one row each; flips spread as if at random, nearly every token."""
    counts = np.full(100, 20)
    clustered = np.where(np.arange(100) < 5, 0, 20)  # 5 whole rows wrong
    ci, worth = clustered_share_interval(clustered, counts, 0.95)
    assert worth == pytest.approx(100) and ci == pytest.approx(wilson(95, 100, 0.95))
    rng = np.random.default_rng(0)
    spread = 20 - rng.binomial(20, 0.05, size=100)  # the same 5% of tokens, independently
    ci, worth = clustered_share_interval(spread, counts, 0.95)
    assert 1000 < worth <= 2000 and ci[1] - ci[0] < 0.05
    assert clustered_share_interval(counts, counts, 0.95)[1] == 100  # none wrong: rows
    one = counts.copy()
    one[0] -= 1  # one flip is no evidence that tokens are independent
    assert clustered_share_interval(one, counts, 0.95)[0][0] <= wilson(100, 100, 0.95)[0]


@pytest.mark.parametrize("rows,fragile,rate", [(40, 0.05, 0.5), (100, 0.3, 0.05), (400, 1.0, 0.02)])
def test_the_token_accuracy_drop_interval_covers_the_truth(rows, fragile, rate):
    """As the share's below: tokens lost at ``rate`` in a share ``fragile`` of the rows, a
    few regained anywhere; the true drop against Tango's interval over the tokens' worth."""
    rng = np.random.default_rng(11)
    lengths = np.arange(5, 41)
    truth = 100 * (fragile * rate - 0.002)
    covered = above = 0
    for _ in range(400):
        n = rng.choice(lengths, size=rows)
        lost = rng.binomial(n, np.where(rng.random(rows) < fragile, rate, 0.0))
        gained = rng.binomial(n, 0.002)
        _, (lo, hi), _ = clustered_paired_interval(lost, gained, n, 0.95)
        covered += lo <= truth <= hi
        above += truth > hi
    assert covered / 400 >= 0.92 and above / 400 <= 0.05


@pytest.mark.parametrize("rows,fragile,rate", [(40, 0.05, 0.5), (100, 0.3, 0.05), (400, 1.0, 0.01)])
def test_the_token_share_interval_covers_the_truth(rows, fragile, rate):
    """Rows of 5-40 tokens; a share ``fragile`` of the rows flips each token with ``rate``
    (flips packed in a few rows, or spread over all): 400 simulated evaluations."""
    rng = np.random.default_rng(7)
    lengths = np.arange(5, 41)
    truth = 1 - fragile * rate  # a row's length and fragility are independent
    covered = low = 0
    for _ in range(400):
        n = rng.choice(lengths, size=rows)
        miss = rng.binomial(n, np.where(rng.random(rows) < fragile, rate, 0.0))
        (lo, hi), _ = clustered_share_interval(n - miss, n, 0.95)
        covered += lo <= truth <= hi
        low += lo > truth
    assert covered / 400 >= 0.92 and low / 400 <= 0.05


def test_a_mean_over_values_that_are_not_all_finite_has_no_interval():
    """A NaN row fails its gate; its interval would be (nan, nan), which JSON cannot hold."""
    mean_ci = functools.partial(bootstrap_mean, confidence=0.95, count=200, seed=0)
    assert mean_ci(np.array([0.99, np.nan, 0.98])) is None
    assert mean_ci(np.array([0.99, np.inf, 0.98])) is None
    lo, hi = mean_ci(np.array([0.99, 0.97, 0.98, 0.96]))
    assert 0.96 <= lo <= 0.975 <= hi <= 0.99


def test_the_median_interval_says_how_often_it_holds_the_median():
    """16 timed pairs: x(4)..x(13) hold the median 97.9% of the time, not the 95% asked; 4
    pairs (the fewest the speed gate times) can only give their range, 87.5%."""
    assert median_coverage(16, 0.95) == pytest.approx(0.9787, abs=1e-4)
    assert median_coverage(4, 0.95) == 0.875
    rng = np.random.default_rng(0)
    held = [
        lo <= 0 <= hi
        for lo, hi in (median_interval(rng.normal(size=16), 0.95) for _ in range(4000))
    ]
    assert np.mean(held) == pytest.approx(median_coverage(16, 0.95), abs=0.01)
