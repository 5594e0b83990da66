"""Residual-stream clipping on PyTorch, and the dispatch to the fused Triton kernel.

Names follow the attention op: :func:`reference_residual_clip` (fp64, ``reference.py``),
:func:`residual_clip_torch` (this PyTorch path), ``sinkfix.kernels.residual_clip_triton`` (the
kernel), :func:`residual_clip` (the dispatch).
"""

from __future__ import annotations

import warnings

import torch

from sinkfix.kernels.arguments import check_residual_clip_arguments

__all__ = ["residual_clip", "residual_clip_torch", "relative_threshold"]


def relative_threshold(norms: torch.Tensor, exempt: torch.Tensor, factor: float) -> torch.Tensor:
    """Per-sequence cap ``factor x median`` of the norms of the tokens that are not exempt.

    norms (B, S) fp32; exempt (B, S) bool (sink and padding tokens). A sequence whose tokens are all
    exempt gets an infinite cap (nothing to compare against).
    """
    masked = norms.masked_fill(exempt, float("nan"))
    median = torch.nanmedian(masked, dim=-1).values
    return torch.where(torch.isnan(median), torch.full_like(median, float("inf")), median * factor)


def residual_clip_torch(
    hidden: torch.Tensor,
    threshold: torch.Tensor,
    is_sink: torch.Tensor | None = None,
    sink_norm: float | None = None,
) -> torch.Tensor:
    """Scale down every token whose L2 norm exceeds its cap; out of place. Same semantics as
    :func:`sinkfix.ops.reference.reference_residual_clip`: hidden (B, S, D); threshold (B,)
    per-sequence cap (inf = none); is_sink (B, S) bool, exempt when ``sink_norm`` is None, else
    clamped to ``sink_norm`` (> 0, with ``is_sink``). ``threshold`` may also be one number for every
    sequence, as on the Triton backend (it raised an AttributeError here)."""
    check_residual_clip_arguments(hidden, threshold, is_sink, sink_norm)
    norms = hidden.float().norm(dim=-1)
    cap = torch.as_tensor(threshold, dtype=torch.float32, device=hidden.device).reshape(-1)[:, None].expand_as(norms)
    if is_sink is not None:
        sink_cap = torch.full_like(cap, float("inf") if sink_norm is None else float(sink_norm))
        cap = torch.where(is_sink, sink_cap, cap)
    # the quotient of a token that is not scaled is 1 / 1 (exactly 1), not cap / norm: where(c, cap /
    # norms, 1) computed it for every token, and its backward there is 0 * d(cap / norms) = 0 * inf = NaN
    # for an exempt sink (an infinite cap) or a zero vector: every parameter below a clipped layer got NaN
    # gradients, clip firing or not (loss.backward() through a patched model, residual clip at 1e9)
    clipped = norms > cap
    one = torch.ones_like(norms)
    factor = torch.where(clipped, cap, one) / torch.where(clipped, norms, one)
    return hidden * factor[..., None].to(hidden.dtype)


def residual_clip(
    hidden: torch.Tensor,
    threshold: torch.Tensor,
    is_sink: torch.Tensor | None = None,
    sink_norm: float | None = None,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """Residual clipping on ``backend`` ("torch" or "triton"); see :func:`residual_clip_torch`.
    Differentiable inputs take the PyTorch formula in Python; otherwise one call of the custom op
    ``torch.ops.sinkfix.residual_clip`` (opaque to ``torch.compile``)."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        return residual_clip_torch(hidden, threshold, is_sink, sink_norm)
    from sinkfix.ops import custom_ops

    norm = None if sink_norm is None else float(sink_norm)
    if not torch.compiler.is_compiling():
        return custom_ops.residual_clip_impl(hidden, threshold, is_sink, norm, backend)
    if not isinstance(threshold, torch.Tensor):
        # the op's schema takes a tensor: one number, accepted eagerly, failed under torch.compile with
        # a TorchRuntimeError; checked as a number first, then one (B,) cap of that value
        check_residual_clip_arguments(hidden, threshold, is_sink, sink_norm)
        threshold = torch.full((hidden.shape[0],), float(threshold), dtype=torch.float32, device=hidden.device)
    return custom_ops.residual_clip_op(hidden, threshold, is_sink, norm, backend)


def clip_residual(*args, **kwargs) -> torch.Tensor:
    """Deprecated name of :func:`residual_clip` (sinkfix 0.1)."""
    warnings.warn("sinkfix.ops.residual.clip_residual is deprecated; use residual_clip", FutureWarning,
                  stacklevel=2)
    if "sink_positions" in kwargs:
        kwargs["is_sink"] = kwargs.pop("sink_positions")
    return residual_clip(*args, **kwargs)
