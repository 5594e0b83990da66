"""Telemetry in the cases review 25 found wrong: the dormancy of a sink set of several positions (the
first sink's drain weight was applied to the whole sink mass), a log file removed under a running
monitor (later records went into the unlinked file), a generation config or mask given positionally
(beam search crashed mid-request, right padding was refused after the forward), close() inside a
request, arguments not checked when the monitor is made, and domain labels with control characters
or edge whitespace."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from transformers import GenerationConfig

import sinkfix
from sinkfix.errors import MonitorError
from sinkfix.patch import PatchHandle
from sinkfix.telemetry.requests import check_domain_label, read_requests

from .conftest import tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(seed))


def _fp64_dormancy(model, ids, sinks: list[int]) -> torch.Tensor:
    """(L, H) dormancy of docs/formulas.md from a float64 eager copy of the stock model: per row,
    sum over the sink keys of p_ij times that key's drain weight clamp(1 - |v_j| / median |v|, 0, 1),
    averaged over the rows that see a non-sink key."""
    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation("eager")
    values = {}
    for index, layer in enumerate(ref.model.layers):
        layer.self_attn.v_proj.register_forward_hook(lambda m, a, out, index=index: values.__setitem__(index, out))
    with torch.no_grad():
        attentions = ref(input_ids=ids, output_attentions=True, use_cache=False).attentions
    cfg = model.config
    kv, dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // kv
    out = []
    for index, probs in enumerate(attentions):
        probs = probs[0]  # (H, n, n)
        n = probs.shape[-1]
        norms = values[index][0].view(n, kv, dim).norm(dim=-1).T  # (Hkv, n)
        weights = (1 - norms / norms.median(-1).values[:, None]).clamp(0, 1).repeat_interleave(group, 0)
        rows = [i for i in range(n) if any(j not in sinks for j in range(i + 1))]
        out.append((probs[:, rows][:, :, sinks] * weights[:, None, sinks]).sum(-1).mean(-1))
    return torch.stack(out)


# -- 1: several sink positions, each with its own drain weight ------------------------------------
@pytest.mark.parametrize("spec, sinks", [("identity", [0]), ("n_sink=2", [0, 1]), ("n_sink=3", [0, 1, 2]),
                                         ("extra_sink_positions=7", [0, 7]),
                                         ("sink_scale=0.8,n_sink=2,layers=1", [0, 1])])
def test_dormancy_of_a_several_position_sink_set_matches_fp64(spec, sinks):
    model = tiny_model("llama")
    ids = _ids(48)
    expected = _fp64_dormancy(model, ids, sinks)
    # corrected in the last layer only: its input stays stock, so the stock model's fp64 probabilities
    # are its own, the sink part scaled by beta
    beta = torch.tensor([[1.0], [0.8]], dtype=torch.float64) if "sink_scale" in spec else 1.0
    with torch.no_grad(), sinkfix.patch(model, sinkfix.Policy.parse(spec)), \
            sinkfix.monitor(model, sample_rows=64) as mon:  # every row sampled: the documented exact case
        mon.forward(input_ids=ids, use_cache=False)
        got = torch.tensor(mon.records[0]["dormancy"], dtype=torch.float64)
    # the monitor reports the applied dormancy (beta times the stock sink part; no hidden sinks here)
    assert sum(map(sum, mon.records[0]["hidden_sinks"])) == 0
    torch.testing.assert_close(got, beta * expected, atol=2e-6, rtol=0)


def test_several_sink_positions_per_row_under_left_padding():
    """Each padded row's dormancy equals the row alone (its sink columns sit past its padding)."""
    model = tiny_model("llama")
    long, short = _ids(40, 3), _ids(29, 4)
    with torch.no_grad(), sinkfix.patch(model, sinkfix.Policy.parse("n_sink=2")), \
            sinkfix.monitor(model, sample_rows=64) as mon:
        alone = []
        for ids in (long, short):
            mon.forward(input_ids=ids, use_cache=False)
            alone.append(mon.records[0]["dormancy"])
        batch = torch.cat([long, torch.cat([torch.zeros(1, 11, dtype=torch.long), short], 1)])
        mask = torch.ones_like(batch)
        mask[1, :11] = 0
        mon.forward(input_ids=batch, attention_mask=mask, use_cache=False)
        together = [record["dormancy"] for record in mon.records]
    for row, own in zip(together, alone):
        torch.testing.assert_close(torch.tensor(row), torch.tensor(own), atol=3e-6, rtol=0)


# -- 2: the log file removed under a running monitor ------------------------------------------------
def test_a_removed_log_is_created_again_at_its_path(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "t.jsonl"
    with torch.no_grad(), sinkfix.monitor(model, log=path) as mon, warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the record reaches the path
        mon.forward(input_ids=_ids(12))
        os.rename(path, tmp_path / "t.jsonl.1")  # log rotation
        mon.forward(input_ids=_ids(12))
        os.remove(path)
        mon.forward(input_ids=_ids(12))
        mon.forward(input_ids=_ids(12))
    assert len((tmp_path / "t.jsonl.1").read_text().splitlines()) == 1
    assert len(path.read_text().splitlines()) == 2


# -- 3, 4: arguments given positionally are checked before anything runs --------------------------
def _count_layer_calls(model) -> list[int]:
    calls = [0]
    model.model.layers[0].register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_beam_search_in_a_positional_generation_config_is_refused_before_it_runs():
    model = tiny_model("llama")
    calls = _count_layer_calls(model)
    config = GenerationConfig(num_beams=3, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad(), sinkfix.monitor(model) as mon:
        calls[0] = 0  # patching checks the attention path with a forward of its own
        with pytest.raises(MonitorError, match=r"beam search \(num_beams=3\)"):
            mon.generate(_ids(12), config)
        assert calls[0] == 0
        out = mon.generate(_ids(12), GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0))
    assert out.shape == (1, 14) and len(mon.records) == 1


def test_a_positional_right_padded_mask_is_refused_before_the_forward():
    model = tiny_model("llama")
    calls = _count_layer_calls(model)
    ids = torch.cat([_ids(10), _ids(10, 2)])
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with torch.no_grad(), sinkfix.monitor(model) as mon:
        calls[0] = 0  # patching checks the attention path with a forward of its own
        with pytest.raises(MonitorError, match="right padding"):
            mon.forward(ids, mask)
        assert calls[0] == 0


# -- 5: close() inside a request --------------------------------------------------------------------
def test_close_inside_a_request_leaves_no_record_and_says_so(tmp_path):
    model = tiny_model("llama")
    seen = []
    mon = sinkfix.monitor(model, log=tmp_path / "c.jsonl", callback=seen.append)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="closed during request"):
        with mon.request():
            model(input_ids=_ids(30))
            mon.close()
            model(input_ids=_ids(10))
    assert mon.records == [] and seen == [] and (tmp_path / "c.jsonl").read_text() == ""
    assert PatchHandle.of(model) is None  # the monitor's own identity patch is gone
    with pytest.raises(MonitorError, match="closed"):
        with mon.request():
            pass


# -- 6: arguments checked when the monitor is made ---------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [({"callback": "print"}, "callback must be a function"),
                                             ({"log": 123}, "log must be a file path")])
def test_bad_callback_and_log_are_refused_when_made(tmp_path, kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(MonitorError, match=message):
        sinkfix.monitor(model, **kwargs)
    assert PatchHandle.of(model) is None


# -- 7: domain labels that look like another -------------------------------------------------------
@pytest.mark.parametrize("label", ["co\nde", "code ", " code", "tab\there"])
def test_domain_labels_with_control_characters_or_edge_whitespace_are_refused(tmp_path, label):
    with pytest.raises(MonitorError, match="control character or starts or ends with whitespace"):
        check_domain_label(label)
    path = tmp_path / "r.jsonl"
    import json

    path.write_text(json.dumps({"prompt": "p"}) + "\n" + json.dumps({"prompt": "p", "domain": label}) + "\n")
    with pytest.raises(MonitorError, match=r"line 2: the domain"):
        read_requests(path)
    check_domain_label("code and prose")  # inner spaces are a name's own
