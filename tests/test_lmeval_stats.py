"""Paired statistics of ``sinkfix eval`` against hand computations (no lm-eval, no model needed)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from sinkfix.errors import UsageError
from sinkfix.lmeval.stats import (EXACT_SIGN_FLIP_ITEMS, compare_paired, is_binary, mcnemar_exact, paired_bootstrap,
                                  sign_flip_test)


def mean(values):
    return sum(values) / len(values)


def weighted_perplexity(items):
    """lm-eval's aggregation of rolling log-likelihood items (loglikelihood, words), written out."""
    return math.exp(-sum(ll for ll, _ in items) / sum(n for _, n in items))


def test_mcnemar_by_hand():
    stock = [1, 1, 0, 0, 1, 0, 1, 1]
    corrected = [1, 0, 1, 1, 1, 1, 1, 1]
    # discordant: item 1 lost (b = 1); items 2, 3, 5 gained (c = 3); n = 4
    # p = 2 * P(Bin(4, 1/2) <= 1) = 2 * (1 + 4) / 16 = 0.625
    assert mcnemar_exact(stock, corrected) == (0.625, 1, 3)
    # six gained, none lost: p = 2 * (1/2)^6 = 0.03125
    assert mcnemar_exact([0] * 6 + [1], [1] * 7) == (0.03125, 0, 6)
    # no discordant pair: no evidence of any change
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == (1.0, 0, 0)
    # b = c = 2: p = 2 * P(Bin(4, 1/2) <= 2) = 2 * 11/16 > 1, capped at 1
    assert mcnemar_exact([1, 1, 0, 0], [0, 0, 1, 1])[0] == 1.0


def test_bootstrap_moments_match_the_plug_in_formulas():
    """For a mean, the bootstrap distribution of the paired difference has mean d_bar and variance
    (1/n) * (1/n) * sum (d_i - d_bar)^2 exactly; 20000 draws must land within Monte-Carlo error."""
    stock = [0.2, 0.5, 0.9, 0.4, 0.7, 0.1, 0.3, 0.8]
    corrected = [0.3, 0.5, 1.0, 0.2, 0.9, 0.4, 0.3, 1.0]
    d = [c - s for s, c in zip(stock, corrected)]  # 0.1, 0, 0.1, -0.2, 0.2, 0.3, 0, 0.2
    d_bar = sum(d) / 8  # 0.7 / 8 = 0.0875
    variance = sum((x - d_bar) ** 2 for x in d) / 8 / 8
    draws = paired_bootstrap(stock, corrected, mean, iterations=20000, seed=3)
    assert d_bar == pytest.approx(0.0875)
    assert draws.mean() == pytest.approx(d_bar, abs=4 * math.sqrt(variance / 20000))
    assert draws.var() == pytest.approx(variance, rel=0.05)


def test_bootstrap_matches_exact_enumeration():
    """With 3 items there are 27 equally likely resamples: the Monte-Carlo CDF of the difference must
    follow the exactly enumerated one."""
    stock, corrected = [0, 1, 1], [1, 1, 0]
    exact = sorted(mean([corrected[i] for i in r]) - mean([stock[i] for i in r])
                   for r in itertools.product(range(3), repeat=3))
    draws = paired_bootstrap(stock, corrected, mean, iterations=40000, seed=11)
    for point in sorted(set(exact)):
        want = sum(x <= point + 1e-12 for x in exact) / 27
        assert np.mean(draws <= point + 1e-12) == pytest.approx(want, abs=0.01)


def test_compare_paired_on_accuracy():
    stock = [1, 1, 0, 0, 1, 0, 1, 1]
    corrected = [1, 0, 1, 1, 1, 1, 1, 1]
    result = compare_paired(stock, corrected, mean, iterations=4000, seed=0)
    assert (result.stock, result.corrected) == (5 / 8, 7 / 8)
    assert result.delta == pytest.approx(0.25)
    assert result.test == "mcnemar-exact"
    assert (result.p_value, result.stock_only, result.corrected_only) == (0.625, 1, 3)
    assert result.ci_low <= result.delta <= result.ci_high
    # the percentile interval of the 4000 draws, computed again here
    draws = paired_bootstrap(stock, corrected, mean, iterations=4000, seed=0)
    assert (result.ci_low, result.ci_high) == tuple(np.quantile(draws, [0.025, 0.975]))


def test_compare_paired_on_weighted_perplexity_by_hand():
    stock = [(-10.0, 5), (-6.0, 3)]
    corrected = [(-9.0, 5), (-6.0, 3)]
    result = compare_paired(stock, corrected, weighted_perplexity, iterations=500, seed=0)
    assert result.stock == pytest.approx(math.exp(16 / 8))  # e^2
    assert result.corrected == pytest.approx(math.exp(15 / 8))
    assert result.delta == pytest.approx(math.exp(1.875) - math.exp(2))
    assert result.test == "sign-flip-exact"
    # every resample that holds item 0 improves and none gets worse: the interval lies below zero or
    # touches it (the draw of item 1 twice)
    assert result.ci_high <= 0
    # two items, one unchanged: each of the 4 swap patterns gives +-delta, so nothing tells the
    # change from a relabelling (the inverted bootstrap interval gave 0.58 here)
    assert result.p_value == 1.0
    assert result.stock_only is None


def test_identical_runs_give_a_zero_interval_and_p_one():
    values = [(-3.0, 2), (-5.0, 4), (-1.0, 1)]
    result = compare_paired(values, list(values), weighted_perplexity, iterations=300)
    assert (result.delta, result.ci_low, result.ci_high, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_binary_detection():
    assert is_binary([True, False, 1, 0.0, np.int64(1)])
    assert not is_binary([0, 1, 2])
    assert not is_binary([0.5, 1])
    assert not is_binary([(-1.0, 2)])


@pytest.mark.parametrize("stock, corrected, iterations", [([], [], 10), ([1], [1, 0], 10), ([1], [0], 0)])
def test_bad_bootstrap_input(stock, corrected, iterations):
    with pytest.raises(UsageError):
        paired_bootstrap(stock, corrected, mean, iterations=iterations)


def test_bad_confidence():
    with pytest.raises(UsageError, match="confidence"):
        compare_paired([1], [0], mean, confidence=1.0)


def test_negative_seed_is_refused_by_the_settings_and_the_bootstrap():
    """numpy refuses a negative seed only when the first bootstrap draw is made, after both runs."""
    from sinkfix.lmeval.config import EvalConfig

    with pytest.raises(UsageError, match="--seed must be >= 0, got -1"):
        EvalConfig(seed=-1).validate()
    EvalConfig(seed=0).validate()
    with pytest.raises(UsageError, match="seed must be >= 0, got -3"):
        paired_bootstrap([1, 0], [0, 1], mean, iterations=10, seed=-3)


def test_a_nan_item_gives_a_nan_p_value_with_its_nan_interval():
    result = compare_paired([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0], mean, iterations=50)
    assert math.isnan(result.delta) and math.isnan(result.ci_low) and math.isnan(result.ci_high)
    assert result.test == "sign-flip-exact" and math.isnan(result.p_value)


def test_sinkfix_works_without_lm_eval():
    """lm-eval is an optional extra: with it unimportable, sinkfix and its CLI still import, and
    `sinkfix eval` says in one line how to install it."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "lm_eval" or name.startswith("lm_eval."):
                    raise ImportError("lm_eval is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        import sinkfix
        from sinkfix.cli import main
        code = main(["eval", "--limit", "1"])
        assert not any(m == "lm_eval" or m.startswith("lm_eval.") for m in sys.modules)
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == ("sinkfix eval: error: sinkfix eval needs lm-evaluation-harness: "
                                   "pip install 'sinkfix[eval]'")


def test_sign_flip_p_value_by_hand():
    """Three documents, all better after the correction: of the 8 swap patterns only the observed one
    and its mirror reach |delta|, so p = 2/8 whatever the size of the change (the inverted bootstrap
    interval gave 0.001, its floor, for any change)."""
    stock = [(-30.0, 10), (-42.0, 12), (-25.0, 9)]
    corrected = [(-29.0, 10), (-41.5, 12), (-24.0, 9)]
    assert sign_flip_test(stock, corrected, weighted_perplexity) == (0.25, True)
    result = compare_paired(stock, corrected, weighted_perplexity, iterations=2000)
    assert (result.test, result.p_value) == ("sign-flip-exact", 0.25)


def test_sign_flip_exact_enumeration_of_a_mean():
    stock = [0.2, 0.5, 0.9, 0.4, 0.7]
    corrected = [0.3, 0.5, 1.0, 0.2, 0.9]
    d = [c - s for s, c in zip(stock, corrected)]
    observed = abs(sum(d))
    # sum of +-d_i over every sign pattern, counted by hand
    reached = sum(abs(sum(sign * x for sign, x in zip(signs, d))) >= observed - 1e-12
                  for signs in itertools.product((1, -1), repeat=5))
    assert sign_flip_test(stock, corrected, mean) == (pytest.approx(reached / 32), True)


def test_sign_flip_draws_patterns_past_the_exact_limit():
    n = EXACT_SIGN_FLIP_ITEMS + 4
    stock = [float(i % 3) for i in range(n)]
    corrected = [v + 0.5 for v in stock]  # every item better by the same amount
    p, exact = sign_flip_test(stock, corrected, mean, iterations=999, seed=1)
    assert not exact
    assert p == sign_flip_test(stock, corrected, mean, iterations=999, seed=1)[0]  # seeded
    # only patterns that swap no item or every item reach |delta|: 2 / 2**16 of them, none drawn in 999
    assert p == pytest.approx(1 / 1000)
    assert compare_paired(stock, corrected, mean, iterations=999).test == "sign-flip-random"


def test_one_item_gives_no_interval():
    # before: [delta, delta], a zero-width interval from resampling the one item
    result = compare_paired([(-10.0, 5)], [(-9.0, 5)], weighted_perplexity, iterations=200)
    assert math.isnan(result.ci_low) and math.isnan(result.ci_high)
    assert result.p_value == 1.0  # the item and its swap: +-delta
