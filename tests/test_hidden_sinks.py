"""Arguments of sinkfix.analysis.hidden_sinks: refused before the model is patched, never a guard
that quietly protects nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import sinkfix
from sinkfix.analysis.hidden_sinks import HiddenSinkGuard, protecting_hidden_sinks
from sinkfix.caches import SinkCache
from sinkfix.errors import CacheError, UsageError

from .conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_and_cache():
    model = tiny_model("llama")
    return model, SinkCache(model.config, n_sink=1, window=None, bits=2, residual_length=8)


@pytest.mark.parametrize("threshold", [5, 1, 1.0, 0, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_a_threshold_outside_0_1_is_refused(model_and_cache, threshold):
    model, cache = model_and_cache
    with pytest.raises(UsageError, match=r"threshold must be a number in \(0, 1\)"):
        with protecting_hidden_sinks(model, cache, threshold=threshold):
            pytest.fail("the guard ran")
    assert sinkfix.PatchHandle.of(model) is None  # refused before the temporary patch


@pytest.mark.parametrize("min_rows", [0, -3, 2.5, 8.0, True, "8", None])
def test_min_rows_must_be_an_integer_of_at_least_one(model_and_cache, min_rows):
    model, cache = model_and_cache
    with pytest.raises(UsageError, match="min_rows must be an integer >= 1"):
        with protecting_hidden_sinks(model, cache, min_rows=min_rows):
            pytest.fail("the guard ran")
    assert sinkfix.PatchHandle.of(model) is None
    with pytest.raises(UsageError, match="min_rows must be an integer >= 1"):
        HiddenSinkGuard(cache, min_rows=min_rows)


def test_a_cache_that_cannot_keep_hidden_sinks_is_refused():
    model = tiny_model("llama")
    with pytest.raises(CacheError, match="cache must be a sinkfix SinkCache .*got DynamicCache"):
        with protecting_hidden_sinks(model, DynamicCache()):
            pytest.fail("the guard ran")
    assert sinkfix.PatchHandle.of(model) is None


def test_valid_arguments_are_kept(model_and_cache):
    model, cache = model_and_cache
    with protecting_hidden_sinks(model, cache, threshold=0.5, min_rows=1) as guard:
        assert (guard.threshold, guard.min_rows) == (0.5, 1)
        model(torch.randint(1, 97, (1, 12)), cache=cache, use_cache=True)
    assert sinkfix.PatchHandle.of(model) is None
