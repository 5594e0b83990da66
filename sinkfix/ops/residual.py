"""Residual-stream clipping on PyTorch, and the dispatch to the fused Triton kernel."""

from __future__ import annotations

import torch

__all__ = ["clip_residual", "relative_threshold"]


def relative_threshold(norms: torch.Tensor, exempt: torch.Tensor, factor: float) -> torch.Tensor:
    """Per-sequence cap ``factor x median`` of the norms of the tokens that are not exempt.

    norms (B, S) fp32; exempt (B, S) bool (sink and padding tokens). A sequence whose tokens are all
    exempt gets an infinite cap (nothing to compare against).
    """
    masked = norms.masked_fill(exempt, float("nan"))
    median = torch.nanmedian(masked, dim=-1).values
    return torch.where(torch.isnan(median), torch.full_like(median, float("inf")), median * factor)


def clip_residual(
    hidden: torch.Tensor,
    threshold: torch.Tensor,
    sink_positions: torch.Tensor | None = None,
    sink_norm: float | None = None,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """Scale down every token whose L2 norm exceeds its cap; out of place.

    hidden (B, S, D); threshold (B,) per-sequence cap (inf = none); sink_positions (B, S) bool, exempt
    when ``sink_norm`` is None, else clamped to ``sink_norm``. Same semantics as
    :func:`sinkfix.ops.reference.reference_residual_clip`.
    """
    if backend == "triton":
        from sinkfix import kernels

        return kernels.clip_residual(hidden, threshold, sink_positions, sink_norm, inplace=False)
    norms = hidden.float().norm(dim=-1)
    cap = threshold.float().to(hidden.device)[:, None].expand_as(norms)
    if sink_positions is not None:
        sink_cap = torch.full_like(cap, float("inf") if sink_norm is None else float(sink_norm))
        cap = torch.where(sink_positions, sink_cap, cap)
    factor = torch.where(norms > cap, cap / norms, torch.ones_like(norms))
    return hidden * factor[..., None].to(hidden.dtype)
