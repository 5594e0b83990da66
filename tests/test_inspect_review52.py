"""Review 52: report.json's "dormant" lists say nothing (null) where a head's dormancy is undefined."""

from __future__ import annotations

import json

import pytest
import torch

import sinkfix
from sinkfix.analysis.inspection import inspect

from .conftest import CharTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROSE = "the cat sat on the mat and the dog sat on the log. " * 12


def test_an_undefined_dormancy_is_null_in_the_dormant_lists_not_active(tmp_path):
    # a 2-token text under n_sink=4: no row sees a non-sink key, so the dormancy is undefined
    # (null); the "dormant" list said false there, i.e. "active"
    model = tiny_model("llama", seed=3)
    with torch.no_grad(), sinkfix.patch(model, sinkfix.Policy(n_sink=4, sink_scale=0.9)):
        report = inspect(model, CharTokenizer(), {"short": "ab", "prose": PROSE}, seq_len=64, max_tokens=200,
                         progress=False)
    data = json.loads(json.dumps(report.to_dict()))
    assert all(v is None for row in data["domains"]["short"]["dormancy"] for v in row)
    assert all(v is None for row in data["dormant"]["short"] for v in row)
    # where it is defined, the flags are the threshold rule's, true and false alike
    prose = report.domains["prose"].dormancy
    assert not prose.isnan().any()
    assert data["dormant"]["prose"] == (prose >= 0.5).tolist()
    assert "i>=1" not in data["rule"]["dormancy"]
