"""Mask preparation shared by the attention launchers and the transformers integration: torch
only (no triton import), so the integration can prepare a launch's masks on any install.

Two forms reach the kernels instead of a byte per (query, key) pair:

- **key padding** (the common case: transformers' padded causal masks): one bool per key and
  sequence, True = a real key that every query row may see under the causal/window rules, plus its
  int32 summary from :func:`key_padding_ranges` (first real key, end, holes) that tells the kernels
  which key tiles need no mask at all;
- **an arbitrary dense mask**, bit-packed along the key axis by :func:`pack_mask_bits` (one bit
  per score, read by the kernels as one int32 word per row and 32 keys).

Both are computed with tensor ops only: no value is read back to the host.
"""

from __future__ import annotations

import torch

__all__ = ["key_padding_ranges", "pack_mask_bits"]


def key_padding_ranges(key_padding: torch.Tensor) -> torch.Tensor:
    """int32 (B, 3) per sequence of a (B, K) bool key mask (True = a real key every query row may
    see): the first real key, one past the last one, and 1 where the real keys are not contiguous
    (holes; then every tile is masked). Tensor ops only, no host sync: compute it once per forward
    and pass it with the mask to every layer. A row without real keys gives (K, 0, 0)."""
    k_len = key_padding.shape[-1]
    if k_len == 0:
        return torch.zeros(key_padding.shape[0], 3, dtype=torch.int32, device=key_padding.device)
    real = key_padding.to(torch.int32)
    seen = real.amax(dim=-1) > 0
    first = torch.where(seen, real.argmax(dim=-1), k_len)
    end = torch.where(seen, k_len - real.flip(-1).argmax(dim=-1), 0)
    holes = seen & (real.sum(dim=-1) != end - first)
    return torch.stack([first, end, holes.to(first.dtype)], dim=-1).to(torch.int32).contiguous()


def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """(..., K) bool -> (..., W) int32 bit-packed along K: bit j of word w is column 32 w + j;
    W = ceil(K / 32) rounded up to a multiple of 4 (16-byte rows, zero bits past K). Tensor ops,
    no host sync: one pass over the mask per launch, after which every query head reads 1/8 of
    the bytes (little-endian: byte b of a word holds its columns 8 b .. 8 b + 7)."""
    k_len = mask.shape[-1]
    n_bytes = -(-k_len // 128) * 16
    padded = torch.zeros(*mask.shape[:-1], n_bytes * 8, dtype=torch.uint8, device=mask.device)
    padded[..., :k_len] = mask
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=mask.device)
    packed = (padded.view(*mask.shape[:-1], n_bytes, 8) * weights).sum(-1, dtype=torch.uint8)
    return packed.view(torch.int32)
