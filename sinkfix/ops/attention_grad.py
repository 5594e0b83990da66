"""Sink-aware attention with gradients, without keeping (B, H, Q, K) tensors alive between forward
and backward.

Calibration fits beta and the virtual sink logits by back-propagating through every attention
layer of a frozen model. The dense formula under autograd keeps about nine (B, H, Q, K) fp32
tensors per layer for the backward pass (measured on SmolLM2-135M at 512 tokens: 3442 MiB peak
against 1012 MiB here), which at 4k tokens on a 32-layer, 32-head model is ~560 GiB, against ~35 GB
for all the model's other activations in fp32 (docs/inference.md). Here the forward pass runs the
fused split path (no score matrix) and saves only its inputs; the backward pass recomputes the dense
formula one block of query rows at a time and back-propagates through that block alone. Query rows
are independent in attention, so the blocks give exactly the dense gradients; peak memory is one
block's scores (``_BLOCK_ELEMENTS``) instead of every layer's.

Where the fused op has a backward kernel (the CPU flash op, :mod:`sinkfix.ops.flash`),
``sinkfix.ops.attention.sink_attention`` does not come here: autograd runs through the split path
itself, which is ~3x cheaper per layer (SmolLM2-135M, 512 tokens: one calibration step 2.4 s
against 3.4 s on 2 threads). This module serves the rest: CUDA, softcap, and no fused op.
"""

from __future__ import annotations

import torch

from sinkfix.ops.reference import reference_sink_attention

__all__ = ["sink_attention_with_grad"]

# Score-block budget of the backward pass: (B, Hq, rows, K) fp32 blocks of ~16M elements (64 MB),
# a few of which autograd keeps while one block is differentiated.
_BLOCK_ELEMENTS = 16 * 1024 * 1024


def _rows_per_block(batch: int, heads: int, k_len: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, batch * heads * k_len))


class _SinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, extra_logits, virtual_sink_logit, attn_mask, sink_cols, causal, causal_offset,
                sliding_window, scale, softcap):
        from sinkfix.ops.attention import sink_attention_torch

        with torch.no_grad():
            result = sink_attention_torch(
                q, k, v, attn_mask=attn_mask, causal=causal, causal_offset=causal_offset,
                sliding_window=sliding_window, scale=scale, softcap=softcap, sink_cols=sink_cols, beta=beta,
                extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit)
        ctx.save_for_backward(q, k, v, beta, extra_logits, virtual_sink_logit, attn_mask, sink_cols)
        ctx.structure = (causal, causal_offset, sliding_window, scale, softcap)
        return result.out, result.lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, beta, extra, virtual, attn_mask, sink_cols = ctx.saved_tensors
        causal, causal_offset, sliding_window, scale, softcap = ctx.structure
        wants = ctx.needs_input_grad[:6]
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(
            (q, k, v, beta, extra, virtual), wants)]
        q_leaf, k_leaf, v_leaf, beta_leaf, extra_leaf, virtual_leaf = leaves
        grad_q = torch.zeros_like(q) if wants[0] else None
        batch, heads, q_len, _ = q.shape
        rows = _rows_per_block(batch, heads, k.shape[2])
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        # a mask whose query axis is broadcast (size 1: the (B, 1, 1, K) key padding that
        # sink_attention folds in) serves every block whole; slicing it left it empty from the
        # second block on ("size of tensor a (103) must match the size of tensor b (0)")
        per_row_mask = attn_mask is not None and attn_mask.shape[2] != 1
        for r0 in range(0, q_len, rows):
            r1 = min(q_len, r0 + rows)
            with torch.enable_grad():
                q_rows = q_leaf[:, :, r0:r1]
                out, _, lse = reference_sink_attention(
                    q_rows, k_leaf, v_leaf, attn_mask=attn_mask[:, :, r0:r1] if per_row_mask else attn_mask,
                    causal=causal, causal_offset=causal_offset + r0, sliding_window=sliding_window, scale=scale,
                    softcap=softcap, sink_cols=sink_cols, beta=beta_leaf, extra_logits=extra_leaf,
                    virtual_sink_logit=virtual_leaf, compute_dtype=compute)
                outputs, grads = [], []
                if out.requires_grad:
                    outputs.append(out)
                    grads.append(grad_out[:, :, r0:r1].to(compute))
                if grad_lse is not None and lse.requires_grad:  # lse depends on q, k only
                    finite = torch.isfinite(lse)
                    outputs.append(torch.where(finite, lse, 0.0))
                    grads.append(torch.where(finite, grad_lse[:, :, r0:r1].to(compute), 0.0))
                inputs = [t for t in leaves if t is not None and t.requires_grad]
                if not outputs:
                    continue
                block_grads = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
            for leaf, g in zip(inputs, block_grads):
                if g is None:
                    continue
                if leaf is q_leaf:
                    grad_q += g  # only rows r0..r1 are nonzero
                else:
                    leaf.grad = g if leaf.grad is None else leaf.grad + g
        result = [grad_q] + [None if t is None or not t.requires_grad else t.grad for t in leaves[1:]]
        return (*result, None, None, None, None, None, None, None)


def sink_attention_with_grad(q, k, v, *, attn_mask=None, causal=False, causal_offset=0, sliding_window=None,
                             scale=None, softcap=None, sink_cols=None, beta=None, extra_logits=None,
                             virtual_sink_logit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sink-aware attention (arguments of ``reference_sink_attention``), with the
    memory profile described in the module docstring. Returns (out (B, Hq, Q, D), lse (B, Hq, Q))."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _SinkAttention.apply(q, k, v, beta, extra_logits, virtual_sink_logit, attn_mask, sink_cols, causal,
                                int(causal_offset), sliding_window, scale, softcap)
