"""What a review of the latest fixes found: a deep copy of a submodule taken inside a request (its
forwards were counted in the request), a cache deep-copied beside its model (the copy checked the
original model's modules), labels with lone surrogates (every later Prometheus scrape failed), a
positional mask on a compiled model (refused after the forward), duplicates among three texts, and a
log opened in a removed working directory."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import sinkfix
from sinkfix.analysis.calibration import CalibrationSettings, domain_windows, duplicate_windows
from sinkfix.errors import MonitorError, OutputError
from sinkfix.files import LineLog
from sinkfix.telemetry.requests import check_domain_label

from .conftest import CharTokenizer, tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def _ids(length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("part", ["model", "layer"])
def test_a_submodule_copied_inside_a_request_is_not_counted_in_it(part):
    model = tiny_model("llama")
    ids = _ids()
    with torch.no_grad(), sinkfix.monitor(model) as mon:
        with mon.request():
            model(input_ids=ids)
            clone = copy.deepcopy(model.model if part == "model" else model.model.layers[0])
            if part == "model":
                clone(input_ids=ids)
            else:
                hidden = torch.randn(1, 20, model.config.hidden_size)
                position = model.model.rotary_emb(hidden, torch.arange(20)[None])
                clone(hidden, position_embeddings=position)
        assert mon.records[0]["tokens"] == 20
        with mon.request():
            model(input_ids=ids)
        alone = mon.records[0]
    # the copy's forwards changed nothing in the records, and run outside a request without failing
    assert alone["tokens"] == 20
    if part == "model":
        with torch.no_grad():
            clone(input_ids=ids)


def test_a_cache_copied_beside_its_model_serves_the_copy():
    model = tiny_model("llama")
    ids = _ids(30, 2)
    policy = sinkfix.Policy.parse("hidden_sink_scale=0.5,hidden_sink_threshold=0.05,layers=1")
    with torch.no_grad():
        cache = sinkfix.SinkCache(model.config, n_sink=2, window=8)
        with sinkfix.patch(model, policy):
            model(input_ids=ids[:, :11], past_key_values=cache, use_cache=True)  # evicts after storing: served
            model_copy, cache_copy = copy.deepcopy((model, cache))  # the model copy is unpatched
            for i in range(11, 16):
                model_copy(input_ids=ids[:, i:i + 1], past_key_values=cache_copy, use_cache=True,
                           position_ids=torch.tensor([[i]]))
            # the original, still patched, is still refused early
            with pytest.raises(sinkfix.errors.CacheError, match="nothing of this call was stored"):
                model(input_ids=ids[:, 11:12], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[11]]))
    assert [layer.seen for layer in cache_copy.layers] == [16, 16] and [layer.seen for layer in cache.layers] == [11, 11]


@pytest.mark.parametrize("label", ["x\ud800y", "a\u2028b", "a\u2029b", "left\u202eright"])
def test_labels_that_cannot_be_encoded_or_reorder_a_line_are_refused(label):
    with pytest.raises(MonitorError, match="control character"):
        check_domain_label(label)


def test_a_positional_right_padded_mask_on_a_compiled_model_is_refused_before_it_runs():
    torch._dynamo.reset()
    model = tiny_model("llama")
    sinkfix.patch(model, sinkfix.Policy(sink_scale=0.5))
    compiled = torch.compile(model, backend="eager")
    ids = torch.cat([_ids(10), _ids(10, 2)])
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    calls = [0]
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    with torch.no_grad(), sinkfix.monitor(compiled) as mon:
        calls[0] = 0
        with pytest.raises(MonitorError, match="right padding"):
            mon.forward(ids, mask)
        assert calls[0] == 0
    torch._dynamo.reset()


def test_every_repeated_pair_among_three_texts_is_named():
    long = "".join(f"line {i}: the value of x is {i * i} and y is {i + 3}\n" for i in range(120))
    texts = {"part": long[:1500], "whole": long, "shifted": " " + long}
    found = duplicate_windows(domain_windows(CharTokenizer(), texts, CalibrationSettings(seq_len=64)))
    pairs = {(d.first, d.copy, d.contained) for d in found}
    assert ("whole", "shifted", False) in pairs and ("whole", "part", True) in pairs


def test_a_log_opened_in_a_removed_working_directory_names_its_path(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    os.rmdir(gone)
    with pytest.raises(OutputError, match="logs/m.jsonl"):
        LineLog("logs/m.jsonl")


def test_measure_kvquant_refuses_a_residual_length_fp8_would_ignore():
    from sinkfix.analysis.kvquant import measure_kvquant
    from sinkfix.errors import UsageError

    model = tiny_model("llama")
    with pytest.raises(UsageError, match="residual_length with backend 'fp8'"):
        measure_kvquant(model, [_ids(24)[0]], bits=[8], backend="fp8", residual_length=16, chunk=8)
    rows = measure_kvquant(model, [_ids(24)[0]], bits=[8], backend="fp8", chunk=8)
    assert rows[0].tokens > 0
