"""The residual-clip hook: a forward hook on each decoder layer that caps per-token residual norms.

In transformers 5 every decoder layer returns the residual stream (a plain tensor) that feeds the
next layer; a forward hook registered with ``prepend=True`` replaces it before any other hook (so
``output_hidden_states`` reports the clipped value). The sink tokens of the call come from the
layer's attention state, which the attention function fills in just before.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from sinkfix.integrations.attention import LayerState
from sinkfix.integrations.sink_location import real_query_rows
from sinkfix.ops.residual import relative_threshold, residual_clip

__all__ = ["make_clip_hook"]


def _sink_and_padding(state: LayerState, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_sink, is_padding), both (B, S) bool, for the rows of the current call."""
    if state.sink_rows is None or state.sink_rows.shape[0] != batch:
        none = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        return none, none
    positions = torch.arange(seq, device=device)
    is_sink = (state.sink_rows[:, :, None] == positions[None, None, :]).any(1)  # -1 slots match nothing
    # left padding before the first real row, right padding from the end of the real rows on
    return is_sink, ~real_query_rows(state.first_real_row, state.end_real_row, seq)


def make_clip_hook(state: LayerState):
    """The forward hook (``with_kwargs=True``) that clips the decoder layer's output. A partial of a
    module-level function rather than a closure: pickling a patched model then reaches the state's
    own refusal (a clear message) instead of "Can't pickle local object"."""
    return functools.partial(_clip_hook, state)


def _clip_hook(state: LayerState, module: nn.Module, args, kwargs, output):
    clip = state.policy.clip
    if clip is None:  # the layer runs as the identity for now (PatchHandle.run_as_identity)
        return None
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    batch, seq, _ = hidden.shape
    is_sink, is_padding = _sink_and_padding(state, batch, seq, hidden.device)
    if clip.mode == "relative":
        threshold = relative_threshold(hidden.float().norm(dim=-1), is_sink | is_padding, clip.threshold)
    else:
        threshold = torch.full((batch,), clip.threshold, dtype=torch.float32, device=hidden.device)
    # resolve_backend already checked at patch time that triton can run here
    backend = "triton" if state.backend == "triton" else "torch"
    clipped = residual_clip(hidden, threshold, is_sink, clip.sink_norm, backend=backend)
    if isinstance(output, torch.Tensor):
        return clipped
    return (clipped, *output[1:])
