"""ReLU attention as a transformers attention implementation (``"sinkfix_relu"``).

The paper's third BB variant replaces the softmax by ``ReLU(score)`` divided by the query
position. Registering it with transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``,
without which the mask builders return None) keeps the ReLU model a plain ``LlamaForCausalLM``:
``model.set_attn_implementation("sinkfix_relu")`` or ``LlamaConfig(attn_implementation=...)``.

Convention (exact): for query row i with visible keys V_i (causal and padding mask),

    w_ij = ReLU(scale * q_i . k_j) / |V_i|   for j in V_i,   0 otherwise;   o_i = sum_j w_ij v_j.

For an unpadded causal sequence |V_i| = i + 1 (i is the 0-based query position), i.e. the paper's
division by the query position counted from 1. Rows with no visible key (left padding) output 0.
Weights do not sum to 1: a row can output nothing by giving every key a negative score, which is
why a ReLU head has no need for a sink to be dormant.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["RELU_IMPL_NAME", "relu_attention", "relu_attention_forward", "register_relu", "observing"]

RELU_IMPL_NAME = "sinkfix_relu"


def relu_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, Hq, Q, D), k/v (B, Hkv, K, D), visible bool (B, 1, Q, K) or None (= causal,
    upper-left aligned when Q > 1; all keys when Q == 1).

    Returns ``(out (B, Hq, Q, D), weights (B, Hq, Q, K), scores (B, Hq, Q, K))``. Key/value heads are
    shared by ``Hq // Hkv`` consecutive query heads (GQA).
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"query heads {q_heads} are not a multiple of key/value heads {kv_heads}")
    if q_heads != kv_heads:
        key = key.repeat_interleave(q_heads // kv_heads, dim=1)
        value = value.repeat_interleave(q_heads // kv_heads, dim=1)
    if visible is None:
        if q_len == 1:
            visible = torch.ones(1, 1, 1, k_len, dtype=torch.bool, device=query.device)
        else:
            rows = torch.arange(q_len, device=query.device)[:, None]
            visible = (torch.arange(k_len, device=query.device)[None, :] <= rows)[None, None]
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, Hq, Q, K)
    count = visible.sum(dim=-1, keepdim=True).clamp(min=1).to(scores.dtype)  # (B|1, 1, Q, 1)
    weights = torch.relu(scores).masked_fill(~visible, 0.0) / count
    return torch.matmul(weights, value), weights, scores


# Per-module observers (set by :func:`observing`): transformers looks the attention function up by
# name, globally, so per-model state lives on the attention modules.
_OBSERVER_ATTR = "_sinkfix_relu_observer"


def relu_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention interface: returns ``(out (B, Q, Hq, D), weights (B, Hq, Q, K))``."""
    if softcap is not None or s_aux is not None:
        raise NotImplementedError("ReLU attention has no softcap or learned sink logits")
    if dropout and dropout > 0 and module.training:
        raise NotImplementedError(f"ReLU attention does not implement attention dropout ({dropout})")
    visible = attention_mask
    if visible is not None and visible.dtype != torch.bool:
        visible = visible > torch.finfo(visible.dtype).min / 2
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, weights, scores = relu_attention(query, key, value, visible, scale)
    observer = getattr(module, _OBSERVER_ATTR, None)
    if observer is not None:
        observer(module, query, key, value, scores, weights)
    return out.transpose(1, 2).contiguous(), weights


_registered = False


def register_relu() -> None:
    """Register ``"sinkfix_relu"`` in both transformers registries (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RELU_IMPL_NAME, relu_attention_forward)
    AttentionMaskInterface.register(RELU_IMPL_NAME, sdpa_mask)
    _registered = True


@contextlib.contextmanager
def observing(modules: list[nn.Module], observer: Callable[..., None]) -> Iterator[None]:
    """Call ``observer(module, query, key, value, scores, weights)`` on every ReLU attention call of
    ``modules`` inside the block."""
    for m in modules:
        setattr(m, _OBSERVER_ATTR, observer)
    try:
        yield
    finally:
        for m in modules:
            if hasattr(m, _OBSERVER_ATTR):
                delattr(m, _OBSERVER_ATTR)
