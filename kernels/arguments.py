"""Argument checks shared by the Triton launchers and the PyTorch paths (torch only, no triton import):
one message for one mistake, whichever backend meets it. Shapes, dtypes and plain numbers are
checked; the values inside tensors are not (reading them would wait for the device at every call),
except a one-value tensor given where a number is expected."""

from __future__ import annotations

import math
import numbers

import torch

#: What the Triton kernels take; the PyTorch paths take float64 as well (a float64 model).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = KERNEL_DTYPES + (torch.float64,)
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def check_qkv_shapes(q, k, v) -> None:
    """ValueError unless q, k, v are 4-D (B, H, S, D) tensors of one batch and head dim (>= 1), with k
    and v alike, query heads a multiple of kv heads, and at least one query row and one key (the
    fused CPU op divides by the length, a SIGFPE; the kernels' fp32 sink-row load reads key column 0
    unmasked, a fault at K = 0)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, S, D) tensor, got {getattr(t, 'shape', type(t).__name__)}")
    batch, q_heads, q_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head dim")
    check_head_dim(head_dim)
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads {q_heads} not a multiple of kv heads {kv_heads}")
    if q_len == 0 or k.shape[2] == 0:
        raise ValueError(f"sink attention needs at least one query row and one key, got Q={q_len}, K={k.shape[2]}")


def check_head_dim(head_dim: int) -> None:
    """ValueError for a head dim of 0 (its default scale ``D ** -0.5`` was a ZeroDivisionError)."""
    if head_dim < 1:
        raise ValueError(f"q/k/v head dim must be >= 1, got {head_dim}")


def check_qkv_dtypes(q, k, v, allowed: tuple[torch.dtype, ...]) -> None:
    """TypeError unless q, k, v share one dtype among ``allowed`` (integer inputs ran on the PyTorch
    path and came back truncated to integers); ValueError unless they share one device."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in allowed:
        names = "/".join(_DTYPE_NAMES[d] for d in allowed)
        raise TypeError(f"q, k, v must share one dtype among {names}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def positive_number(name: str, value) -> float:
    """``value`` as a float, ValueError unless it is a finite number > 0 (a one-value tensor is read:
    a host synchronisation, only where a caller passes one). A bool is refused."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def attention_scale(scale, head_dim: int) -> float:
    """The score scale the paths use: ``head_dim ** -0.5`` when None, else ``scale`` checked as a
    finite number > 0 (the kernels take the row max before scaling, exact for scale > 0 only)."""
    if scale is None:
        check_head_dim(head_dim)
        return head_dim ** -0.5
    return positive_number("scale", scale)


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


def check_sink_cols(sink_cols, batch: int) -> None:
    """``sink_cols`` None or an integer (B|1, NS) tensor of key columns (-1 = an unused slot)."""
    if sink_cols is None:
        return
    if not isinstance(sink_cols, torch.Tensor) or sink_cols.dim() != 2 or sink_cols.shape[0] not in (1, batch):
        raise ValueError(f"sink_cols must have shape (B|1, NS) = ({batch}|1, NS) for q batch {batch}, got "
                         f"{tuple(getattr(sink_cols, 'shape', ())) or type(sink_cols).__name__}")
    if sink_cols.dtype.is_floating_point or sink_cols.dtype.is_complex or sink_cols.dtype == torch.bool:
        raise TypeError(f"sink_cols must hold integer key columns, got {sink_cols.dtype}")


def check_policy_tensors(q_heads: int, beta=None, extra_logits=None, virtual_sink_logit=None) -> None:
    """beta and virtual_sink_logit (Hq,), extra_logits (Hq, E)."""
    for name, t in (("beta", beta), ("virtual_sink_logit", virtual_sink_logit)):
        if t is not None and tuple(getattr(t, "shape", ())) != (q_heads,):
            raise ValueError(f"{name} must have shape (Hq,) = ({q_heads},), got {tuple(getattr(t, 'shape', ()))}")
    if extra_logits is not None and (extra_logits.dim() != 2 or extra_logits.shape[0] != q_heads):
        raise ValueError(f"extra_logits must have shape (Hq, E) = ({q_heads}, E), got {tuple(extra_logits.shape)}")


def check_attn_mask(attn_mask, q, k) -> None:
    """``attn_mask`` None or a bool tensor on q's device that broadcasts to (B, 1|Hq, Q, K) with four
    dimensions (the kernels read it by its four strides; a 2-D (Q, K) mask ran on the PyTorch path
    and was refused by the kernels)."""
    if attn_mask is None:
        return
    want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be bool (True = attend), got {getattr(attn_mask, 'dtype', type(attn_mask))}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask on {attn_mask.device}, q on {q.device}")
    if attn_mask.dim() != 4 or any(s not in (1, w) for s, w in zip(attn_mask.shape, want)):
        raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to (B, 1|Hq, Q, K) = {want}")


def check_key_padding(key_padding, key_ranges, batch: int, k_len: int, device) -> None:
    """``key_padding`` None or a bool (B|1, K) tensor on ``device``; ``key_ranges`` only with it, and
    then int32 (B|1, 3) with unit column stride (what ``masks.key_padding_ranges`` returns)."""
    if key_padding is None:
        if key_ranges is not None:
            raise ValueError("key_ranges needs the key_padding it summarises")
        return
    if not isinstance(key_padding, torch.Tensor) or key_padding.dtype != torch.bool or key_padding.dim() != 2 \
            or key_padding.shape[0] not in (1, batch) or key_padding.shape[1] != k_len:
        raise ValueError(f"key_padding must be a bool (B|1, K) = ({batch}|1, {k_len}) tensor, got "
                         f"{getattr(key_padding, 'dtype', type(key_padding).__name__)} "
                         f"{tuple(getattr(key_padding, 'shape', ()))}")
    if key_padding.device != device:
        raise ValueError(f"key_padding on {key_padding.device}, q on {device}")
    if key_ranges is not None and (not isinstance(key_ranges, torch.Tensor) or key_ranges.dtype != torch.int32
                                   or tuple(key_ranges.shape) != (key_padding.shape[0], 3)
                                   or key_ranges.stride(-1) != 1):
        raise ValueError(f"key_ranges must be key_padding_ranges(key_padding): int32 ({key_padding.shape[0]}, 3) "
                         f"with unit column stride, got {getattr(key_ranges, 'dtype', type(key_ranges).__name__)} "
                         f"{tuple(getattr(key_ranges, 'shape', ()))}")


def check_attention_arguments(q, k, v, *, dtypes: tuple[torch.dtype, ...], attn_mask=None, sink_cols=None,
                              beta=None, extra_logits=None, virtual_sink_logit=None, scale=None, softcap=None,
                              sliding_window=None) -> tuple[float, float | None]:
    """The checks both backends make on one attention call (the Triton launchers add their own
    limits: head dim, sink slots, device type). ValueError / TypeError for arguments the paths
    would fail on with an internal error, or run on silently (softcap 0 makes every score 0, a
    scale of 0 every row uniform, a window of 0 every row empty, integer inputs truncated outputs).
    Returns (scale, softcap) as floats, the scale defaulted, so that a caller converts them once."""
    check_qkv_shapes(q, k, v)
    check_qkv_dtypes(q, k, v, dtypes)
    check_policy_tensors(q.shape[1], beta, extra_logits, virtual_sink_logit)
    check_sink_cols(sink_cols, q.shape[0])
    scale = attention_scale(scale, q.shape[-1])
    softcap = None if softcap is None else positive_number("softcap", softcap)
    check_sliding_window(sliding_window)
    check_attn_mask(attn_mask, q, k)
    return scale, softcap


def check_hidden_beta(hidden_beta, q_heads: int) -> None:
    """The hidden-sink scaling of content-dependent sinks: a floating (Hq,) tensor."""
    if not isinstance(hidden_beta, torch.Tensor) or tuple(hidden_beta.shape) != (q_heads,) \
            or not hidden_beta.is_floating_point():
        raise ValueError(f"hidden_beta must have shape (Hq,) = ({q_heads},), got "
                         f"{getattr(hidden_beta, 'dtype', type(hidden_beta).__name__)} "
                         f"{tuple(getattr(hidden_beta, 'shape', ()))}")


def check_hidden_mask(hidden, batch: int, q_heads: int, k_len: int) -> None:
    """The hidden-sink mask of content-dependent sinks: a bool or uint8 (B, Hq, K) tensor."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in (torch.bool, torch.uint8) \
            or tuple(hidden.shape) != (batch, q_heads, k_len):
        raise ValueError(f"hidden must be a bool or uint8 (B, Hq, K) = ({batch}, {q_heads}, {k_len}) tensor, got "
                         f"{getattr(hidden, 'dtype', type(hidden).__name__)} {tuple(getattr(hidden, 'shape', ()))}")


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
