"""Leave-one-domain-out evaluation: every domain scored by a profile rebuilt without it."""

from __future__ import annotations

import math

import pytest
import torch

from sinkfix.analysis.calibration import CalibrationError, CalibrationSettings, fit_domains
from sinkfix.analysis.lodo import GLOBAL_SWEEP, evaluate_parameters, evaluation_windows, leave_one_domain_out
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
