"""What a review of the latest fixes found they broke or left reachable: the monitor's log path after
the process changes directory, positional-only model arguments, format characters in domain labels,
the dormancy of a sink reached only while decoding, and a copied SinkCache's content-sink refusal."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix.errors import CacheError
from sinkfix.telemetry.monitor import LogWriteWarning
from sinkfix.telemetry.requests import check_domain_label

from .conftest import tiny_config, tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def _ids(length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(seed))


def test_a_relative_log_path_keeps_its_file_after_a_change_of_directory(tmp_path, monkeypatch):
    (tmp_path / "a" / "logs").mkdir(parents=True)
    (tmp_path / "b" / "logs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    model = tiny_model("llama")
    with torch.no_grad(), sinkfix.monitor(model, log="logs/m.jsonl") as mon, warnings.catch_warnings():
        warnings.simplefilter("error", category=LogWriteWarning)
        mon.forward(input_ids=_ids())
        os.chdir(tmp_path / "b")  # a server that changes directory after start-up
        mon.forward(input_ids=_ids())
        mon.forward(input_ids=_ids())
    assert len((tmp_path / "a" / "logs" / "m.jsonl").read_text().splitlines()) == 3
    assert not (tmp_path / "b" / "logs" / "m.jsonl").exists()


def test_a_positional_only_model_argument_stays_positional():
    class PositionalIds(tf.LlamaForCausalLM):
        def forward(self, ids=None, /, **kwargs):
            if ids is not None:
                kwargs["input_ids"] = ids
            return super().forward(**kwargs)

    torch.manual_seed(0)
    model = PositionalIds(tiny_config("llama")).eval()
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
        with sinkfix.monitor(model) as mon:
            assert torch.equal(mon.forward(ids).logits, expected)
    assert len(mon.records) == 1


@pytest.mark.parametrize("label", ["\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\U0001f469\u200d\U0001f4bb",
                                   "a\u00a0b", "web text", "caf\u00e9"])
def test_format_characters_and_inner_spaces_are_a_names_own(label):
    check_domain_label(label)


def test_a_sink_reached_only_while_decoding_with_none_in_the_prompt_has_no_dormancy():
    """n_sink=0 and one extra sink position past a 12-token prompt: its mass is counted in the sink
    share, and the dormancy's sink part has no drain weight to use: null, not the mass left out."""
    model = tiny_model("llama")
    ids = _ids(12)
    with torch.no_grad(), sinkfix.patch(model, sinkfix.Policy(n_sink=0, extra_sink_positions=(14,))), \
            sinkfix.monitor(model, hidden_sink_threshold=0.999) as mon:
        mon.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                     do_sample=False)
    record = mon.records[0]
    shares = [x for layer in record["sink_share"] for x in layer]
    assert all(x is not None and x > 0 for x in shares)
    assert all(x is None for layer in record["dormancy"] for x in layer)
    assert record["dormant_heads"] == 0 and record["value_drain"] == [[None, None], [None, None]]


def test_a_copied_sink_cache_refuses_content_sinks_before_storing_anything():
    model = tiny_model("llama")
    ids = _ids(30, 2)
    policy = sinkfix.Policy.parse("hidden_sink_scale=0.5,hidden_sink_threshold=0.05,layers=1")
    with torch.no_grad():
        cache = sinkfix.SinkCache(model.config, n_sink=2, window=8)
        model(input_ids=ids[:, :14], past_key_values=cache, use_cache=True)
        clean, copied = copy.deepcopy(cache), copy.deepcopy(cache)
        step = lambda c, i: model(input_ids=ids[:, i:i + 1], past_key_values=c, use_cache=True,  # noqa: E731
                                  position_ids=torch.tensor([[i]])).logits
        with sinkfix.patch(model, policy):
            with pytest.raises(CacheError, match="nothing of this call was stored"):
                step(copied, 14)
        assert [layer.seen for layer in copied.layers] == [layer.seen for layer in clean.layers] == [14, 14]
        assert torch.equal(step(copied, 14), step(clean, 14))
