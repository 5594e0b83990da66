"""The launchers' host-side helpers: plain integer arithmetic instead of triton's constexpr functions,
device properties asked once per device, no copy of a one-source zero-value table. What they save
per call is measured by benchmarks/bench_host_overhead.py; here, that they compute the same."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import triton

from sinkfix.kernels import attention_common
from sinkfix.kernels.attention_common import cdiv, device_arch, device_sm_count, next_power_of_2


def test_integer_helpers_match_triton():
    values = list(range(0, 4100)) + [2**20 - 1, 2**20, 2**20 + 1, 2**31 - 1, 2**31, 3 * 2**40 + 5]
    for n in values:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in values[::7]:
        for b in (1, 2, 3, 16, 64, 128, 255, 256, 4097):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_device_properties_are_asked_once_per_device(monkeypatch):
    asked = []

    def fake_properties(index):
        asked.append(index)
        return SimpleNamespace(major=8 + index, minor=index, multi_processor_count=100 + index)

    monkeypatch.setattr(torch.cuda, "get_device_properties", fake_properties)
    attention_common._cuda_properties.cache_clear()
    try:
        for _ in range(3):
            assert device_arch(torch.device("cuda", 0)) == 80
            assert device_sm_count(torch.device("cuda", 0)) == 100
            assert device_arch(torch.device("cuda", 1)) == 91
            assert device_sm_count(torch.device("cuda", 1)) == 101
        assert asked == [0, 1]
    finally:
        attention_common._cuda_properties.cache_clear()
    assert device_arch(torch.device("cpu")) == 90 and device_sm_count(torch.device("cpu")) == 132


@pytest.mark.parametrize("sources", ["extra", "virtual", "both", "none"])
def test_zero_value_table(sources):
    heads = 3
    extra = torch.arange(heads * 2, dtype=torch.float32).reshape(heads, 2) if sources in ("extra", "both") else None
    virtual = torch.tensor([0.5, -1.0, 2.0]) if sources in ("virtual", "both") else None
    table, every_row = attention_common._zero_value_table(extra, virtual, heads, torch.device("cpu"))
    if sources == "none":
        assert table is None and every_row == 0
        return
    parts = [t for t in (extra, None if virtual is None else virtual[:, None]) if t is not None]
    torch.testing.assert_close(table, torch.cat(parts, dim=1), rtol=0, atol=0)
    assert every_row == (2 if extra is not None else 0)
    assert table.is_contiguous()
    if len(parts) == 1:  # one source: the table is that tensor itself, not a copy
        assert table.data_ptr() == parts[0].data_ptr()


@pytest.mark.parametrize("prepared", [False, True])
def test_first_column_sink_tensor_made_once_per_device(kt, prepared, monkeypatch):
    """The Triton path's first-column sink: the (1, 1) int32 zero patch() prepares for the device
    (read by every batch row through a zero stride), or, on a device without one, zeros per call; the
    same attention as explicit column-0 sink columns per row, in the decode and the prefill kernel."""
    from sinkfix.ops import custom_ops

    monkeypatch.setattr(custom_ops, "_FIRST_COLUMN_SINK", {})
    device = torch.device(kt.device)
    if prepared:
        custom_ops.prepare_first_column_sink(device)
        cached = custom_ops._first_column_sink(3, device)
        assert tuple(cached.shape) == (1, 1) and cached.dtype == torch.int32 and int(cached) == 0
        assert custom_ops._first_column_sink(5, device) is cached
    else:
        assert tuple(custom_ops._first_column_sink(3, device).shape) == (3, 1)
    beta = torch.tensor([0.9, 0.5, 1.0, 0.7], device=kt.device)
    for q_len, k_len in ((1, 300), (40, 40)):  # decode kernel, prefill kernel
        q, k, v = kt.make_qkv(3, 4, 2, q_len, k_len, 32, torch.float32, sink_cols=torch.zeros(3, 1, dtype=torch.long),
                              sink_boost=3.0, seed=q_len)
        args = dict(attn_mask=None, key_padding=None, key_ranges=None, beta=beta, extra_logits=None,
                    virtual_sink_logit=None, causal=q_len > 1, causal_offset=0 if q_len > 1 else k_len - 1,
                    sliding_window=None, scale=32 ** -0.5, softcap=None, backend="triton")
        out, lse = custom_ops.sink_attention_impl(q, k, v, sink_cols=None, first_column_sink=True, **args)
        zeros = torch.zeros(3, 1, dtype=torch.long, device=kt.device)
        out_explicit, lse_explicit = custom_ops.sink_attention_impl(q, k, v, sink_cols=zeros, first_column_sink=False,
                                                                    **args)
        torch.testing.assert_close(out, out_explicit, rtol=0, atol=0)
        torch.testing.assert_close(lse, lse_explicit, rtol=0, atol=0)
