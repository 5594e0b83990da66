"""Split-KV decode kernel vs the fp64 reference, and the dispatch of ``sinkfix.kernels``.

The sink must be counted in exactly one split: the cases put sink columns in the first split, in a
later split and in several splits at once, and vary the number of splits on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from ..conftest import require_triton_kernels

require_triton_kernels()

import sinkfix.kernels as kernels  # noqa: E402
from sinkfix.kernels import attention_decode  # noqa: E402
from sinkfix.kernels.attention_decode import default_num_splits, sink_attention_decode  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(kt, q, k, v, label, num_splits=None, **kw):
    out, lse = kt.poisoned(q)
    sink_attention_decode(q, k, v, out=out, lse=lse, num_splits=num_splits, **kw)
    return kt.check_attention(out, lse, q, k, v, label=label, **kw)


@pytest.fixture(autouse=True)
def _poison_workspace(monkeypatch):
    """NaN-filled partial states: a split or slot that the reduction reads unwritten shows up."""
    real = attention_decode._empty_workspace

    def poisoned(*args, **kwargs):
        return tuple(t.fill_(float("nan")) for t in real(*args, **kwargs))

    monkeypatch.setattr(attention_decode, "_empty_workspace", poisoned)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("policy", ["identity", "scaling", "drop", "virtual", "s_aux", "combined"])
def test_policies_one_token(kt, policy, dtype):
    # Q = 1 against 317 keys in 3 splits of 128 keys (whole 64-key tiles), the last one ragged
    batch, hq, hkv, kl = 2, 4, 2, 317
    q, k, v = kt.make_qkv(batch, hq, hkv, 1, kl, 64, dtype, sink_cols=torch.zeros(batch, 1, dtype=torch.long),
                          sink_boost=4.0, seed=3)
    _run(kt, q, k, v, f"decode {policy}", num_splits=3, causal=True, causal_offset=kl - 1,
         **kt.policy_kwargs(policy, hq, batch))


def test_identity_values_serve_plain_softmax(kt):
    """Sink scale 1 and a virtual sink logit of -inf (a guard's fallback under torch.compile) equal
    plain softmax in the split-KV decode kernel too (the reference without any policy)."""
    batch, hq, hkv, kl = 2, 4, 2, 200
    q, k, v = kt.make_qkv(batch, hq, hkv, 1, kl, 64, torch.float32, sink_cols=torch.zeros(batch, 1, dtype=torch.long),
                          sink_boost=4.0, seed=5)
    kw = kt.policy_kwargs("identity values", hq, batch)
    out, lse = kt.poisoned(q)
    sink_attention_decode(q, k, v, out=out, lse=lse, num_splits=2, causal=True, causal_offset=kl - 1, **kw)
    kt.check_attention(out, lse, q, k, v, label="decode identity values vs identity", causal=True, causal_offset=kl - 1)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_sink_in_later_split_counted_once(kt, num_splits):
    # sinks at 0, 150 and 299: with 5 splits they sit in splits 0, 2 and 4
    sinks = torch.tensor([[0, 150, 299]])
    q, k, v = kt.make_qkv(1, 2, 1, 1, 300, 64, torch.float32, sink_cols=sinks, sink_boost=3.0, seed=num_splits)
    kw = kt.policy_kwargs("scaling", 2, 1) | {"sink_cols": sinks.to(kt.device)}
    _run(kt, q, k, v, f"decode splits={num_splits}", num_splits=num_splits, **kw)


def test_split_count_does_not_change_the_result(kt):
    q, k, v = kt.make_qkv(1, 4, 1, 1, 320, 64, torch.float32, sink_cols=torch.tensor([[0]]), sink_boost=3.0)
    kw = kt.policy_kwargs("combined", 4, 1)
    outs = [sink_attention_decode(q, k, v, num_splits=s, **kw)[0] for s in (1, 5)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_len", [2, 4])
def test_few_tokens_speculative(kt, q_len):
    # several new tokens (speculative decoding, bottom-right causal) with a window that evicts the
    # sink for the last rows only
    kl = 300
    q, k, v = kt.make_qkv(2, 6, 2, q_len, kl, 64, torch.bfloat16, sink_cols=torch.zeros(2, 1, dtype=torch.long),
                          sink_boost=3.0)
    _run(kt, q, k, v, f"decode q={q_len}", num_splits=4, causal=True, causal_offset=kl - q_len,
         sliding_window=kl - 2, **kt.policy_kwargs("combined", 6, 2))


def test_sink_evicted_by_window(kt):
    q, k, v = kt.make_qkv(1, 2, 2, 1, 300, 64, torch.float16, sink_cols=torch.tensor([[0]]), sink_boost=3.0)
    _run(kt, q, k, v, "decode window evicts sink", num_splits=3, causal=True, causal_offset=299,
         sliding_window=128, **kt.policy_kwargs("scaling", 2, 1))


@pytest.mark.parametrize("hq,hkv,q_len", [(2, 2, 1), (6, 2, 3), (8, 1, 1), (16, 1, 9)])
def test_gqa_row_packing(kt, hq, hkv, q_len):
    # GROUP * Q rows share one tile: 1, 9 (not a power of 2), 8, and 144 (> 128 at hd 64: two tiles)
    kl = 260
    q, k, v = kt.make_qkv(1, hq, hkv, q_len, kl, 64, torch.float16, sink_cols=torch.tensor([[0]]), sink_boost=3.0)
    _run(kt, q, k, v, f"decode gqa {hq // hkv} q={q_len}", num_splits=2, causal=True, causal_offset=kl - q_len,
         **kt.policy_kwargs("scaling", hq, 1))


@pytest.mark.parametrize("head_dim,dtype", [(72, torch.float32), (80, torch.bfloat16), (128, torch.float16),
                                            (256, torch.float32), (96, torch.float16), (96, torch.float32)],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_head_dims(kt, head_dim, dtype):
    q, k, v = kt.make_qkv(1, 2, 1, 1, 270, head_dim, dtype, sink_cols=torch.tensor([[0]]), sink_boost=3.0)
    _run(kt, q, k, v, f"decode hd{head_dim}", num_splits=3, causal=True, causal_offset=269,
         **kt.policy_kwargs("combined", 2, 1))


def test_left_padding_mask_and_softcap(kt):
    # batch row 1 left-padded by 7 (sink at its first real column), Gemma-2 softcap
    sinks = torch.tensor([[0], [7]])
    q, k, v = kt.make_qkv(2, 4, 2, 1, 290, 64, torch.bfloat16, sink_cols=sinks, sink_boost=3.0, layout="bshd")
    mask = torch.ones(2, 1, 1, 290, dtype=torch.bool, device=kt.device)
    mask[1, ..., :7] = False
    kw = kt.policy_kwargs("scaling", 4, 2) | {"sink_cols": sinks.to(kt.device)}
    _run(kt, q, k, v, "decode left pad", num_splits=3, attn_mask=mask, softcap=20.0, **kw)


@pytest.mark.parametrize("layout", ["left", "right", "mixed", "holes"])
def test_key_padding_matches_the_dense_mask(kt, layout):
    """Batched generation: each sequence's padding as key padding (no (Q, K) mask) in split-KV
    decoding, 3 splits of 128 keys; equal to the dense mask and to the fp64 reference."""
    from .test_attention_prefill import key_padding_for

    batch, kl, q_len = 3, 300, 2
    key_ok = key_padding_for(layout, batch, kl)
    sinks = key_ok.to(torch.int32).argmax(-1, keepdim=True)
    q, k, v = kt.make_qkv(batch, 4, 2, q_len, kl, 64, torch.bfloat16, sink_cols=sinks, sink_boost=3.0)
    kw = kt.policy_kwargs("combined", 4, batch) | {"sink_cols": sinks.to(kt.device)}
    key_ok = key_ok.to(kt.device)
    rules = dict(causal=True, causal_offset=kl - q_len)
    out, lse = kt.poisoned(q)
    sink_attention_decode(q, k, v, key_padding=key_ok, out=out, lse=lse, num_splits=3, **rules, **kw)
    kt.check_attention(out, lse, q, k, v, label=f"decode key padding {layout}", attn_mask=key_ok[:, None, None, :],
                       **rules, **kw)
    dense = key_ok[:, None, None, :].expand(batch, 1, q_len, kl)
    out_d, lse_d = kt.poisoned(q)
    sink_attention_decode(q, k, v, attn_mask=dense, out=out_d, lse=lse_d, num_splits=3, **rules, **kw)
    torch.testing.assert_close(lse, lse_d, rtol=0, atol=1e-5)


def test_matches_prefill_kernel(kt):
    from sinkfix.kernels.attention_prefill import sink_attention_prefill

    q, k, v = kt.make_qkv(2, 4, 2, 1, 300, 64, torch.float32, sink_cols=torch.zeros(2, 1, dtype=torch.long),
                          sink_boost=3.0)
    kw = kt.policy_kwargs("combined", 4, 2)
    o_d, l_d = sink_attention_decode(q, k, v, num_splits=4, **kw)
    o_p, l_p = sink_attention_prefill(q, k, v, **kw)
    torch.testing.assert_close(o_d, o_p, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(l_d, l_p, rtol=1e-5, atol=2e-6)


def test_default_num_splits():
    cpu = torch.device("cpu")  # stands in for a 132-SM H100
    assert default_num_splits(1, 8, 1, 128 * 1024, cpu) == 33  # 264 programs: two per SM
    assert default_num_splits(1, 8, 1, 1024, cpu) == 4  # capped: >= 256 keys per split
    assert default_num_splits(64, 8, 1, 32 * 1024, cpu) == 1  # batch alone fills the GPU
    assert default_num_splits(1, 1, 1, 100, cpu) == 1
    assert default_num_splits(1, 1, 1, 10 ** 7, cpu) == 128  # cap on the workspace


def test_public_dispatch(kt, monkeypatch):
    calls = []
    from sinkfix.kernels import attention_prefill

    for mod, name in ((attention_decode, "sink_attention_decode"), (attention_prefill, "sink_attention_prefill")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    q, k, v = kt.make_qkv(1, 2, 1, 1, kernels.DECODE_MIN_K, 64, torch.float16)
    out, lse = kernels.sink_attention_triton(q, k, v, causal=True, causal_offset=kernels.DECODE_MIN_K - 1)
    kt.check_attention(out, lse, q, k, v, label="public decode", causal=True, causal_offset=kernels.DECODE_MIN_K - 1)
    q2, k2, v2 = kt.make_qkv(1, 2, 1, 17, 40, 64, torch.float16)
    kernels.sink_attention_triton(q2, k2, v2, causal=True)
    assert calls == ["sink_attention_decode", "sink_attention_prefill"]
    assert kernels.triton_available()


@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_int32_sink_columns_below_minus_one_count_as_absent(kt, kernel):
    """int32 sink columns reach the kernels as they are (no clamp, one operation less per call):
    every negative column is an unused slot, like -1, in the decode kernels (split and reduction)
    and in the prefill kernel."""
    from sinkfix.kernels.attention_prefill import sink_attention_prefill

    batch, kl, q_len = 2, 300, (1 if kernel == "decode" else 37)
    sinks = torch.tensor([[0, 150], [3, -1]])
    q, k, v = kt.make_qkv(batch, 4, 2, q_len, kl, 64, torch.float32, sink_cols=sinks, sink_boost=3.0, seed=5)
    kw = kt.policy_kwargs("combined", 4, batch)
    del kw["sink_cols"]
    rules = dict(causal=True, causal_offset=kl - q_len)
    run = (lambda cols: sink_attention_decode(q, k, v, sink_cols=cols, num_splits=3, **rules, **kw)) \
        if kernel == "decode" else (lambda cols: sink_attention_prefill(q, k, v, sink_cols=cols, **rules, **kw))
    wide = sinks.to(device=kt.device)
    narrow = torch.tensor([[0, 150], [3, -9]], dtype=torch.int32, device=kt.device)
    out_wide, lse_wide = run(wide)
    out_narrow, lse_narrow = run(narrow)
    torch.testing.assert_close(out_narrow, out_wide, rtol=0, atol=0)
    torch.testing.assert_close(lse_narrow, lse_wide, rtol=0, atol=0)
    kt.check_attention(out_narrow, lse_narrow, q, k, v, label=f"{kernel} int32 sink columns", sink_cols=wide,
                       **rules, **kw)
