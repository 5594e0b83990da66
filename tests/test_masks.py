"""The mask function registered for "sinkfix": padded causal masks as key ranges, the rest as sdpa builds it."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import (
    causal_mask_function,
    chunked_causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from sinkfix.integrations.masks import PaddedCausalMask, padded_causal_mask
from sinkfix.kernels.masks import key_padding_ranges, pack_mask_bits


def _padding_2d(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[-1, -2:] = False  # right padding
    if batch > 2:
        mask[0, 4] = False  # a hole
    return mask


@pytest.mark.parametrize("q_len,kv_len,q_offset,kv_offset,window", [
    (7, 7, 0, 0, None),     # prefill
    (1, 12, 11, 0, None),   # decode step with a cache
    (4, 9, 5, 0, 3),        # chunked prefill, sliding window
    (5, 8, 10, 7, 4),       # sliding layer whose cache dropped its first 7 keys
    (6, 6, 0, 0, 2),
])
@pytest.mark.parametrize("batch", [2, 3])
def test_same_mask_as_sdpa(batch, q_len, kv_len, q_offset, kv_offset, window):
    padding = _padding_2d(batch, kv_offset + kv_len)
    rule = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    args = dict(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=q_offset, kv_offset=kv_offset,
                mask_function=rule, attention_mask=padding, local_size=window)
    expect = sdpa_mask(**args, allow_is_causal_skip=False)
    got = padded_causal_mask(**args)
    assert isinstance(got, PaddedCausalMask)
    assert got.window == window and got.causal_offset == q_offset - kv_offset
    assert torch.equal(got.dense, expect)
    assert torch.equal(got.seen_by_any_row(), expect[:, 0].any(dim=1))
    assert got.shape == tuple(expect.shape) and got.ndim == 4


def test_no_padding_is_the_causal_rule_alone():
    # a chunk of 3 queries after 2 cached keys: no padding, the causal rule with its offset
    got = padded_causal_mask(batch_size=2, q_length=3, kv_length=5, q_offset=2, attention_mask=None)
    assert isinstance(got, PaddedCausalMask) and got.key_padding is None and got.key_ranges is None
    assert torch.equal(got.dense, torch.ones(5, 5, dtype=torch.bool).tril()[2:].expand(2, 1, 3, 5))


def test_no_mask_where_sdpa_mask_builds_none():
    """Square calls and single decode rows without padding get no mask at all, as from sdpa_mask:
    the attention path then knows the layout (the sink is key column 0 of every row)."""
    ones = torch.ones(2, 5, dtype=torch.long)
    for kwargs in (dict(q_length=5, kv_length=5), dict(q_length=1, kv_length=5, q_offset=4)):
        for mask in (None, ones):
            assert sdpa_mask(batch_size=2, attention_mask=mask, **kwargs) is None
            assert padded_causal_mask(batch_size=2, attention_mask=mask, **kwargs) is None


def test_other_masks_are_left_to_sdpa():
    padding = _padding_2d(2, 6)
    chunked = chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))
    for kwargs in (dict(mask_function=chunked, local_size=3),  # not a rule the kernels express
                   dict(mask_function=causal_mask_function, allow_is_causal_skip=False),  # a tensor was asked for
                   dict(mask_function=causal_mask_function, q_offset=torch.tensor(0))):  # a traced static-cache offset
        got = padded_causal_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=padding, **kwargs)
        expect = sdpa_mask(batch_size=2, q_length=6, kv_length=6, attention_mask=padding,
                           **(kwargs | dict(allow_is_causal_skip=False)))
        assert isinstance(got, torch.Tensor) and torch.equal(got, expect)


def test_a_prepared_mask_comes_back_unchanged():
    first = padded_causal_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=_padding_2d(2, 4))
    assert padded_causal_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=first) is first


def test_key_padding_ranges():
    padding = torch.tensor([[1, 1, 1, 1, 1, 1],   # whole
                            [0, 0, 1, 1, 1, 1],   # left padded
                            [1, 1, 1, 1, 0, 0],   # right padded
                            [0, 1, 0, 1, 1, 0],   # holes
                            [0, 0, 0, 0, 0, 0]],  # nothing real
                           dtype=torch.bool)
    assert key_padding_ranges(padding).tolist() == [[0, 6, 0], [2, 6, 0], [0, 4, 0], [1, 5, 1], [6, 0, 0]]
    assert key_padding_ranges(padding).dtype == torch.int32


@pytest.mark.parametrize("k_len", [1, 31, 32, 33, 75, 128, 300])
def test_pack_mask_bits(k_len):
    mask = torch.rand(2, 1, 3, k_len, generator=torch.Generator().manual_seed(k_len)) > 0.5
    packed = pack_mask_bits(mask)
    assert packed.dtype == torch.int32 and packed.shape[-1] % 4 == 0 and packed.shape[-1] * 32 >= k_len
    cols = torch.arange(packed.shape[-1] * 32)
    bits = (packed[..., cols // 32] >> (cols % 32)) & 1
    assert torch.equal(bits[..., :k_len].bool(), mask)
    assert not bits[..., k_len:].any()
