"""sinkfix.monitor on tiny random models: the records against inspect's offline statistics, the KV
cache, batches, the outputs (log, Prometheus over localhost, callback), one compiled graph, and bad
input. The guard has its own file (test_monitor_guard.py); the real model is in test_monitor_real.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import sys
import urllib.request

import pytest
import torch

import sinkfix
from sinkfix.analysis.metrics import StreamingCollector, measure_extreme_tokens
from sinkfix.errors import MonitorError, OutputError
from sinkfix.integrations import attention as attention_integration
from sinkfix.integrations.attention import AttentionCall
from sinkfix.ops.attention import sink_attention_torch
from sinkfix.telemetry import prompt as prompt_measures
from sinkfix.telemetry.accumulate import RequestAccumulator
from sinkfix.telemetry.prompt import (LayoutCache, Workspace, max_sampled_rows, measure_prompt,
                                      measure_sampled, measure_sampled_many, sample_call, sampled_rows)

from .conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

POLICIES = {
    "identity": sinkfix.Policy(),
    "profile-like": sinkfix.Policy(sink_scale=torch.tensor([[0.6, 0.9, 0.7, 1.0], [0.8, 0.5, 1.0, 0.95]]),
                                   virtual_sink_logit=torch.tensor([[0.5, -1.0, 0.0, 1.0], [-0.5, 0.2, 1.5, -2.0]])),
}


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _one_request(monitor, model, **kwargs) -> dict:
    with torch.no_grad(), monitor.request():
        model(**kwargs)
    (record,) = monitor.records
    return record


def _tensor(nested) -> torch.Tensor:
    return torch.tensor([[float("nan") if x is None else x for x in row] for row in nested], dtype=torch.float64)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gptoss"])
def test_record_matches_inspect_on_the_same_window(arch, policy, one_thread):
    """One forward = one request: sink share, residual peak and value drain are exact; with every
    row sampled (sample_rows >= Q) the dormancy and hidden sinks are exact too."""
    model = tiny_model(arch)
    ids = _ids(1, 48)
    with sinkfix.patch(model, POLICIES[policy]):
        reference = measure_extreme_tokens(model, [ids[0]])
        with sinkfix.monitor(model, sample_rows=64) as monitor:
            record = _one_request(monitor, model, input_ids=ids, use_cache=False)
    assert record["rows"] == [47, 47] and record["tokens"] == 48 == record["prompt_tokens"]
    torch.testing.assert_close(_tensor(record["sink_share"]), reference.sink_share, atol=1e-4, rtol=0)
    torch.testing.assert_close(_tensor(record["dormancy"]), reference.dormancy, atol=1e-4, rtol=0)
    torch.testing.assert_close(_tensor(record["hidden_sinks"]), reference.hidden_sink_rate, atol=0, rtol=0)
    torch.testing.assert_close(torch.tensor(record["residual_peak"], dtype=torch.float64), reference.residual_peak,
                               atol=0, rtol=1e-4)
    torch.testing.assert_close(_tensor(record["value_drain"]), reference.value_drain, atol=1e-4, rtol=0)
    assert record["dormant_heads"] == int((reference.dormancy >= 0.5).sum())
    unscaled = _tensor(record["sink_share_unscaled"])
    if policy == "identity":
        torch.testing.assert_close(unscaled, _tensor(record["sink_share"]), atol=0, rtol=0)
    else:  # sink scaling moved mass off the sink, and the record says how much
        assert (unscaled - _tensor(record["sink_share"])).max() > 0.005
        assert max(record["correction"]["moved_share"]) > 0.005


def _planted_hidden_sink(beta: torch.Tensor | None, sink_strength: float = 12.0) -> AttentionCall:
    """One attention call of 200 rows whose key 37 is a hidden sink with a drained value (as in real
    models: a punctuation token that many heads park on), on top of the first-token sink."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 200, 32, generator=g)
    k = torch.randn(1, 2, 200, 32, generator=g)
    v = torch.randn(1, 2, 200, 32, generator=g)
    u = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    q += 2.0 * u  # every query leans one way; keys 0 and 37 lie along it
    k[:, :, 0] += sink_strength * u
    k[:, :, 37] += 10.0 * u  # mean attention over its viewers ~0.14-0.18 > 0.1: a hidden sink
    v[:, :, 0] *= 0.1
    v[:, :, 37] *= 0.05
    result = sink_attention_torch(q, k, v, causal=True, first_column_sink=True, beta=beta, need_sink_stats=True)
    return AttentionCall(0, None, q, k, v, None, True, 32 ** -0.5, None, None, None, None, None, beta, result)


def _offline_measures(call: AttentionCall):
    """inspect's numbers for one call of the 200-row planted prompt (StreamingCollector, every row)."""
    collector = StreamingCollector(1, [4])
    collector.begin_window(torch.zeros(1, 200, dtype=torch.long))
    collector.observe(dataclasses.replace(call, sink_cols=torch.zeros(1, 1, dtype=torch.long)))
    return collector.result()


@pytest.mark.parametrize("beta", [None, torch.tensor([0.5, 0.9, 1.0, 0.7])])
def test_prompt_measures_against_the_offline_collector(beta):
    """With every row sampled the prompt's hidden sinks and dormancy are inspect's (StreamingCollector
    on the same call); with 1 row in 8 they are an estimate that still finds the planted sink."""
    call = _planted_hidden_sink(beta)
    reference = _offline_measures(call)
    rows = call.result.sink_stats[..., 1]
    share = call.result.sink_stats[..., 0] / rows
    b = torch.ones(4) if beta is None else beta
    for sample, tolerance in ((200, 1e-5), (25, 0.05)):
        got = measure_prompt(call, rows_wanted=sample, threshold=0.1, min_queries=32)
        dormancy = (b * got.drain_weight * share + got.hidden_part)[0].double()
        assert (dormancy - reference.dormancy[0]).abs().max() <= tolerance, sample
        assert got.hidden_sinks[0].tolist() == reference.hidden_sink_rate[0].tolist(), sample
    assert reference.hidden_sink_rate[0].min() >= 1  # the planted sink is found by every head
    assert (reference.hidden_sink_share[0] > 0.05).all()


def test_sampled_rows_are_at_least_the_rows_asked_for():
    """At least ``wanted`` evenly spaced rows ending at the last one, all of them below 2 * wanted, at
    most max_sampled_rows (the slots of a masked batch); rounding the step up gave a 40-row prompt
    20 rows of 32, and its late keys were never judged."""
    for wanted in (1, 5, 16, 32):
        for q_len in range(1, 300):
            rows = range(q_len)[sampled_rows(q_len, wanted)]
            assert rows[-1] == q_len - 1
            assert min(wanted, q_len) <= len(rows) <= max_sampled_rows(q_len, wanted), (wanted, q_len)
            assert len({b - a for a, b in zip(rows, rows[1:])}) <= 1  # evenly spaced
            if q_len < 2 * wanted:
                assert len(rows) == q_len
    assert max(len(range(q)[sampled_rows(q, 32)]) for q in range(1, 300)) == max_sampled_rows(299, 32)


def _left_padded_visibility(q_len: int, lengths: torch.Tensor) -> torch.Tensor:
    visible = torch.ones(len(lengths), 1, q_len, q_len, dtype=torch.bool).tril()
    visible &= (torch.arange(q_len) >= q_len - lengths[:, None])[:, None, None, :]  # left padding
    visible &= (torch.arange(q_len) >= q_len - lengths[:, None])[:, None, :, None]  # padding rows see nothing
    return visible


@pytest.mark.parametrize("read_lengths", [True, False])
def test_left_padded_prompts_get_their_rows_alone(read_lengths):
    """Under a mask every prompt length of a batch gets, in the batch's slots, the rows sampled_rows
    gives it alone (shifted past its padding), and nothing else is marked real; the slots are the most
    rows a prompt gets where the lengths are read (the CPU), max_sampled_rows (a shape) where not."""
    q_len, wanted = 90, 16
    lengths = torch.arange(1, q_len + 1)
    index, real = prompt_measures._rows_per_prompt(_left_padded_visibility(q_len, lengths), q_len, wanted,
                                                   read_lengths=read_lengths)
    alone_counts = [len(range(length)[sampled_rows(length, wanted)]) for length in lengths.tolist()]
    assert index.shape[-1] == (max(alone_counts) if read_lengths else max_sampled_rows(q_len, wanted))
    for b, length in enumerate(lengths.tolist()):
        alone = [q_len - length + r for r in range(length)[sampled_rows(length, wanted)]]
        assert index[b, 0][real[b, 0]].tolist() == alone, length


@pytest.mark.parametrize("lengths, slots", [([512, 400], 34), ([512, 511], 35), ([40, 63], 63), ([7, 3], 7)])
def test_a_padded_batch_on_the_cpu_gets_the_slots_its_prompts_need(lengths, slots):
    """On the CPU the lengths are read: a 512- and a 400-token prompt fill 32 and 34 rows, so 34 slots
    (the shape rule gives 63, nearly twice the block), and every slot of the longest is real."""
    q_len = max(lengths)
    visible = _left_padded_visibility(q_len, torch.tensor(lengths))
    index, real = prompt_measures._rows_per_prompt(visible, q_len, 32)
    assert index.shape[-1] == slots
    assert real.sum(-1).flatten().tolist() == [len(range(n)[sampled_rows(n, 32)]) for n in lengths]


def test_prompt_shorter_than_twice_the_sample_is_measured_whole():
    """Below 2 * sample_rows rows every row is sampled: the hidden sinks and the dormancy are
    inspect's (200 rows with 101 asked for; the earlier rule sampled 100 of them)."""
    call = _planted_hidden_sink(torch.tensor([0.5, 0.9, 1.0, 0.7]))
    reference = _offline_measures(call)
    share = call.result.sink_stats[..., 0] / call.result.sink_stats[..., 1]
    got = measure_prompt(call, rows_wanted=101, threshold=0.1, min_queries=32)
    dormancy = (torch.tensor([0.5, 0.9, 1.0, 0.7]) * got.drain_weight * share + got.hidden_part)[0].double()
    assert (dormancy - reference.dormancy[0]).abs().max() <= 1e-5
    assert got.hidden_sinks[0].tolist() == reference.hidden_sink_rate[0].tolist()


def test_rows_whose_sink_takes_everything():
    """A sink so strong that p_S rounds to 1 in fp32 in many rows: with beta < 1 the dormancy is
    still inspect's (p_N is summed over the non-sink keys, never taken as 1 - p_S)."""
    beta = torch.tensor([0.5, 0.9, 1.0, 0.7])
    call = _planted_hidden_sink(beta, sink_strength=150.0)
    assert (call.result.sink_stats[0, :, 0] / call.result.sink_stats[0, :, 1]).min() > 0.97
    reference = _offline_measures(call)
    share = call.result.sink_stats[..., 0] / call.result.sink_stats[..., 1]
    got = measure_prompt(call, rows_wanted=200, threshold=0.1, min_queries=32)
    dormancy = (beta * got.drain_weight * share + got.hidden_part)[0].double()
    assert torch.isfinite(dormancy).all()
    assert (dormancy - reference.dormancy[0]).abs().max() <= 1e-5
    assert got.hidden_sinks[0].tolist() == reference.hidden_sink_rate[0].tolist()


def _sampled_estimate_fp64(call, rows: slice, threshold: float, min_queries: int):
    """The sampled estimator written out in fp64 from the dense stock probabilities: the applied
    attention of the sampled rows on the non-sink keys (keep * p_ij * (p_N + (1 - beta) p_S) / p_N),
    its column sums, ACT's test on their mean over the sampled rows that see each key, and the
    hidden keys' drain-weighted mass averaged over the sampled rows that see a non-sink key."""
    q, k, v = (t.double() for t in (call.query, call.key, call.value))
    q_heads, q_len, k_len = q.shape[1], q.shape[2], k.shape[2]
    group = q_heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    visible = torch.ones(q_len, k_len).tril().bool()
    scores = (q @ k.transpose(-1, -2) * call.scale).masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - lse[..., None])  # (1, Hq, Q, K) stock
    p_s, p_n = p[..., 0], p[..., 1:].sum(-1)
    has_n = torch.arange(q_len) >= 1  # row 0 sees only the sink
    beta = torch.ones(q_heads, dtype=torch.float64) if call.beta is None else call.beta.double()
    factor = (p_n + (1 - beta[None, :, None]) * p_s) / p_n.clamp(min=1e-300)
    if call.virtual_sink_logit is not None:
        factor = factor * torch.sigmoid(lse - call.virtual_sink_logit.double()[None, :, None])
    applied = (p * factor[..., None])[:, :, rows] * has_n[rows][:, None]  # sampled rows, sink column unused
    sampled_visible = visible[rows]
    n_rows = int(has_n.sum())
    min_q = min(min_queries, max(1, n_rows // 4))
    seen_by = visible.sum(0)
    sampled_seen = sampled_visible.sum(0)
    judged = (seen_by >= min_q) & (sampled_seen >= min(min_q, 6)) & (torch.arange(k_len) != 0)
    columns = applied.sum(2)  # (1, Hq, K)
    hidden = (columns / sampled_seen.clamp(min=1) > threshold) & judged
    norms = v[:, ::group].norm(dim=-1)  # (1, Hkv, K)
    median = norms.median(-1).values
    weights = (1 - norms / median[..., None]).clamp(0, 1).repeat_interleave(group, 1)
    part = (applied * (hidden * weights)[:, :, None, :]).sum(-1).sum(-1) / has_n[rows].sum()
    return hidden.sum(-1), part, weights[..., 0], (norms[..., 0] / median)


@pytest.mark.parametrize("virtual", [False, True])
@pytest.mark.parametrize("sample", [25, 40, 200])
def test_sampled_prompt_measures_are_the_written_estimator(sample, virtual):
    """On a partial sample the prompt measures are an estimate of inspect's numbers, but an exact
    computation of the estimator: checked against it written out in fp64 on dense probabilities."""
    beta = torch.tensor([0.5, 0.9, 1.0, 0.7])
    call = _planted_hidden_sink(beta)
    if virtual:
        logit = torch.tensor([-1.0, 0.5, -3.0, 1.0])
        result = sink_attention_torch(call.query, call.key, call.value, causal=True, first_column_sink=True,
                                      beta=beta, virtual_sink_logit=logit, need_sink_stats=True)
        call = dataclasses.replace(call, virtual_sink_logit=logit, result=result)
    rows = sampled_rows(200, sample)
    assert torch.arange(200)[rows][-1] == 199 and len(range(200)[rows]) == min(sample, 200)
    hidden, part, sink_weight, drain = _sampled_estimate_fp64(call, rows, threshold=0.1, min_queries=32)
    got = measure_prompt(call, rows_wanted=sample, threshold=0.1, min_queries=32)
    assert got.hidden_sinks[0].tolist() == hidden[0].tolist()
    assert hidden.min() >= 1  # the planted sink is found by every head
    torch.testing.assert_close(got.hidden_part.double(), part, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.drain_weight.double(), sink_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.value_drain.double(), drain, atol=0, rtol=1e-5)


def _layer_calls(layers: int, q_len: int, *, softcap: float | None = None, mask: torch.Tensor | None = None,
                 policies=None) -> list[AttentionCall]:
    """``layers`` attention calls of one forward (4 query heads on 2 kv heads, the same layout), each
    with its own keys and its own policy (None: identity; else (beta, virtual logit))."""
    g = torch.Generator().manual_seed(layers * 1000 + q_len)
    calls = []
    for layer in range(layers):
        q = torch.randn(2, 4, q_len, 16, generator=g) * 1.5
        k = torch.randn(2, 2, q_len, 16, generator=g)
        v = torch.randn(2, 2, q_len, 16, generator=g)
        k[:, :, 0] += 3 * q.mean((1, 2))[:, None]  # a sink at column 0
        k[:, :, 5] += 2 * q.mean((1, 2))[:, None]  # and a weaker one later
        beta, virtual = (None, None) if policies is None or policies[layer] is None else policies[layer]
        result = sink_attention_torch(q, k, v, attn_mask=mask, causal=True, first_column_sink=True, beta=beta,
                                      virtual_sink_logit=virtual, softcap=softcap, need_sink_stats=True)
        calls.append(AttentionCall(layer, None, q, k, v, mask, True, 16 ** -0.5, softcap, None, None, None, virtual,
                                   beta, result))
    return calls


def _assert_same_measures(got, expected, atol=1e-6):
    for name, a, b in zip(got._fields, got, expected):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("q_len, rows", [(77, 32), (512, 32), (30, 7), (9, 32)])
def test_causal_parts_of_the_sampled_block_change_nothing(q_len, rows, monkeypatch):
    """Under the causal rule the sampled rows are scored in parts, each on the keys it may see: the
    same measures as one part over every key (awkward lengths, fewer rows than parts, all rows)."""
    call = _layer_calls(1, q_len, policies=[(torch.tensor([0.5, 0.9, 1.0, 0.7]), torch.tensor([-1.0, 0.5, -3.0, 1.0]))])[0]
    sampled = sample_call(call, rows_wanted=rows, min_queries=8)
    whole = sampled._replace(layout=sampled.layout._replace(chunks=((0, sampled.lse.shape[-1], q_len),)))
    expected = measure_sampled(whole, threshold=0.05)
    for parts in (2, 3, 4, 6):
        monkeypatch.setattr(prompt_measures, "CAUSAL_ROW_CHUNKS", parts)
        sampled = sample_call(call, rows_wanted=rows, min_queries=8)
        chunks = sampled.layout.chunks
        if sampled.lse.shape[-1] >= 2 * parts:
            assert len(chunks) == parts and chunks[-1][2] == q_len and chunks[0][2] < q_len
            assert [c[0] for c in chunks[1:]] == [c[1] for c in chunks[:-1]]  # every row in one part
        _assert_same_measures(measure_sampled(sampled, threshold=0.05), expected)
    assert expected.hidden_sinks.sum() > 0  # the check compared found sinks, not only empty rows
    # what a GPU asks for: one part, every key
    assert prompt_measures._row_chunks(sampled.layout.row_slice, q_len, q_len, causal=True, parts=1) == \
        ((0, sampled.lse.shape[-1], q_len),)


def test_masked_calls_keep_one_part():
    """With a mask the visible keys are not known from the shapes: one part, every key."""
    mask = torch.ones(2, 1, 40, 40, dtype=torch.bool).tril()
    mask[1, :, :, :4] = False  # left padding in the second sequence
    call = _layer_calls(1, 40, mask=mask)[0]
    layout = sample_call(call, rows_wanted=16, min_queries=8).layout
    # each prompt fills what sampled_rows gives it alone, at least 16 rows: 40 rows 2 apart (20 of
    # them), 36 rows 2 apart (18); on the CPU as many slots as the longer needs (a GPU: 31, a shape)
    assert layout.chunks == ((0, 20, 40),)
    assert layout.visible.amax(-1).sum(-1).flatten().tolist() == [20, 18]
    assert layout.row_index[0, 0].tolist() == list(range(40)[sampled_rows(40, 16)])
    assert layout.row_index[1, 0, 2:].tolist() == [4 + r for r in range(36)[sampled_rows(36, 16)]]


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_layers_measured_together_equal_one_by_one(softcap):
    """measure_sampled_many merges calls of one layout (each layer's heads after the last's) and
    cuts the result back: every layer's measures as measured alone, whatever the block limit, with
    layers of different kinds of policy (identity, beta only, beta + virtual logit) in one list."""
    beta = [torch.rand(4, generator=torch.Generator().manual_seed(i)) * 0.5 + 0.5 for i in range(6)]
    policies = [None, (beta[1], None), (beta[2], torch.randn(4)), (beta[3], None), None, (beta[5], torch.randn(4))]
    calls = _layer_calls(6, 150, softcap=softcap, policies=policies)
    layouts = LayoutCache()
    sampled = [sample_call(call, rows_wanted=24, min_queries=8, layouts=layouts) for call in calls]
    assert len(layouts) == 1 and all(s.layout is sampled[0].layout for s in sampled)
    alone = [measure_sampled(s, threshold=0.05) for s in sampled]
    block = sampled[0].lse.numel() * 150
    for limit in (1, block, 2 * block, 100 * block):
        together = measure_sampled_many(sampled, threshold=0.05, max_block=limit)
        assert len(together) == len(alone)
        for got, expected in zip(together, alone):
            _assert_same_measures(got, expected)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measures_written_into_a_workspace_equal_fresh_ones(softcap, dtype):
    """With a Workspace the block, the merged keys and (16-bit keys) their fp32 copy are written into
    buffers kept between calls: bit for bit the measures of fresh tensors, whether the buffers grow
    (a longer prompt after a shorter one) or serve a smaller request from a larger buffer."""
    workspace = Workspace()
    beta = [torch.rand(4, generator=torch.Generator().manual_seed(i)) * 0.5 + 0.5 for i in range(4)]
    policies = [None, (beta[1], torch.randn(4)), (beta[2], None), (beta[3], torch.randn(4))]
    pointers = {}
    for q_len in (60, 150, 90):
        calls = _layer_calls(4, q_len, softcap=softcap, policies=policies)
        for call in calls:  # the cache's keys in the model's precision
            call.key, call.value = call.key.to(dtype), call.value.to(dtype)
        layouts = LayoutCache()
        sampled = [sample_call(call, rows_wanted=24, min_queries=8, layouts=layouts) for call in calls]
        for limit in (sampled[0].lse.numel() * q_len, None):  # one layer per batch, then all four at once
            fresh = measure_sampled_many(sampled, threshold=0.05, max_block=limit)
            reused = measure_sampled_many(sampled, threshold=0.05, max_block=limit, workspace=workspace)
            for got, expected in zip(reused, fresh, strict=True):
                for name, a, b in zip(got._fields, got, expected):
                    assert torch.equal(a, b), (q_len, limit, name)
        pointers[q_len] = {key: buffer.data_ptr() for key, buffer in workspace._buffers.items()}
    names = {name for name, _ in pointers[150]}
    assert names == ({"scores", "key"} | ({"keys32"} if dtype != torch.float32 else set()))
    assert pointers[90] == pointers[150]  # the smaller request reused the larger one's buffers
    assert workspace.nbytes() > 0


def test_workspace_keeps_only_small_cpu_buffers():
    """Larger than max_elements, off the CPU, or while compiling: a fresh tensor, nothing kept."""
    workspace = Workspace(max_elements=100)
    kept = workspace.take("scores", (4, 25), torch.float32, torch.device("cpu"))
    assert workspace.take("scores", (10, 10), torch.float32, torch.device("cpu")).data_ptr() == kept.data_ptr()
    assert workspace.take("scores", (101,), torch.float32, torch.device("cpu")).data_ptr() != kept.data_ptr()
    assert workspace.take("scores", (4, 25), torch.float32, torch.device("meta")).device.type == "meta"
    assert list(workspace._buffers) == [("scores", torch.float32)] and workspace.nbytes() == 400


def test_a_monitor_reuses_its_workspace_between_requests(one_thread):
    """The prompt measures of every request after the first write into the same CPU buffers
    (the monitor's Workspace): no new block at the end of each forward."""
    model = tiny_model("llama")
    with sinkfix.patch(model, POLICIES["profile-like"]), sinkfix.monitor(model) as monitor:
        _one_request(monitor, model, input_ids=_ids(1, 48, seed=1))
        first = {key: buffer.data_ptr() for key, buffer in monitor._workspace._buffers.items()}
        _one_request(monitor, model, input_ids=_ids(1, 48, seed=2))
        assert {"scores", "key"} <= {name for name, _ in first}
        assert {key: buffer.data_ptr() for key, buffer in monitor._workspace._buffers.items()} == first


def test_the_merge_limit_follows_the_device(monkeypatch):
    """Cache-sized batches on the CPU; on a GPU, where each operation is a kernel launch, 32 times
    larger ones (a 32-layer, 4096-token prompt: 4 batches of 8 layers instead of 32 of one)."""
    from sinkfix.telemetry import prompt

    assert prompt.merged_block_limit(torch.device("cpu")) == prompt.MERGED_BLOCK_ELEMENTS
    assert prompt.merged_block_limit(torch.device("cuda")) == prompt.MERGED_BLOCK_ELEMENTS_GPU == 32 << 20
    per_layer = 1 * 32 * 32 * 4096  # (B, Hq, sampled rows) x keys
    assert prompt.MERGED_BLOCK_ELEMENTS // per_layer == 0 and prompt.MERGED_BLOCK_ELEMENTS_GPU // per_layer == 8
    # without max_block, the limit for the calls' device decides (here one stood in for it)
    calls = _layer_calls(4, 150)
    layouts = LayoutCache()
    sampled = [sample_call(call, rows_wanted=24, min_queries=8, layouts=layouts) for call in calls]
    merged_sizes = []
    real_measure = prompt.measure_sampled
    monkeypatch.setattr(prompt, "measure_sampled",
                        lambda s, **kw: merged_sizes.append(s.lse.shape[1]) or real_measure(s, **kw))
    block = sampled[0].lse.numel() * 150
    asked = []
    monkeypatch.setattr(prompt, "merged_block_limit", lambda device: asked.append(device.type) or 2 * block)
    prompt.measure_sampled_many(sampled, threshold=0.05)
    assert asked == ["cpu"] and merged_sizes == [2 * 4, 2 * 4]  # two batches of two layers' 4 heads


def test_shape_only_layouts_serve_later_requests(one_thread):
    """A prompt without a mask keeps its layout for the next request of the same shape (the same
    object, the same records); a layout keyed by a mask is not handed on."""
    model = tiny_model("llama")
    ids = _ids(1, 40, seed=3)
    with sinkfix.patch(model, POLICIES["profile-like"]), sinkfix.monitor(model) as monitor:
        first = _one_request(monitor, model, input_ids=ids)
        (kept,) = monitor._layouts.values()
        second = _one_request(monitor, model, input_ids=ids)
        assert len(monitor._layouts) == 1 and monitor._layouts.values()[0] is kept
        for name in ("sink_share", "dormancy", "hidden_sinks", "value_drain", "residual_peak"):
            assert first[name] == second[name], name
    # a layout made for a mask is keyed by the mask's id, which a later tensor may reuse: dropped
    layouts = LayoutCache([((None, True, 1, 40, 40, 32, 32, "cpu"), kept),
                           ((12345, True, 1, 40, 40, 32, 32, "cpu"), kept)])
    assert layouts.for_next_forward().keys() == [(None, True, 1, 40, 40, 32, 32, "cpu")]
    assert len(LayoutCache([((None, i), kept) for i in range(9)]).for_next_forward()) == 0  # bounded
    # found by comparing keys: an equal key built anew finds the layout
    assert layouts.get((None, True, 1, 40, 40, 32, 32, "cpu")) is kept and layouts.get((None, False)) is None


def test_a_padded_batch_builds_its_layout_once_per_forward_on_the_cpu(monkeypatch, one_thread):
    """Left padding locates each row's sink per call; on the CPU the layout is cached by those sink
    columns' values (a 512- and a 400-token SmolLM2 batch built 30 layouts, 34 ms of the request), and
    the records equal those of layouts built per call (the cache switched off)."""
    model = tiny_model("llama")
    ids = _ids(2, 30, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    built = []
    real_layout = prompt_measures._layout
    monkeypatch.setattr(prompt_measures, "_layout", lambda *a, **k: built.append(1) or real_layout(*a, **k))
    records = {}
    with sinkfix.patch(model, POLICIES["profile-like"]), sinkfix.monitor(model) as monitor:
        for cached in (True, False):
            if not cached:  # every call builds its own, as on a GPU
                real_cached = prompt_measures._cached_layout
                monkeypatch.setattr(prompt_measures, "_cached_layout",
                                    lambda call, rows, queries, layouts: real_cached(call, rows, queries, None))
            built.clear()
            with torch.no_grad(), monitor.request():
                model(input_ids=ids, attention_mask=mask)
            records[cached] = (len(built), monitor.records)
    assert records[True][0] == 1 and records[False][0] == model.config.num_hidden_layers
    for got, want in zip(records[True][1], records[False][1]):
        for name in ("sink_share", "dormancy", "hidden_sinks", "value_drain"):
            assert got[name] == want[name], name


def test_accumulator_takes_a_forwards_prompt_measures_at_once():
    """add_prompts with every layer in order (one copy per field) fills the same sums as add_prompt
    layer by layer, and falls back to that for other layer lists."""
    sampled = [sample_call(c, rows_wanted=16, min_queries=8) for c in _layer_calls(3, 40)]
    measures = measure_sampled_many(sampled, threshold=0.05)
    rows = [s.rows for s in sampled]
    one_by_one = RequestAccumulator([4, 4, 4], 2, torch.device("cpu"))
    for layer, m, r in zip(range(3), measures, rows):
        one_by_one.add_prompt(layer, m, r)
    for layers in ([0, 1, 2], [2, 0, 1]):
        at_once = RequestAccumulator([4, 4, 4], 2, torch.device("cpu"))
        at_once.add_prompts(layers, [measures[i] for i in layers], [rows[i] for i in layers])
        for name in ("drain_weight", "value_drain", "hidden_sinks", "hidden_part"):
            # value_drain is NaN past the kv heads, in both
            torch.testing.assert_close(getattr(at_once, name), getattr(one_by_one, name), atol=0, rtol=0,
                                       equal_nan=True, msg=f"{name} {layers}")
        assert at_once.kv_heads == one_by_one.kv_heads == [2, 2, 2]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_generate_with_a_kv_cache_counts_every_row(policy, one_thread):
    """The decode steps' statistics come from the cached path; summed with the prompt's they equal
    one plain forward over the same tokens (the last generated token is never fed back)."""
    model = tiny_model("llama")
    ids = _ids(1, 30, seed=1)
    with sinkfix.patch(model, POLICIES[policy]), sinkfix.monitor(model) as monitor:
        with torch.no_grad(), monitor.request(domain="code"):
            out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        generated = monitor.records[0]
        fed = out[:, :-1]
        whole = _one_request(monitor, model, input_ids=fed, use_cache=False)
    assert generated["tokens"] == 35 and generated["prompt_tokens"] == 30 and generated["decoded_tokens"] == 5
    assert generated["domain"] == "code" and generated["rows"] == whole["rows"] == [34, 34]
    torch.testing.assert_close(_tensor(generated["sink_share"]), _tensor(whole["sink_share"]), atol=1e-5, rtol=0)
    assert generated["residual_peak"] == pytest.approx(whole["residual_peak"], rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_decode_steps_of_the_identity_defer_their_statistics(arch, policy, one_thread, monkeypatch):
    """An eager decode step of plain softmax hands its query row, sink key and log-sum-exp to the
    monitor, which computes every layer's sink mass at once after the step; the record is the one
    the per-call statistics give. Prompts and corrected layers keep their per-call statistics; in
    Gemma3 the sliding-window layers reading a cache locate their sink and keep them too."""
    model = tiny_model(arch)
    ids = _ids(1, 30, seed=4)
    deferred = []
    add_rows = RequestAccumulator.add_first_column_rows
    monkeypatch.setattr(RequestAccumulator, "add_first_column_rows",
                        lambda self, layer, *args: (deferred.append(layer), add_rows(self, layer, *args))[1])

    def generated(defer: bool) -> dict:
        if not defer:
            monkeypatch.setattr(attention_integration, "defers_sink_stats", lambda **kwargs: False)
        with sinkfix.patch(model, POLICIES[policy]), sinkfix.monitor(model) as monitor:
            with torch.no_grad(), monitor.request():
                model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        return monitor.records[0]

    with_deferral = generated(True)
    calls = len(deferred)
    per_call = generated(False)
    assert len(deferred) == calls  # none once switched off
    layers = model.config.num_hidden_layers
    if policy == "identity":
        # 4 decode steps (the last token is never fed back), every layer but Gemma3's sliding ones
        sliding = sum(kind == "sliding_attention" for kind in getattr(model.config, "layer_types", None) or [])
        assert calls == 4 * (layers - sliding) > 0
        assert arch != "gemma3" or 0 < sliding < layers
    else:
        assert calls == 0
    assert with_deferral["rows"] == per_call["rows"]
    torch.testing.assert_close(_tensor(with_deferral["sink_share"]), _tensor(per_call["sink_share"]),
                               atol=1e-6, rtol=0)
    for name in ("residual_peak", "dormant_heads", "hidden_sinks", "tokens", "decoded_tokens"):
        assert with_deferral[name] == per_call[name], name


def test_deferred_rows_fold_in_with_per_call_statistics():
    """Layers whose decode rows were deferred and layers with their own statistics, in any order and
    with fewer heads than the widest layer, sum to the per-call statistics of the same calls."""
    g = torch.Generator().manual_seed(5)
    heads = [4, 4, 2]
    acc = RequestAccumulator(heads, batch=2, device=torch.device("cpu"))
    expected = torch.zeros(3, 2, 4, 2, dtype=torch.float64)
    for step in range(2):
        acc.begin_forward(torch.ones(2, 1, dtype=torch.bool))
        for layer in (2, 0, 1):
            q = torch.randn(2, heads[layer], 1, 8, generator=g)
            k = torch.randn(2, 2, 5 + step, 8, generator=g)
            result = sink_attention_torch(q, k, k, first_column_sink=True, need_sink_stats=True)
            expected[layer, :, :heads[layer]] += result.sink_stats.double()
            if layer == 1:
                acc.add_attention(layer, result.sink_stats)
            else:
                acc.add_first_column_rows(layer, q, k, result.lse, 8 ** -0.5)
        acc.end_forward()
    assert expected[:, :, :2, 0].min() > 0.01 and expected[2, :, 2:].eq(0).all()  # real masses; layer 2 is narrower
    torch.testing.assert_close(acc.stats, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("length, pad, sample_rows", [(26, 9, 32), (12, 4, 32), (26, 9, 8), (40, 25, 8)],
                         ids=["whole", "short", "sampled", "sampled-short-row"])
def test_batched_left_padded_requests_match_single_requests(length, pad, sample_rows, one_thread):
    """The min_queries rule and the sampled rows are each prompt's own: a padded row gets the rows
    and the threshold it gets alone (they once came from the batch's longest prompt: hidden sinks
    6 against 7 on the 12-token case, other rows sampled on the 'sampled' cases)."""
    model = tiny_model("llama")
    ids = _ids(2, length, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with sinkfix.patch(model, POLICIES["profile-like"]), sinkfix.monitor(model, sample_rows=sample_rows) as monitor:
        with torch.no_grad(), monitor.request(domain=["a", "b"]):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        batched = monitor.records
        singles = []
        for row, start in ((0, 0), (1, pad)):
            with torch.no_grad(), monitor.request():
                model.generate(input_ids=ids[row:row + 1, start:], max_new_tokens=4, do_sample=False, pad_token_id=0)
            singles.append(monitor.records[0])
    assert [r["domain"] for r in batched] == ["a", "b"] and [r["index"] for r in batched] == [0, 1]
    for got, want in zip(batched, singles):
        assert got["tokens"] == want["tokens"] and got["prompt_tokens"] == want["prompt_tokens"]
        torch.testing.assert_close(_tensor(got["sink_share"]), _tensor(want["sink_share"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(_tensor(got["dormancy"]), _tensor(want["dormancy"]), atol=1e-5, rtol=0)
        assert got["hidden_sinks"] == want["hidden_sinks"]
        assert got["residual_peak"] == pytest.approx(want["residual_peak"], rel=1e-4)
    assert sum(map(sum, batched[1]["hidden_sinks"])) > 0  # the comparison has something to compare


@pytest.mark.parametrize("policy", list(POLICIES))
def test_monitoring_changes_no_output(policy, one_thread):
    model = tiny_model("gemma3")
    ids = _ids(2, 17, seed=4)
    with sinkfix.patch(model, POLICIES[policy]), torch.no_grad():
        plain_logits = model(input_ids=ids).logits
        plain_tokens = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        with sinkfix.monitor(model) as monitor:
            with monitor.request():
                logits = model(input_ids=ids).logits
            tokens = monitor.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(logits, plain_logits) and torch.equal(tokens, plain_tokens)


def test_monitored_model_traces_into_one_graph(one_thread):
    """The listeners and hooks sit inside the model (decoder layers, attention function) and do
    device ops only, so dynamo sees one graph with no break, with and without padding."""
    model = tiny_model("llama")
    ids = _ids(2, 11, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with sinkfix.patch(model, POLICIES["profile-like"]), sinkfix.monitor(model) as monitor, torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            with monitor.request():
                explained = torch._dynamo.explain(model)(input_ids=ids, **kwargs)
            assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
            assert explained.graph_count == 1


def _needs_prometheus_client() -> None:
    pytest.importorskip("prometheus_client", reason="the Prometheus endpoint needs prometheus-client, which is "
                        "not installed: pip install 'sinkfix[monitor]' (or the dev extra) to run this test")


def test_outputs_log_prometheus_and_callback(tmp_path, one_thread):
    _needs_prometheus_client()
    model = tiny_model("llama")
    seen = []
    log = tmp_path / "logs" / "telemetry.jsonl"
    with sinkfix.patch(model, POLICIES["profile-like"]):
        monitor = sinkfix.monitor(model, log=log, prometheus_port=0, callback=seen.append)
        try:
            with torch.no_grad():
                monitor.forward(input_ids=_ids(2, 20), domain=["code", None])
                monitor.generate(input_ids=_ids(1, 12, seed=5), max_new_tokens=3, do_sample=False, pad_token_id=0,
                                 domain="prose")
            with urllib.request.urlopen(monitor.prometheus_url, timeout=10) as response:
                metrics = response.read().decode()
        finally:
            monitor.close()
    lines = log.read_text().splitlines()
    assert [json.loads(line) for line in lines] == seen and len(seen) == 3
    assert [r["domain"] for r in seen] == ["code", None, "prose"]
    assert all(r["schema"] == "sinkfix-telemetry" and r["version"] == 1 for r in seen)
    assert 'sinkfix_sink_share_count{domain="code",layer="1"} 4.0' in metrics  # one observation per head
    assert 'sinkfix_requests_total{domain="none"} 1.0' in metrics
    assert 'sinkfix_tokens_total{domain="prose"} 14.0' in metrics
    assert 'sinkfix_dormant_heads_count{domain="prose"} 1.0' in metrics
    assert 'sinkfix_residual_peak_ratio_bucket{domain="code",layer="0",le="+Inf"} 1.0' in metrics


def test_a_failing_callback_does_not_fail_the_request(tmp_path, one_thread):
    """The callback is user code: its exception is a warning, and the served output, every row's log
    line and monitor.records stand (it once escaped generate, losing its output and row 1's line)."""
    from sinkfix.telemetry.monitor import CallbackWarning

    model = tiny_model("llama")
    calls = []

    def callback(record):
        calls.append(record["index"])
        if record["index"] == 0:
            raise KeyError("planted")

    log = tmp_path / "t.jsonl"
    with sinkfix.monitor(model, log=log, callback=callback) as monitor, torch.no_grad():
        with pytest.warns(CallbackWarning, match="callback raised KeyError.*row 0"):
            tokens = monitor.generate(input_ids=_ids(2, 9), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert tokens.shape == (2, 12) and len(monitor.records) == 2 and calls == [0, 1]
    assert len(log.read_text().splitlines()) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"domain": [1, "code"]}, "domain labels must be strings or None, got 1 (int)"),
    ({"domain": 3}, "domain must be a string, None, or one string"),
    ({"domain": ["only-one"]}, "1 domain labels for a batch of 2 sequences"),
    ({"request_id": 7}, "request_id must be a string, None, or one string"),
    ({"request_id": ["a", "b", "c"]}, "3 request ids for a batch of 2 sequences"),
])
def test_labels_are_checked_before_any_generation(kwargs, message, one_thread):
    """Wrong labels are refused when the request starts, or at its first forward for their count:
    refused at the end, a whole generation's output was lost; an integer label was logged and broke
    `sinkfix monitor report`."""
    model = tiny_model("llama")
    steps = []
    hook = model.model.layers[0].register_forward_hook(lambda *args: steps.append(1))
    with sinkfix.monitor(model) as monitor, torch.no_grad():
        with pytest.raises(MonitorError, match=re.escape(message)):
            with monitor.request(**kwargs):
                model.generate(input_ids=_ids(2, 9), max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert len(steps) <= 1 and monitor.records == []
        with monitor.request(request_id=["a", None]):  # one id per row; None takes the monitor's own
            model(input_ids=_ids(2, 9))
        assert monitor.records[0]["request"] == "a"
        assert monitor.records[1]["request"].startswith(monitor.session + "-")
    hook.remove()


def test_prometheus_arguments_are_checked():
    from sinkfix.telemetry.outputs import PrometheusExporter

    model = tiny_model("llama")
    for port in (70000, -1, "9464", True, 9464.5):
        with pytest.raises(MonitorError, match="prometheus_port must be an integer in"):
            sinkfix.monitor(model, prometheus_port=port)
    assert sinkfix.PatchHandle.of(model) is None  # a refused monitor leaves the model as it was
    exporter = PrometheusExporter.__new__(PrometheusExporter)
    exporter.host, exporter.port = "::1", 9464
    assert exporter.url == "http://[::1]:9464/metrics"


def test_unpatched_model_is_monitored_as_the_identity(one_thread):
    model = tiny_model("llama")
    with sinkfix.monitor(model) as monitor:
        assert monitor.owns_patch and sinkfix.PatchHandle.of(model) is not None
        record = _one_request(monitor, model, input_ids=_ids(1, 10))
        assert record["policy"] == "identity"
    assert sinkfix.PatchHandle.of(model) is None  # the monitor's own patch is gone with it
    with pytest.raises(MonitorError, match="not patched: call sinkfix.patch"):
        sinkfix.monitor(model, patch_if_needed=False)


def test_no_listener_outside_requests(one_thread):
    model = tiny_model("llama")
    with sinkfix.patch(model) as handle, sinkfix.monitor(model) as monitor:
        with monitor.request():
            assert all(state.telemetry for state in handle._states.values())
        assert not any(state.telemetry for state in handle._states.values())
        assert monitor.records == []  # nothing ran inside the block


def test_a_forward_that_raises_leaves_nothing_for_the_next_request(one_thread):
    """The prompt measures run after the forward's last decoder layer; a forward that raises before
    it leaves sampled calls behind, which must not reach the next request's record."""
    model = tiny_model("llama")
    ids = _ids(1, 20, seed=3)
    with sinkfix.patch(model, POLICIES["profile-like"]), sinkfix.monitor(model) as monitor:
        want = _one_request(monitor, model, input_ids=ids, use_cache=False)

        def fail(module, args, output):
            raise RuntimeError("planted failure in the last decoder layer")

        hook = model.model.layers[-1].register_forward_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="planted failure"), torch.no_grad(), monitor.request():
                model(input_ids=_ids(1, 33, seed=4), use_cache=False)
        finally:
            hook.remove()
        assert monitor._sampled == []
        got = _one_request(monitor, model, input_ids=ids, use_cache=False)
    for key in ("sink_share", "dormancy", "hidden_sinks", "value_drain"):
        assert got[key] == want[key], key


def test_bad_use_is_a_clear_error(tmp_path, one_thread):
    model = tiny_model("llama")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with sinkfix.patch(model):
        with pytest.raises(OutputError, match="is a file, not a folder"):
            sinkfix.monitor(model, log=blocker / "telemetry.jsonl")
        with sinkfix.monitor(model) as monitor:
            with pytest.raises(MonitorError, match="cannot nest"), monitor.request(), monitor.request():
                pass
            with pytest.raises(MonitorError, match="3 domain labels for a batch of 2"), torch.no_grad():
                monitor.forward(input_ids=_ids(2, 8), domain=["a", "b", "c"])
            assert monitor._request is None  # a failed request leaves the monitor usable
            assert _one_request(monitor, model, input_ids=_ids(1, 8))["tokens"] == 8
    with sinkfix.patch(model, sinkfix.Policy.act()):  # refused at creation, not at the first request
        with pytest.raises(MonitorError, match="not implemented for content-dependent sinks"):
            sinkfix.monitor(model, log=tmp_path / "content.jsonl")
        assert not (tmp_path / "content.jsonl").exists()


def test_port_already_in_use(one_thread):
    _needs_prometheus_client()
    model = tiny_model("llama")
    with sinkfix.patch(model), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(MonitorError, match="already in use"):
            sinkfix.monitor(model, prometheus_port=taken.getsockname()[1])
        assert not any(state.telemetry for state in sinkfix.PatchHandle.of(model)._states.values())


def test_missing_prometheus_client_says_what_to_install(monkeypatch, tmp_path, one_thread):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    model = tiny_model("llama")
    log = tmp_path / "telemetry.jsonl"
    with sinkfix.patch(model):
        with pytest.raises(MonitorError, match=r"pip install 'sinkfix\[monitor\]'"):
            sinkfix.monitor(model, log=log, prometheus_port=0)
        assert sinkfix.PatchHandle.of(model).active  # the caller's patch is untouched
    assert not log.exists()  # the endpoint is set up before the log is opened: no empty log left


def test_accumulator_folds_each_forward_once_whatever_its_layout():
    """A forward's updates are folded in one step when every layer reports once with the same head
    count, layer by layer otherwise (uneven heads); a layer without a residual hook reads NaN; a
    prompt's norms are taken at once and a decode step's from the kept outputs, to the same numbers."""
    from sinkfix.telemetry.accumulate import DEFERRED_NORM_TOKENS, RequestAccumulator

    g = torch.Generator().manual_seed(3)
    acc = RequestAccumulator([4, 2, 4], batch=2, device=torch.device("cpu"))
    expected_stats = torch.zeros(3, 2, 4, 2, dtype=torch.float64)
    hidden_by_layer: dict[int, list[torch.Tensor]] = {0: [], 2: []}
    for q_len in (DEFERRED_NORM_TOKENS + 4, 1, 1):  # a prompt, then two decode steps
        acc.begin_forward(torch.ones(2, q_len, dtype=torch.bool))
        for layer, heads in enumerate([4, 2, 4]):
            stats = torch.rand(2, heads, 2, generator=g)
            acc.add_attention(layer, stats)
            expected_stats[layer, :, :heads] += stats.double()
        for layer in (0, 2):  # layer 1 has no decoder hook
            hidden = torch.randn(2, q_len, 8, generator=g)
            acc.add_residual(layer, hidden)
            hidden_by_layer[layer].append(hidden)
    torch.testing.assert_close(acc.stats, expected_stats)  # read mid-request: the last forward counts
    values = acc.read()
    torch.testing.assert_close(values["stats"], expected_stats)
    for layer in (0, 2):
        norms = torch.linalg.vector_norm(torch.cat(hidden_by_layer[layer], dim=1), dim=-1)
        torch.testing.assert_close(values["residual_peak"][layer].float(), norms.amax(-1) / norms.median(-1).values)
    assert torch.isnan(values["residual_peak"][1]).all()
    assert values["tokens"].tolist() == [DEFERRED_NORM_TOKENS + 6] * 2


def test_sharded_heads_are_put_side_by_side_in_rank_order(monkeypatch):
    """The end-of-request gather of a tensor-parallel model (the real one runs under torchrun in
    test_tensor_parallel.py): each field's blocks concatenated along its head dimension, rank 0's
    first, whatever the fields' shapes."""
    import torch.distributed as dist

    from sinkfix.telemetry.sharded import TensorParallelGroup

    per_rank = [{"stats": (torch.full((2, 1, 3, 2), float(r)), 2), "betas": (torch.arange(4.0).view(2, 2) + 10 * r, 1)}
                for r in range(3)]

    def all_gather(out, flat, group=None):  # what each rank would contribute
        assert group is None and flat.dtype == torch.float64
        for rank, buffer in enumerate(out):
            buffer.copy_(torch.cat([per_rank[rank][name][0].reshape(-1).double() for name in ("stats", "betas")]))

    monkeypatch.setattr(dist, "all_gather", all_gather)
    got = TensorParallelGroup(1, 3, None, torch.device("cpu")).gather_heads(per_rank[1])
    assert got["stats"].shape == (2, 1, 9, 2)
    assert got["stats"][1, 0, :, 1].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(got["betas"], torch.cat([per_rank[r]["betas"][0] for r in range(3)], dim=1).double())


def test_sharded_model_without_a_process_group_is_a_clear_error():
    import torch.distributed as dist

    from sinkfix.telemetry.sharded import TensorParallelGroup

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(MonitorError, match="torch.distributed is not initialised"):
        TensorParallelGroup.of(tiny_model("llama"), 0, 2)


def test_patch_and_monitor_on_a_sharded_model_without_a_process_group_say_so():
    """A model transformers sharded, in a process whose group was destroyed: patch() and monitor() (which
    patches with the identity first) ran a forward into torch's own "Could not resolve the process
    group" from inside a DTensor op, not the documented errors; nothing is patched."""
    import torch.distributed as dist

    from sinkfix.errors import UsageError
    from sinkfix.patch import PatchHandle

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    model = tiny_model("llama")
    model._tp_size = 3  # what transformers records on a model it shards
    with pytest.raises(UsageError, match="sharded with tensor parallelism over 3 ranks, but torch.distributed is not "
                                         r"initialised.*patch\(\) runs one forward"):
        sinkfix.patch(model, sinkfix.Policy(sink_scale=0.9))
    with pytest.raises(MonitorError, match="torch.distributed is not initialised.*gathers every rank's heads"):
        sinkfix.monitor(model)
    assert PatchHandle.of(model) is None


@pytest.mark.parametrize("cache", ["streaming", "quantized"])
def test_sink_caches_are_monitored_as_the_calls_attend(cache, one_thread):
    """With a SinkCache that evicts (streaming) or quantizes what it holds, each decode step attends
    to the cache's contents, and the record's sink shares are those of the calls as they ran: the
    same sums taken by an observer (the split path's own sink mass) over the same generate."""
    from sinkfix.caches import SinkCache

    model = tiny_model("llama")
    ids = _ids(1, 20, seed=3)
    make = {"streaming": lambda: SinkCache(model.config, n_sink=2, window=8),
            "quantized": lambda: SinkCache(model.config, n_sink=2, window=None, bits=4, residual_length=4)}[cache]
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    mass, rows, widths = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), set()

    def observe(call):
        q_len, k_len = call.query.shape[2], call.key.shape[2]
        first = max(0, 1 - (k_len - q_len))  # causal: rows before it see only the sink
        kept = call.result.sink_mass[0, :, first:].double()
        mass[call.layer] += kept.sum(-1)
        rows[call.layer] += kept.shape[-1]
        if q_len == 1:
            widths.add(k_len)

    with sinkfix.patch(model, sinkfix.Policy()) as handle, torch.no_grad():
        with handle.observing(observe):
            observed = model.generate(input_ids=ids, cache=make(), **settings)
        with sinkfix.monitor(model) as monitor:
            with monitor.request():
                monitored = model.generate(input_ids=ids, cache=make(), **settings)
    (record,) = monitor.records
    assert torch.equal(observed, monitored)
    if cache == "streaming":  # the decode steps saw the 2 sinks + 8 recent tokens (+ the new one), not 20+
        assert max(widths) <= 11
    assert record["tokens"] == 31 and record["rows"] == [int(rows[0])] * 2 == [30, 30]
    torch.testing.assert_close(_tensor(record["sink_share"]), mass / rows[:, None], atol=1e-5, rtol=0)


def test_compiled_decode_steps_fill_the_buffer_and_say_when_it_is_full(monkeypatch):
    """Decode steps traced by dynamo write their residual norms into the preallocated buffer (no list
    grows); the peak ratio is over the prompt and the kept steps, a step past the buffer's end is not
    kept, and reading says so."""
    from sinkfix.telemetry.accumulate import RequestAccumulator

    g = torch.Generator().manual_seed(7)
    acc = RequestAccumulator([2, 2], batch=1, device=torch.device("cpu"), decode_capacity=3)
    hidden = [torch.randn(1, 12, 4, generator=g)] + [torch.randn(1, 1, 4, generator=g) * (1 + i) for i in range(5)]
    for index, h in enumerate(hidden):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: index > 0)  # the decode steps are traced
        acc.begin_forward(torch.ones(1, h.shape[1], dtype=torch.bool))
        for layer in range(2):
            acc.add_attention(layer, torch.rand(1, 2, 2, generator=g))
            acc.add_residual(layer, h * (layer + 1))
        acc.end_forward()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert len(acc.real) == len(acc.norms) == 1  # only the prompt went to the lists
    with pytest.warns(RuntimeWarning, match="more tokens under torch.compile than the residual-norm buffer holds"):
        values = acc.read()
    kept = torch.linalg.vector_norm(torch.cat(hidden[:4], dim=1), dim=-1)[0]  # the prompt and 3 of 5 steps
    for layer in range(2):
        norms = kept * (layer + 1)
        torch.testing.assert_close(values["residual_peak"][layer, 0].float(), norms.max() / norms.median())
    assert values["tokens"].tolist() == [17.0]  # every token is counted, kept or not


def test_deferred_rows_do_not_keep_large_key_tensors_alive(monkeypatch):
    """A quantized cache hands each decode call a freshly dequantized key tensor: the accumulator
    copies the sink key out of a large one, so the tensor is freed when the call drops it (not at the
    fold); a small one is kept whole and cut at the fold. Both kinds fold into the same statistics."""
    import weakref

    from sinkfix.telemetry import accumulate

    monkeypatch.setattr(accumulate, "COPIED_SINK_KEY_ELEMENTS", 40)
    acc = RequestAccumulator([2, 2], batch=1, device=torch.device("cpu"))
    acc.begin_forward(torch.ones(1, 1, dtype=torch.bool))
    g = torch.Generator().manual_seed(3)
    expected = []
    alive = {}
    for layer, k_len in ((0, 6), (1, 4)):  # 48 elements (copied) and 32 (kept)
        q, k = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 1, k_len, 8, generator=g)
        result = sink_attention_torch(q, k, k, first_column_sink=True, need_sink_stats=True)
        acc.add_first_column_rows(layer, q, k, result.lse, 8 ** -0.5)
        expected.append(result.sink_stats.double())
        alive[layer] = weakref.ref(k)
        del k, result
    assert alive[0]() is None and alive[1]() is not None
    acc.end_forward()
    assert alive[1]() is None  # released by the fold
    torch.testing.assert_close(acc.stats, torch.stack(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_sampled_query_rows_are_the_rows_grouped_by_kv_head(dtype, layout):
    """sample_call's query rows (one copy, dtype and layout at once): the sampled rows of each query
    head, in fp32, grouped under their kv head, whatever the queries' dtype and memory layout."""
    call = _layer_calls(1, 50)[0]
    q = call.query.to(dtype)
    if layout == "bshd":  # the transposed view transformers hands over
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    sampled = sample_call(dataclasses.replace(call, query=q), rows_wanted=16, min_queries=8)
    rows = sampled_rows(50, 16)
    expected = q[:, :, rows].float().reshape(2 * 2, 2 * len(range(50)[rows]), 16)
    assert sampled.q_rows.dtype == torch.float32 and sampled.q_rows.is_contiguous()
    torch.testing.assert_close(sampled.q_rows, expected, rtol=0, atol=0)


def test_a_log_write_that_fails_warns_and_keeps_the_request(tmp_path, one_thread):
    """A full disk (or a log removed from under the monitor) while a request finishes: a
    LogWriteWarning; the output, monitor.records and the callback stand (raised, it lost them)."""
    from sinkfix.telemetry.monitor import LogWriteWarning

    model = tiny_model("llama")
    seen = []
    with sinkfix.monitor(model, log=tmp_path / "t.jsonl", callback=seen.append) as monitor:
        def full_disk(record):
            raise OutputError("cannot append to t.jsonl: No space left on device")

        monitor.log.write = full_disk
        with pytest.warns(LogWriteWarning, match="No space left"), torch.no_grad():
            out = monitor.generate(input_ids=_ids(2, 12), attention_mask=torch.ones(2, 12, dtype=torch.long),
                                   max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 14)
    assert len(monitor.records) == 2 and [r["index"] for r in seen] == [0, 1]


def test_the_label_of_requests_without_a_domain_is_reserved(one_thread):
    """Prometheus and reports put requests without a domain under "none": a request labelled so
    would be merged with them."""
    model = tiny_model("llama")
    with sinkfix.monitor(model) as monitor:
        for domain in ("none", ["code", "none"]):
            with pytest.raises(MonitorError, match="reserved"), monitor.request(domain=domain):
                pass


def test_a_closed_monitor_refuses_requests(tmp_path, one_thread):
    """After close() (log closed, endpoint stopped) a request would record nowhere: refused."""
    model = tiny_model("llama")
    with sinkfix.patch(model):
        monitor = sinkfix.monitor(model, log=tmp_path / "t.jsonl")
        monitor.close()
        with pytest.raises(MonitorError, match="closed"), monitor.request():
            pass
        with pytest.raises(MonitorError, match="closed"):
            monitor.forward(input_ids=_ids(1, 8))


@pytest.mark.parametrize("where", ["argument", "generation_config"])
def test_beam_search_is_refused(where, one_thread):
    """Beams are batch rows generate reorders between steps: no record could describe a sequence
    (it used to log one record per beam)."""
    from transformers import GenerationConfig

    model = tiny_model("llama")
    kwargs = ({"num_beams": 2} if where == "argument" else
              {"generation_config": GenerationConfig(num_beams=2, max_new_tokens=2, pad_token_id=0)})
    with sinkfix.monitor(model) as monitor, pytest.raises(MonitorError, match="beam search"):
        monitor.generate(input_ids=_ids(1, 8), max_new_tokens=2, pad_token_id=0, **kwargs)
    assert monitor.records == []


def test_a_request_served_with_autograd_on_is_measured(one_thread):
    """A forward without torch.no_grad() (a server that forgot it, or a gradient-based probe): the
    prompt measures ran on tensors that require grad and failed (an in-place op on an unbind view;
    then cat(out=...)). They run without autograd now; the record equals the no_grad one's."""
    model = tiny_model("llama")
    ids = _ids(1, 40, seed=5)
    with sinkfix.patch(model, POLICIES["profile-like"]), sinkfix.monitor(model) as monitor:
        with monitor.request():
            model(input_ids=ids)
        with_grad = monitor.records[0]
        without = _one_request(monitor, model, input_ids=ids)
    for name in ("sink_share", "dormancy", "hidden_sinks", "value_drain"):
        assert with_grad[name] == without[name], name


@pytest.mark.parametrize("ends_at", [1, 3])  # at most: the id may come sooner
def test_a_row_that_ends_early_in_a_batched_generate_gets_its_record_alone(ends_at, one_thread):
    """generate keeps feeding a finished row padding with a mask of ones until the last row ends:
    before, a row whose first token was its end-of-sequence id got 5 decoded tokens, a sink share
    0.039 off and another residual peak, against none alone."""
    model = tiny_model("llama")
    ids = _ids(2, 12, seed=3)
    with sinkfix.patch(model, POLICIES["profile-like"]), sinkfix.monitor(model) as monitor:
        with torch.no_grad():
            alone_tokens = model.generate(input_ids=ids[:1], max_new_tokens=ends_at, do_sample=False, pad_token_id=0)
            eos = int(alone_tokens[0, -1])
            ends_at = alone_tokens[0, 12:].tolist().index(eos) + 1  # row 0 ends at this new token (eos may come sooner)
            out = monitor.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos)
            batched = monitor.records
            assert out[0, 12 + ends_at - 1] == eos and out.shape[1] > 12 + ends_at  # row 0 was carried along
            monitor.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=eos)
            alone = monitor.records[0]
    got = batched[0]
    assert (got["tokens"], got["decoded_tokens"], got["rows"]) == (alone["tokens"], alone["decoded_tokens"],
                                                                 alone["rows"])
    assert got["decoded_tokens"] == ends_at - 1  # the end-of-sequence token itself is never fed
    torch.testing.assert_close(_tensor(got["sink_share"]), _tensor(alone["sink_share"]), atol=1e-5, rtol=0)
    assert got["residual_peak"] == pytest.approx(alone["residual_peak"], rel=1e-4)
    assert batched[1]["decoded_tokens"] == out.shape[1] - 12 - 1  # the other row: every step


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_request_of_one_new_token_on_a_cache(policy, one_thread, monkeypatch):
    """A request whose first forward is one token on a cache (a one-token chat turn): the identity's
    decode call defers its statistics, and the prompt measures read them (a TypeError, which left
    layer 0's cache a token longer than layer 1's). Its record equals the one of the same call with
    the statistics computed in the call."""
    from transformers import DynamicCache

    model = tiny_model("llama")
    ids = _ids(1, 36, seed=3)
    records = {}
    for deferred in (True, False):
        if not deferred:
            monkeypatch.setattr(attention_integration, "defers_sink_stats", lambda **kwargs: False)
        with sinkfix.patch(model, POLICIES[policy]), sinkfix.monitor(model) as monitor, torch.no_grad():
            cache = DynamicCache(config=model.config)
            _one_request(monitor, model, input_ids=ids[:, :30], past_key_values=cache)
            records[deferred] = _one_request(monitor, model, input_ids=ids[:, 30:31], past_key_values=cache)
            after = _one_request(monitor, model, input_ids=ids[:, 31:], past_key_values=cache)  # the cache is whole
        assert after["tokens"] == 5 and cache.get_seq_length() == 36
    got, want = records[True], records[False]
    assert got["tokens"] == want["tokens"] == 1 and got["rows"] == want["rows"] == [1, 1]
    for field in ("sink_share", "sink_share_unscaled", "dormancy", "value_drain"):
        torch.testing.assert_close(_tensor(got[field]), _tensor(want[field]), atol=1e-6, rtol=0, equal_nan=True)
    assert got["hidden_sinks"] == want["hidden_sinks"] and got["residual_peak"] == want["residual_peak"]


def test_a_nested_patch_is_named_as_such_and_the_monitor_works_again_after_it(one_thread):
    model = tiny_model("llama")
    with sinkfix.monitor(model) as monitor, torch.no_grad():  # the monitor patches the stock model itself
        with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.5)):
            # before: "the model's patch was removed", while it came back at the end of this block
            with pytest.raises(MonitorError, match="another patch is in force"):
                monitor.forward(input_ids=_ids(1, 8))
        monitor.forward(input_ids=_ids(1, 8))
        assert monitor.records[0]["correction"]["policy"] == "identity"
        replacing = sinkfix.patch(model, sinkfix.Policy(sink_scale=0.5))
        replacing.remove()  # removed, not left as a block: the monitor's patch stays removed too
        with pytest.raises(MonitorError, match="patch was removed"):
            monitor.forward(input_ids=_ids(1, 8))


@pytest.mark.parametrize("entry", ["forward", "request"])
def test_right_padding_is_refused_and_left_padding_is_exact(entry, one_thread):
    """A right-padding row of a causal mask sees the real keys before it, so the fast path's sums
    counted it: a 20-token prompt padded to 34 on the right was logged as 34 tokens, its sink share
    0.03 off. Monitor.forward refuses before the forward; inside request() the outputs are served
    and the request ends with the error instead of a record."""
    model = tiny_model("llama")
    short, long = _ids(1, 20, seed=7), _ids(1, 34, seed=8)
    right = torch.cat([torch.cat([short, torch.zeros(1, 14, dtype=torch.long)], 1), long])
    right_mask = torch.ones_like(right)
    right_mask[0, 20:] = 0
    left = torch.cat([torch.cat([torch.zeros(1, 14, dtype=torch.long), short], 1), long])
    left_mask = right_mask.flip(1)
    with sinkfix.patch(model, POLICIES["profile-like"]), sinkfix.monitor(model) as monitor, torch.no_grad():
        alone = _one_request(monitor, model, input_ids=short, use_cache=False)
        with pytest.raises(MonitorError, match=r"right padding\) in batch rows \[0\]"):
            if entry == "forward":
                monitor.forward(input_ids=right, attention_mask=right_mask, use_cache=False)
            else:
                with monitor.request():
                    logits = model(input_ids=right, attention_mask=right_mask, use_cache=False).logits
        if entry == "request":
            assert torch.isfinite(logits[0, :20]).all()  # served
        monitor.forward(input_ids=left, attention_mask=left_mask, use_cache=False)
        padded = monitor.records[0]
    assert padded["tokens"] == alone["tokens"] == 20 and padded["rows"] == alone["rows"] == [19, 19]
    torch.testing.assert_close(_tensor(padded["sink_share"]), _tensor(alone["sink_share"]), atol=1e-5, rtol=0)


def test_real_rows_of_a_right_padded_causal_mask():
    from sinkfix.telemetry.monitor import _real_rows

    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    keys = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    mask = (causal[None] & keys[:, None, :])[:, None]  # (3, 1, 5, 5): right-padded, whole, left-padded
    real, padded = _real_rows(mask, 3, 5, "cpu")
    assert real.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [False] * 2 + [True] * 3]
    assert padded.tolist() == [True, False, False]
    window = causal & ~torch.ones(5, 5, dtype=torch.bool).tril(-3)  # a sliding window of 3: every row real
    real, padded = _real_rows(window[None, None], 1, 5, "cpu")
    assert real.all() and not padded.any()
