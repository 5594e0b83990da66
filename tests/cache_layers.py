"""Shared by the cache tests: synthetic keys / values with a sink-like outlier, and feeding a layer."""

from __future__ import annotations

import torch


def outlier_tokens(batch=2, heads=2, length=30, dim=16, seed=0, outlier=50.0):
    """Keys / values with a sink-like outlier token 0 (``outlier`` x the others), as trained models have."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, heads, length, dim, generator=g)
    k[:, :, 0] *= outlier
    v[:, :, 0] *= outlier
    return k, v


def feed_layer(layer, k, v, sizes, first=0):
    """Update ``layer`` with consecutive slices of k / v starting at token ``first``; return the last
    call's (keys, values)."""
    start, out = first, None
    for size in sizes:
        positions = (torch.arange(size) + start).expand(k.shape[0], -1)
        out = layer.update(k[:, :, start : start + size], v[:, :, start : start + size], position_ids=positions)
        start += size
    return out


@torch.no_grad()
def prefill_then_decode(model, ids: torch.Tensor, cache, prefill: int = 9) -> torch.Tensor:
    """Logits of a ``prefill``-token forward, then one token at a time, through ``cache``."""
    out = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
    out += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(prefill, ids.shape[1])]
    return torch.cat(out, 1)
