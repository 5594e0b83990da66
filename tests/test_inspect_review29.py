"""`sinkfix inspect` across domains when one domain's metrics are undefined (no row saw a key outside
the sink set: a 3-token text under n_sink=4): the combined sink share, the sink layers and every flip
between the other domains went blank (found by a review)."""

from __future__ import annotations

import pytest
import torch

import sinkfix
from sinkfix.analysis.inspection import dormancy_flips, inspect

from .conftest import CharTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = float("nan")
PROSE = "the cat sat on the mat and the dog sat on the log. " * 12
CODE = "for i in range(10):\n    total += i * i\n" * 12


def test_a_domain_with_an_undefined_score_does_not_hide_a_flip_between_the_others():
    scores = {"a": torch.tensor([[0.6, 0.2]]), "b": torch.tensor([[0.4, 0.3]]), "c": torch.tensor([[NAN, 0.7]])}
    flips = dormancy_flips(scores, 0.05)
    by_head = {f["head"]: f for f in flips}
    assert by_head[0]["dormant_on"] == ["a"] and by_head[0]["active_on"] == ["b"]
    assert by_head[0]["scores"] == {"a": 0.6, "b": 0.4}  # c is in neither list, and has no score
    assert by_head[1]["dormant_on"] == ["c"] and by_head[1]["active_on"] == ["a", "b"]
    # a head no domain has (NaN everywhere) and one only a single domain defines are no flip
    assert dormancy_flips({"a": torch.tensor([[NAN]]), "b": torch.tensor([[NAN]])}, 0.05) == []
    assert dormancy_flips({"a": torch.tensor([[0.9]]), "b": torch.tensor([[NAN]])}, 0.05) == []


def test_the_overall_metrics_average_over_the_domains_that_define_them():
    model = tiny_model("llama", seed=3)
    with torch.no_grad(), sinkfix.patch(model, sinkfix.Policy(n_sink=4, sink_scale=0.8)):
        report = inspect(model, CharTokenizer(), {"prose": PROSE, "code": CODE, "tiny": "hi"}, seq_len=64,
                         max_tokens=256, progress=False)
        defined = inspect(model, CharTokenizer(), {"prose": PROSE, "code": CODE}, seq_len=64, max_tokens=256,
                          progress=False)
    tiny = report.domains["tiny"]
    assert torch.isnan(tiny.sink_share).all() and torch.isnan(tiny.dormancy).all()
    overall, expected = report.overall, defined.overall
    for name in ("sink_share", "dormancy", "dormant_fraction"):
        assert not torch.isnan(getattr(overall, name)).any(), name
        torch.testing.assert_close(getattr(overall, name), getattr(expected, name), msg=name)
    assert report.sink_layers(0.0) == defined.sink_layers(0.0) != []
