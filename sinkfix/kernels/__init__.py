"""Triton kernels of sinkfix: sink-aware attention (prefill and split-KV decode) and fused residual
clipping. Plain tensors in, plain tensors out; nothing here knows about transformers.

Importing this package never imports triton: the kernel modules are loaded on first use, so the
package works (with :func:`triton_available` returning False) where triton is missing. Triton
decides between compiling and interpreting when a kernel module is imported, so set
``TRITON_INTERPRET=1`` before the first call if the CPU interpreter is wanted.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["triton_available", "sink_attention", "clip_residual", "DECODE_MAX_Q", "DECODE_MIN_K"]

# Heuristic for the split-KV decode kernel (see sink_attention): up to 16 query tokens, a
# (GROUP * Q)-row tile still fits one program per kv head, and from 256 keys on the key axis can be
# cut into at least one 256-key split per program, which is what lets batch 1 fill the GPU. Below
# that, or for more query tokens, the prefill kernel's query tiles already give enough programs.
DECODE_MAX_Q = 16
DECODE_MIN_K = 256


def triton_available() -> bool:
    """True when triton is importable and either a CUDA device is present or the interpreter is on."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        import triton
    except Exception:  # a broken install counts as missing
        return False
    if triton.knobs.runtime.interpret:
        return True
    return torch.cuda.is_available()


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sink_cols: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    extra_logits: torch.Tensor | None = None,
    virtual_logit: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sink-aware attention on the Triton kernels; semantics of
    :func:`sinkfix.ops.reference.reference_sink_attention` (which see for every argument).

    q (B, Hq, Q, D); k, v (B, Hkv, K, D), any strides, GQA by index. Returns ``(out, lse)``:
    out (B, Hq, Q, D) in q's dtype (a view of (B, Q, Hq, D) memory), lse (B, Hq, Q) fp32.
    Uses the split-KV decode kernel when Q <= DECODE_MAX_Q and K >= DECODE_MIN_K, the tiled
    prefill kernel otherwise.
    """
    kwargs = dict(
        attn_mask=attn_mask, causal=causal, causal_offset=causal_offset, sliding_window=sliding_window,
        scale=scale, softcap=softcap, sink_cols=sink_cols, beta=beta, extra_logits=extra_logits,
        virtual_logit=virtual_logit,
    )
    if q.dim() == 4 and k.dim() == 4 and q.shape[2] <= DECODE_MAX_Q and k.shape[2] >= DECODE_MIN_K:
        from .attention_decode import sink_attention_decode

        return sink_attention_decode(q, k, v, **kwargs)
    from .attention_prefill import sink_attention_prefill

    return sink_attention_prefill(q, k, v, **kwargs)


def clip_residual(
    hidden: torch.Tensor,
    threshold: torch.Tensor | float,
    sink_positions: torch.Tensor | None = None,
    sink_norm: float | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Fused per-token L2 clip; semantics of :func:`sinkfix.ops.reference.reference_residual_clip`.

    hidden (B, S, D); threshold a float or (B,) tensor (inf = no cap); sink_positions (B, S) bool,
    exempt when ``sink_norm`` is None, else clamped to it. Returns ``hidden`` itself when inplace.
    """
    from .residual_clip import residual_clip

    return residual_clip(hidden, threshold, sink_positions, sink_norm, inplace=inplace)
