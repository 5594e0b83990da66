"""The inference paths of sinkfix as ``torch.library`` custom ops: ``torch.ops.sinkfix.sink_attention``
and ``torch.ops.sinkfix.residual_clip``.

To ``torch.compile`` each is one opaque call whose output shapes its fake implementation states,
so a patched model compiles into one graph (no graph break, no recompilation per call) whatever
the op does inside. Inside, the PyTorch backend runs the split formulation
(:func:`sinkfix.ops.attention.sink_attention_torch`) and the Triton backend launches the kernels
(``sinkfix.kernels``); neither reads tensor values on the host, so eager mode does not synchronise
with the GPU either.

The ops are for inference: they have no autograd formula. Callers that need gradients
(calibration), attention probabilities or per-row statistics use the Python path, which is
differentiable.

``torch.ops.sinkfix.sink_attention_stats`` is the same op with one more output: the (B, Hq, 2)
sink statistics of serving-time telemetry (:attr:`sinkfix.ops.attention.AttentionResult.sink_stats`:
per batch row and query head, the summed sink mass before sink scaling over the rows that see a
non-sink key, and that row count). On the Triton backend the kernels' statistics variants fill it
from their own epilogues (each prefill program adds its query tile's sums into its (b, h) pair,
the decode reduction each row's); on the PyTorch backend the split path computes it from its
log-sum-exps.
"""

from __future__ import annotations

import torch

__all__ = ["sink_attention_op", "sink_attention_impl", "sink_attention_stats_op", "sink_attention_stats_impl",
           "residual_clip_op", "residual_clip_impl", "prepare_first_column_sink"]

# The first-column sink set as the kernels read it, an int32 (1, 1) zero per device, made once by
# patch() (prepare_first_column_sink) instead of one torch.zeros per attention call: on a GPU that is
# an allocation and a fill launch in every layer of a host-bound decode step. Only patch() adds to it,
# eagerly, before any forward: a tensor first made inside a call could come from a CUDA-graph pool
# (a compiled model's warm-up runs there) and be overwritten by a later replay. Calls on a device
# without an entry (a model moved after patching) make their own zeros, as before.
_FIRST_COLUMN_SINK: dict[torch.device, torch.Tensor] = {}


def prepare_first_column_sink(device: torch.device) -> None:
    """Make the first-column sink tensor of ``device`` (patch() calls it for the Triton backend)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _FIRST_COLUMN_SINK:
        _FIRST_COLUMN_SINK[device] = torch.zeros(1, 1, dtype=torch.int32, device=device)


def _first_column_sink(batch: int, device: torch.device) -> torch.Tensor:
    cols = _FIRST_COLUMN_SINK.get(device)
    return cols if cols is not None else torch.zeros(batch, 1, dtype=torch.int32, device=device)


def _triton_attention(q, k, v, attn_mask, key_padding, key_ranges, sink_cols, beta, extra_logits, virtual_sink_logit,
                      causal, causal_offset, sliding_window, scale, softcap, first_column_sink,
                      sink_stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' (out (B, Q, Hq, D) contiguous, lse); ``sink_stats`` as in ``sink_attention_triton``."""
    from sinkfix import kernels

    if first_column_sink:
        sink_cols = _first_column_sink(q.shape[0], q.device)
    out, lse = kernels.sink_attention_triton(
        q, k, v, attn_mask=attn_mask, key_padding=key_padding, key_ranges=key_ranges, causal=causal,
        causal_offset=causal_offset, sliding_window=sliding_window, scale=scale, softcap=softcap, sink_cols=sink_cols,
        beta=beta, extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit, sink_stats=sink_stats)
    # the kernel writes (B, Q, Hq, D) memory and returns its (B, Hq, Q, D) view
    return out.transpose(1, 2).contiguous(), lse


def _torch_attention(q, k, v, attn_mask, key_padding, key_ranges, sink_cols, beta, extra_logits, virtual_sink_logit,
                     causal, causal_offset, sliding_window, scale, softcap, first_column_sink,
                     need_sink_stats: bool = False):
    """The PyTorch path's AttentionResult, key padding read as a (B, 1, 1, K) mask (checked as the
    kernels check it: ``key_ranges`` without ``key_padding`` was ignored here)."""
    from sinkfix.ops.attention import fold_checked_key_padding, sink_attention_torch

    return sink_attention_torch(
        q, k, v, attn_mask=fold_checked_key_padding(q, k, v, attn_mask, key_padding, key_ranges), causal=causal,
        causal_offset=causal_offset, sliding_window=sliding_window, scale=scale, softcap=softcap, sink_cols=sink_cols,
        first_column_sink=first_column_sink, beta=beta, extra_logits=extra_logits,
        virtual_sink_logit=virtual_sink_logit, need_sink_stats=need_sink_stats)


def sink_attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    key_padding: torch.Tensor | None,
    key_ranges: torch.Tensor | None,
    sink_cols: torch.Tensor | None,
    beta: torch.Tensor | None,
    extra_logits: torch.Tensor | None,
    virtual_sink_logit: torch.Tensor | None,
    causal: bool,
    causal_offset: int,
    sliding_window: int | None,
    scale: float,
    softcap: float | None,
    first_column_sink: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, Q, Hq, D) contiguous in q's dtype — the layout transformers wants back —
    and lse (B, Hq, Q) fp32). Arguments as :func:`sinkfix.ops.attention.sink_attention_torch`."""
    if backend == "triton":
        return _triton_attention(q, k, v, attn_mask, key_padding, key_ranges, sink_cols, beta, extra_logits,
                                 virtual_sink_logit, causal, causal_offset, sliding_window, scale, softcap,
                                 first_column_sink)
    result = _torch_attention(q, k, v, attn_mask, key_padding, key_ranges, sink_cols, beta, extra_logits,
                              virtual_sink_logit, causal, causal_offset, sliding_window, scale, softcap,
                              first_column_sink)
    return result.out.transpose(1, 2).contiguous(), result.lse.contiguous()


sink_attention_op = torch.library.custom_op("sinkfix::sink_attention", sink_attention_impl, mutates_args=())


@sink_attention_op.register_fake
def _sink_attention_fake(q, k, v, attn_mask, key_padding, key_ranges, sink_cols, beta, extra_logits,
                         virtual_sink_logit, causal, causal_offset, sliding_window, scale, softcap, first_column_sink,
                         backend):
    batch, heads, q_len, head_dim = q.shape
    return q.new_empty(batch, q_len, heads, head_dim), q.new_empty(batch, heads, q_len, dtype=torch.float32)


def sink_attention_stats_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    key_padding: torch.Tensor | None,
    key_ranges: torch.Tensor | None,
    sink_cols: torch.Tensor | None,
    beta: torch.Tensor | None,
    extra_logits: torch.Tensor | None,
    virtual_sink_logit: torch.Tensor | None,
    causal: bool,
    causal_offset: int,
    sliding_window: int | None,
    scale: float,
    softcap: float | None,
    first_column_sink: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sink_attention_impl` plus the sink statistics (B, Hq, 2) fp32: on the Triton backend
    from the kernels' statistics variants (a zero-filled tensor they add into), else from the
    PyTorch path."""
    if backend == "triton":
        stats = torch.zeros(q.shape[0], q.shape[1], 2, dtype=torch.float32, device=q.device)
        out, lse = _triton_attention(q, k, v, attn_mask, key_padding, key_ranges, sink_cols, beta, extra_logits,
                                     virtual_sink_logit, causal, causal_offset, sliding_window, scale, softcap,
                                     first_column_sink, sink_stats=stats)
        return out, lse, stats
    result = _torch_attention(q, k, v, attn_mask, key_padding, key_ranges, sink_cols, beta, extra_logits,
                              virtual_sink_logit, causal, causal_offset, sliding_window, scale, softcap,
                              first_column_sink, need_sink_stats=True)
    return result.out.transpose(1, 2).contiguous(), result.lse.contiguous(), result.sink_stats.contiguous()


sink_attention_stats_op = torch.library.custom_op("sinkfix::sink_attention_stats", sink_attention_stats_impl,
                                                  mutates_args=())


@sink_attention_stats_op.register_fake
def _sink_attention_stats_fake(q, k, v, attn_mask, key_padding, key_ranges, sink_cols, beta, extra_logits,
                               virtual_sink_logit, causal, causal_offset, sliding_window, scale, softcap,
                               first_column_sink, backend):
    out, lse = _sink_attention_fake(q, k, v, attn_mask, key_padding, key_ranges, sink_cols, beta, extra_logits,
                                    virtual_sink_logit, causal, causal_offset, sliding_window, scale, softcap,
                                    first_column_sink, backend)
    return out, lse, q.new_empty(q.shape[0], q.shape[1], 2, dtype=torch.float32)


def residual_clip_impl(
    hidden: torch.Tensor,
    threshold: torch.Tensor,
    is_sink: torch.Tensor | None,
    sink_norm: float | None,
    backend: str,
) -> torch.Tensor:
    """Residual clipping, out of place (arguments of :func:`sinkfix.ops.residual.residual_clip_torch`)."""
    if backend == "triton":
        from sinkfix import kernels

        return kernels.residual_clip_triton(hidden, threshold, is_sink, sink_norm, inplace=False)
    from sinkfix.ops.residual import residual_clip_torch

    return residual_clip_torch(hidden, threshold, is_sink, sink_norm).contiguous()


residual_clip_op = torch.library.custom_op("sinkfix::residual_clip", residual_clip_impl, mutates_args=())


@residual_clip_op.register_fake
def _residual_clip_fake(hidden, threshold, is_sink, sink_norm, backend):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)
