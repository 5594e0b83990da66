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


def causal_offset_arg(causal_offset) -> int:
    """``causal_offset`` as the paths take it: an integer (2.7 was read as 2; a bool is refused)."""
    if isinstance(causal_offset, bool) or int(causal_offset) != causal_offset:
        raise ValueError(f"causal_offset must be an integer, got {causal_offset!r}")
    return int(causal_offset)


def check_sliding_window(sliding_window) -> None:
    """ValueError unless ``sliding_window`` is None or an integer >= 1 (a bool is refused: True ran as
    a window of 1 on one backend and was refused on the other)."""
    if sliding_window is not None and (isinstance(sliding_window, bool) or int(sliding_window) != sliding_window
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be an integer >= 1, got {sliding_window!r}")


def check_residual_clip_arguments(hidden, threshold, is_sink, sink_norm) -> None:
    """ValueError / TypeError for residual-clip arguments either backend would fail on or run on
    silently: hidden (B, S, D); threshold a number >= 0 or a (B,) tensor; is_sink a (B, S) bool on
    hidden's device; sink_norm > 0 (a sink is clamped, never zeroed) and only with is_sink (alone it
    clamps nothing). Shapes and numbers only: a (B,) threshold tensor's values are not read."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be a (B, S, D) tensor, got {getattr(hidden, 'shape', type(hidden).__name__)}")
    batch, seq_len = hidden.shape[:2]
    if isinstance(threshold, torch.Tensor) and threshold.dim() > 0:
        if threshold.shape != (batch,):
            raise ValueError(f"threshold must be a float or a (B,) = ({batch},) tensor, got {tuple(threshold.shape)}")
    elif isinstance(threshold, bool) or not float(threshold) >= 0:
        # a number or a one-value tensor (read, as the kernel reads it: a negative cap flipped every
        # token's sign); a (B,) tensor's values are the caller's to check (reading them waits for the device)
        raise ValueError(f"threshold must be >= 0 (inf = no cap), got {threshold!r}")
    if sink_norm is not None and (isinstance(sink_norm, bool) or not float(sink_norm) > 0):
        raise ValueError(f"sink_norm must be > 0 (sinks are clamped, never zeroed), got {sink_norm!r}")
    if sink_norm is not None and is_sink is None:
        raise ValueError("sink_norm clamps the sink tokens' norm: give is_sink with it")
    if is_sink is not None:
        if not isinstance(is_sink, torch.Tensor) or is_sink.dtype != torch.bool or is_sink.shape != (batch, seq_len):
            raise ValueError(f"is_sink must be bool (B, S) = ({batch}, {seq_len}), got "
                             f"{getattr(is_sink, 'dtype', type(is_sink).__name__)} {tuple(getattr(is_sink, 'shape', ()))}")
        if is_sink.device != hidden.device:
            raise ValueError(f"is_sink on {is_sink.device}, hidden on {hidden.device}")
