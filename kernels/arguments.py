"""Shape checks shared by the Triton launchers and the PyTorch path (torch only, no triton import):
one message for one mistake, whichever backend meets it."""

from __future__ import annotations

import torch


def check_qkv_shapes(q, k, v) -> None:
    """ValueError unless q, k, v are 4-D (B, H, S, D) tensors of one batch and head dim, with k and v
    alike, query heads a multiple of kv heads, and at least one query row and one key (the fused CPU
    op divides by the length, a SIGFPE; the kernels' fp32 sink-row load reads key column 0 unmasked,
    a fault at K = 0)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, S, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    batch, q_heads, q_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head dim")
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads {q_heads} not a multiple of kv heads {kv_heads}")
    if q_len == 0 or k.shape[2] == 0:
        raise ValueError(f"sink attention needs at least one query row and one key, got Q={q_len}, K={k.shape[2]}")
