"""Content-dependent sinks on the Triton backend: the kernels' path against the PyTorch path.

``content_sink_attention_triton`` (stock pass -> column-mass kernel -> decision -> the prefill
kernel's hidden-sink variant) must decide the same hidden set as the fp64 column statistics and
give the reference's output; a patched tiny model on backend="triton" (the interpreter here) must
give the logits of backend="torch", through prefill and cached decode.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from ..conftest import require_triton_kernels

require_triton_kernels()

import sinkfix  # noqa: E402
from sinkfix import Policy  # noqa: E402
from sinkfix.ops.content_attention import content_sink_attention_torch, content_sink_attention_triton  # noqa: E402
from sinkfix.ops.content_reference import (  # noqa: E402
    column_stats_reference, decide_hidden_sinks, reference_content_sink_attention,
)

from ..conftest import tiny_model  # noqa: E402
from .conftest import DEVICE, make_qkv  # noqa: E402

ATOL = 2e-6  # fp32 kernels against fp64: ~4e-7 measured on these shapes


def _planted(batch, hq, hk, q_len, k_len, d, seed=0):
    q, k, v = make_qkv(batch, hq, hk, q_len, k_len, d, torch.float32, sink_cols=torch.zeros(batch, 1, dtype=torch.long),
                       sink_boost=3.0, seed=seed)
    q_dir = q.mean(dim=(1, 2))
    q_dir = q_dir / q_dir.norm(dim=-1, keepdim=True)
    for col in (5, 13):  # hidden sinks: keys the mean query attends to
        k[:, :, col] = q_dir[:, None] * 2.0 * d ** 0.5 / 1.5
    return q, k, v


@pytest.mark.parametrize("padded", [False, True])
def test_triton_path_decides_and_applies_like_the_reference(padded):
    batch, hq, hk, q_len, k_len, d = 2, 4, 2, 23, 23, 16
    q, k, v = _planted(batch, hq, hk, q_len, k_len, d)
    pad = torch.ones(batch, k_len, dtype=torch.bool, device=DEVICE)
    if padded:
        pad[1, :3] = False
    sink_cols = torch.tensor([[0], [3 if padded else 0]], device=DEVICE)
    hidden_beta = torch.tensor([0.4, 0.0, 0.9, 0.4], device=DEVICE)
    heads = torch.tensor([True, True, True, False], device=DEVICE)
    policy = dict(beta=torch.full((hq,), 0.8, device=DEVICE), virtual_sink_logit=torch.zeros(hq, device=DEVICE))
    got = content_sink_attention_triton(q, k, v, hidden_beta=hidden_beta, threshold=0.1, heads=heads, need_stats=True,
                                        key_padding=pad if padded else None, causal=True, sink_cols=sink_cols, **policy)
    dense = dict(attn_mask=pad[:, None, None, :] if padded else None, causal=True)
    stats = column_stats_reference(q, k, **dense)
    is_sink = torch.zeros(batch, k_len, dtype=torch.bool, device=DEVICE).scatter_(1, sink_cols, True)
    want_hidden = decide_hidden_sinks(stats, is_sink, threshold=0.1, min_rows=1, heads=heads)
    # hidden sinks in every corrected head of every sequence, none in the head the rule leaves alone
    assert want_hidden[:, :3].any(-1).all() and not want_hidden[:, 3].any()
    assert torch.equal(got.hidden, want_hidden)
    assert torch.equal(got.stats.rows.double(), stats.rows)
    torch.testing.assert_close(got.stats.mass.double(), stats.mass, atol=1e-5 * q_len, rtol=0)
    want, _, want_lse = reference_content_sink_attention(q, k, v, hidden=want_hidden, hidden_beta=hidden_beta,
                                                         sink_cols=sink_cols, **dense, **policy)
    torch.testing.assert_close(got.out.double(), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.lse.double(), want_lse, atol=ATOL, rtol=0)
    # the PyTorch path agrees on the set and the output
    torch_path = content_sink_attention_torch(q, k, v, hidden_beta=hidden_beta, threshold=0.1, heads=heads,
                                              sink_cols=sink_cols, **dense, **policy)
    assert torch.equal(torch_path.hidden, got.hidden)
    torch.testing.assert_close(got.out, torch_path.out, atol=ATOL, rtol=0)


def _logits_both_backends(model, ids, mask, policy):
    out = {}
    for backend in ("torch", "triton"):
        with torch.no_grad(), sinkfix.patch(model, policy, backend=backend) as handle:
            assert handle.backend == backend
            cache = tf.DynamicCache(config=model.config)
            prompt = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).logits
            nxt = prompt[:, -1].argmax(-1, keepdim=True)
            step_mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            step = model(input_ids=nxt, attention_mask=step_mask, cache=cache, use_cache=True).logits
            out[backend] = (prompt, step)
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_patched_model_on_triton_equals_torch_backend(arch, monkeypatch):
    """Policy.act() on backend="triton" vs backend="torch": prefill logits of a left-padded batch and
    one cached decode step (the decode step runs the PyTorch small-ops path on both backends)."""
    from sinkfix.kernels import column_mass as column_mass_module

    calls = []
    real_column_mass = column_mass_module.column_mass
    monkeypatch.setattr(column_mass_module, "column_mass",
                        lambda *a, **kw: calls.append(kw) or real_column_mass(*a, **kw))
    model = tiny_model(arch).to(DEVICE)
    ids = torch.randint(1, 97, (2, 14), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = _logits_both_backends(model, ids, mask, Policy.act())
    # the triton prefill ran the kernels in every layer, the padding as key ranges (no dense mask)
    assert len(calls) == model.config.num_hidden_layers
    assert all(kw["attn_mask"] is None and kw["key_padding"] is not None for kw in calls)
    real = mask.bool()
    torch.testing.assert_close(out["triton"][0][real], out["torch"][0][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], atol=1e-5, rtol=0)
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits
    assert (stock - out["torch"][0])[real].abs().max() > 1e-3  # the rule acts on this input


def test_chunked_prefill_on_triton_equals_torch_backend():
    """A prompt in two chunks of 11 rows (both on the kernels: a chunk offset, the window of
    Gemma3's sliding layers and left padding reach them as a key-range mask), the second chunk
    deciding on the merged column statistics of both."""
    model = tiny_model("gemma3").to(DEVICE)
    ids = torch.randint(1, 97, (2, 22), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits = {}
    for backend in ("torch", "triton"):
        with torch.no_grad(), sinkfix.patch(model, Policy.act(), backend=backend):
            cache = tf.DynamicCache(config=model.config)
            first = model(input_ids=ids[:, :11], attention_mask=mask[:, :11], cache=cache, use_cache=True).logits
            second = model(input_ids=ids[:, 11:], attention_mask=mask, cache=cache, use_cache=True).logits
            logits[backend] = torch.cat([first, second], dim=1)
    real = mask.bool()
    torch.testing.assert_close(logits["triton"][real], logits["torch"][real], atol=1e-5, rtol=0)


def test_a_uint8_hidden_set_is_read_as_bool_like_the_torch_path():
    # a uint8 set holding 2 (any nonzero value is a member, as on the PyTorch path) stopped being
    # hidden on the kernels' path: 2 & ~True = 0 in uint8, 0.575 off the bool set's output on a 12-token case
    q, k, v = _planted(1, 2, 1, 16, 16, 16, seed=3)
    common = dict(hidden_beta=torch.tensor([0.2, 0.2], device=DEVICE), causal=True,
                  sink_cols=torch.zeros(1, 1, dtype=torch.long, device=DEVICE))
    as_bool = torch.zeros(1, 2, 16, dtype=torch.bool)
    as_bool[:, :, 4] = True
    expected = content_sink_attention_triton(q, k, v, hidden=as_bool.to(DEVICE), **common)
    for value in (1, 2, 255):
        as_uint8 = as_bool.to(torch.uint8) * value
        got = content_sink_attention_triton(q, k, v, hidden=as_uint8.to(DEVICE), **common)
        torch.testing.assert_close(got.out, expected.out, rtol=0, atol=0)
        assert got.hidden.dtype == torch.bool and got.hidden[0, :, 4].all()


def test_compiling_the_triton_content_path_breaks_the_graph_and_says_why_under_fullgraph():
    # traced, the Triton content path failed deep inside dynamo (fullgraph: "_patched_getfile"; without
    # it, under the interpreter, a KeyError on torch.uint64): it now runs eagerly behind a graph break
    import torch._dynamo

    model = tiny_model("llama").to(DEVICE)
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with sinkfix.patch(model, Policy.act(), backend="triton"), torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="backend='torch'"):
            torch.compile(model, backend="eager", fullgraph=True)(input_ids=ids, attention_mask=mask)
    torch._dynamo.reset()
