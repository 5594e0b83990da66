"""Leave-one-domain-out evaluation: every domain scored by a profile rebuilt without it."""

from __future__ import annotations

import math

import pytest
import torch

from sinkfix.analysis.calibration import CalibrationError, CalibrationSettings, fit_domains
from sinkfix.analysis.lodo import (GLOBAL_SWEEP, WindowScores, change_intervals, evaluate_parameters,
                                   evaluation_windows, leave_one_domain_out, window_scores)
from sinkfix.analysis.robust import candidates

from .conftest import CharTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = {
    "prose": "the cat sat on the mat and the dog sat on the log. " * 30,
    "code": "for i in range(10):\n    total += i * i\n" * 40,
    "list": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 40,
}
EVAL = {"prose": "a bird flew over the wall and a fox ran past the hall. " * 12, "code": None,
        "list": "11, 12, 13, 14, 15, 16, 17, 18, 19, 20, " * 12}


@pytest.fixture(scope="module")
def fitted():
    model, tok = tiny_model("llama"), CharTokenizer()
    fits = fit_domains(model, tok, CALIB, CalibrationSettings(seq_len=64, steps=24, lr=0.3, eval_every=4),
                       progress=False)
    return model, tok, fits


def test_every_domain_is_scored_without_and_with_itself(fitted):
    model, tok, fits = fitted
    cache, eval_cache = {}, {}
    result = leave_one_domain_out(model, tok, fits, EVAL, eval_windows=3, cache=cache, eval_cache=eval_cache,
                                  progress=False)
    rows = {r["domain"]: r for r in result.rows()}
    assert list(rows) == list(CALIB)
    assert rows["prose"]["source"] == "evaluation text" and rows["prose"]["tokens"] == 3 * 63
    assert rows["code"]["source"] == "validation windows"  # no evaluation text given
    assert set(result.global_beta) == set(GLOBAL_SWEEP)
    for d, r in rows.items():
        assert r["best_global_change"] <= 0  # the identity (beta 1.0) is in the sweep
        assert math.isclose(r["without_change"], math.exp(result.without[d] - result.stock[d]) - 1)
        assert r["without_chosen"] in {c.name for c in candidates()}
    table = result.markdown()
    assert all(f"| {d} |" in table for d in CALIB) and "best global beta" in table
    # the caches hold every score: a second run evaluates nothing new and agrees
    again = leave_one_domain_out(model, tok, fits, EVAL, eval_windows=3, cache=cache, eval_cache=eval_cache,
                                 progress=False)
    assert again.without == result.without and again.with_all == result.with_all


def test_the_rebuilt_profiles_never_saw_the_left_out_domain(fitted, monkeypatch):
    """Each rebuilt profile is chosen from the other domains' fits and validation windows only."""
    from sinkfix.analysis import lodo

    model, tok, fits = fitted
    seen = []
    real = lodo.robust_profile

    def spy(model, fits, domains=None, *args, **kwargs):
        seen.append(None if domains is None else tuple(domains))
        return real(model, fits, domains, *args, **kwargs)

    monkeypatch.setattr(lodo, "robust_profile", spy)
    leave_one_domain_out(model, tok, fits, EVAL, eval_windows=2, progress=False)
    assert seen == [("code", "list"), ("prose", "list"), ("prose", "code"), None]


def test_evaluate_parameters_scores_each_parameter_set_once(fitted):
    model, tok, fits = fitted
    windows, _ = evaluation_windows(tok, EVAL, fits, 2)
    ones = (torch.ones(fits.shape), None)
    cache: dict = {}
    nll = evaluate_parameters(model, fits, windows, {"a": (ones, "prose"), "b": (ones, "prose")}, cache=cache,
                              progress=False)
    assert nll["a"] == nll["b"] and len(cache) == 1


def test_two_domains_leave_nothing_to_choose_with(fitted):
    model, tok, _ = fitted
    two = fit_domains(model, tok, {d: CALIB[d] for d in ("prose", "code")},
                      CalibrationSettings(seq_len=64, steps=2, eval_every=1), progress=False)
    with pytest.raises(CalibrationError, match="at least three domains; got 2"):
        leave_one_domain_out(model, tok, two, EVAL, progress=False)


def test_window_scores_add_up_to_the_evaluated_mean_exactly(fitted):
    model, tok, fits = fitted
    windows, _ = evaluation_windows(tok, EVAL, fits, 3)
    jobs = {"stock": ((torch.ones(fits.shape), None), "list"), "beta": ((torch.full(fits.shape, 0.7), None), "list")}
    per_window = window_scores(model, fits, windows, jobs, progress=False)
    means = evaluate_parameters(model, fits, windows, jobs, progress=False)
    for name in jobs:
        assert [n for _, n in per_window[name]] == [63, 63, 63]
        assert sum(x for x, _ in per_window[name]) / 189 == means[name]
    assert per_window["beta"] != per_window["stock"]  # the parameters were applied


def _scores(**per_config) -> WindowScores:
    tokens = [100] * len(next(iter(per_config.values())))
    return WindowScores({k: [100 * x for x in v] for k, v in per_config.items()}, tokens)


def test_change_intervals_point_values_follow_the_table_formula():
    stock = [2.0, 2.2, 1.8, 2.1]
    scores = _scores(stock=stock, b1=[x - 0.01 for x in stock], b2=[x + 0.02 for x in stock],
                     profile=[x - 0.05 for x in stock])
    out = change_intervals(scores, reference="stock", baselines=["b1", "b2"], compared=["profile"])
    assert out["best baseline"]["change"].value == pytest.approx(math.expm1(-0.01))
    assert out["profile"]["change"].value == pytest.approx(math.expm1(-0.05))
    assert out["profile"]["minus_best_baseline"].value == pytest.approx(math.expm1(-0.05) - math.expm1(-0.01))
    # a shift that is the same in every window: every draw gives it, the interval has no width
    assert out["profile"]["change"].low == pytest.approx(out["profile"]["change"].high)


def test_change_intervals_tell_a_sure_gain_from_a_coin_flip():
    rng = torch.Generator().manual_seed(0)
    stock = (2 + 0.3 * torch.randn(16, generator=rng)).tolist()
    noise = (0.05 * torch.randn(16, generator=rng)).tolist()
    sure = [s - 0.03 + n / 10 for s, n in zip(stock, noise)]  # better in every window
    flip = [s + (0.04 if i % 2 else -0.04) for i, s in enumerate(stock)]  # better in half, worse in half
    out = change_intervals(_scores(stock=stock, sure=sure, flip=flip), reference="stock", baselines=[],
                           compared=["sure", "flip"])
    assert out["sure"]["change"].high < 0
    assert out["flip"]["change"].low < 0 < out["flip"]["change"].high
    for name in ("sure", "flip"):
        c = out[name]["change"]
        assert c.low <= c.value <= c.high


def test_change_intervals_choose_the_best_baseline_in_every_draw():
    """Two baselines that each win half of the windows: the best of them, chosen per draw, is never
    worse than the better one on all windows, and the stock (change 0) is always a candidate."""
    stock = [2.0] * 8
    b1 = [2.0 - (0.04 if i < 4 else -0.03) for i in range(8)]
    b2 = [2.0 - (0.04 if i >= 4 else -0.03) for i in range(8)]
    out = change_intervals(_scores(stock=stock, b1=b1, b2=b2, worse=[2.1] * 8), reference="stock",
                           baselines=["b1", "b2", "worse"], compared=["b1"])
    best = out["best baseline"]["change"]
    assert best.value == pytest.approx(math.expm1(0.005 * -1)) and best.high <= 0
    assert out["b1"]["minus_best_baseline"].value == pytest.approx(0.0, abs=1e-12)
    assert out["b1"]["minus_best_baseline"].low >= -1e-12  # never ahead of a best that includes itself


def test_change_intervals_refuse_what_they_cannot_resample():
    good = _scores(stock=[2.0, 2.1], p=[1.9, 2.0])
    with pytest.raises(ValueError, match="no window scores for 'q'"):
        change_intervals(good, reference="stock", baselines=[], compared=["q"])
    with pytest.raises(ValueError, match="confidence"):
        change_intervals(good, reference="stock", baselines=[], compared=["p"], confidence=1.0)
    with pytest.raises(ValueError, match="finite"):
        change_intervals(WindowScores({"stock": [2.0, float("nan")], "p": [1.0, 1.0]}, [10, 10]),
                         reference="stock", baselines=[], compared=["p"])
    with pytest.raises(ValueError, match="did not score the same windows"):
        WindowScores.from_pairs({"stock": [(1.0, 10), (1.0, 10)], "p": [(1.0, 10)]})


def test_per_window_scoring_gives_the_same_table_and_intervals_around_it(fitted):
    model, tok, fits = fitted
    cache = {}
    plain = leave_one_domain_out(model, tok, fits, EVAL, eval_windows=3, cache=cache, progress=False)
    windowed = leave_one_domain_out(model, tok, fits, EVAL, eval_windows=3, cache=cache, progress=False,
                                    per_window=True)
    assert windowed.stock == plain.stock and windowed.without == plain.without
    assert windowed.with_all == plain.with_all and windowed.global_beta == plain.global_beta
    assert plain.windows == {} and plain.intervals() == {} and "intervals" not in plain.to_dict()
    found = windowed.intervals()
    assert set(found) == set(CALIB)
    for r in windowed.rows():
        d = r["domain"]
        assert len(windowed.windows[d]["stock"]) == (3 if EVAL[d] is not None else len(fits.windows[d].val))
        unseen, best = found[d]["without"], found[d]["best baseline"]["change"]
        assert unseen["change"].value == pytest.approx(r["without_change"])
        assert best.value == pytest.approx(r["best_global_change"])
        assert unseen["minus_best_baseline"].value == pytest.approx(r["without_change"] - r["best_global_change"])
        assert unseen["change"].low <= unseen["change"].value <= unseen["change"].high
    assert set(windowed.to_dict()["intervals"]) == set(CALIB)


def test_change_intervals_of_one_window_have_no_width_to_show():
    """One window: every resample is that window, and the 'interval' was its point twice, printed and
    saved as [+0.43, +0.43]: now no interval (NaN, null in JSON)."""
    out = change_intervals(_scores(stock=[2.0], profile=[1.9]), reference="stock", baselines=[],
                           compared=["profile"])
    change = out["profile"]["change"]
    assert change.value == pytest.approx(math.expm1(-0.1))
    assert math.isnan(change.low) and math.isnan(change.high)
