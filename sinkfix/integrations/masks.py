"""The mask function registered for ``"sinkfix"``: transformers' padded causal masks as key ranges.

transformers builds one attention mask per forward and mask type (full, sliding) through the mask
function registered under the implementation's name; the attention function receives whatever that
function returned, untouched by the model code (flex attention passes its own BlockMask the same
way). With ``sdpa_mask`` that is a bool (B, 1, Q, K) tensor: a causal (or sliding-window causal)
rule AND a per-key padding mask, materialised for every query row.

:func:`padded_causal_mask` decides *from how the mask is built* — the rule is transformers' own
``causal_mask_function`` or its sliding-window variant, the padding comes from the 2-D attention
mask, the offsets are Python ints — and then returns a :class:`PaddedCausalMask`: the (B, K) key
padding, its per-sequence key ranges and the causal offset, no (Q, K) tensor. The Triton kernels
read those (no dense mask is loaded, interior key tiles need no mask at all); the PyTorch path and
the observers get the same mask back from it. Anything else (custom and/or mask functions, packed
sequences, tensor offsets of static caches under compilation, a caller that asked for a
materialised mask) gets exactly what ``sdpa_mask`` returns. No value is read back to the host:
the decision depends on Python objects only, the ranges are tensor ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sinkfix.kernels.masks import key_padding_ranges
from sinkfix.ops.reference import visibility_mask

__all__ = ["PaddedCausalMask", "padded_causal_mask"]


@dataclass(frozen=True, eq=False)
class PaddedCausalMask:
    """visible(b, i, j) = j <= i + causal_offset [and j > i + causal_offset - window] and
    key_padding[b, j]: transformers' padded causal mask of one call, in the coordinates of its
    (B, Hq, Q, D) queries and (B, Hkv, K, D) keys. ``key_padding`` None means no padding."""

    key_padding: torch.Tensor | None  # (B, K) bool, True = real key
    q_len: int
    k_len: int
    batch: int
    causal_offset: int  # query row i sits at key position i + causal_offset
    window: int | None  # sliding window (keys j > i + causal_offset - window), None = full causal
    device: torch.device

    @functools.cached_property
    def key_ranges(self) -> torch.Tensor | None:
        """int32 (B, 3) summary of ``key_padding`` for the kernels (sinkfix.kernels.masks)."""
        return None if self.key_padding is None else key_padding_ranges(self.key_padding)

    @property
    def broadcast_mask(self) -> torch.Tensor | None:
        """The padding as a (B, 1, 1, K) bool mask, to be combined with the causal rule."""
        return None if self.key_padding is None else self.key_padding[:, None, None, :]

    @functools.cached_property
    def dense(self) -> torch.Tensor:
        """The (B, 1, Q, K) bool mask ``sdpa_mask`` would have built (observers, inspection)."""
        return visibility_mask(self.batch, self.q_len, self.k_len, attn_mask=self.broadcast_mask, causal=True,
                               causal_offset=self.causal_offset, sliding_window=self.window,
                               device=self.device).expand(self.batch, 1, self.q_len, self.k_len)

    # transformers treats a mask with four dimensions as prepared and passes it on untouched (generate
    # builds the masks of a compileable cache ahead and hands them back to the model's forward)
    ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 1, self.q_len, self.k_len)

    def seen_by_any_row(self) -> torch.Tensor:
        """(B, K) bool: key j is visible to at least one query row (what sink location reads).
        The rows' windows are consecutive, so their union is (first_pos - window, last_pos]."""
        cols = torch.arange(self.k_len, device=self.device)
        seen = cols <= self.q_len - 1 + self.causal_offset
        if self.window is not None:
            seen = seen & (cols > self.causal_offset - self.window)
        seen = seen.expand(self.batch, self.k_len)
        return seen if self.key_padding is None else seen & self.key_padding


def _rule_window(mask_function, local_size) -> int | None:
    """0 for transformers' plain causal rule, the window for its sliding-window causal rule
    (``and_masks(sliding_window_overlay(w), causal_mask_function)``, read off the closures),
    None for anything else."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is causal_mask_function:
        return 0
    if local_size is None or getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    try:
        (parts,) = [c.cell_contents for c in mask_function.__closure__ if isinstance(c.cell_contents, tuple)]
        overlay, rule = parts
        if rule is not causal_mask_function or not overlay.__qualname__.startswith("sliding_window_overlay."):
            return None
        closure = dict(zip(overlay.__code__.co_freevars, (c.cell_contents for c in overlay.__closure__)))
    except (AttributeError, TypeError, ValueError):
        return None
    window = closure.get("sliding_window")
    return window if isinstance(window, int) and window == local_size and window > 0 else None


def padded_causal_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                       mask_function=None, attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                       allow_is_causal_skip: bool = True, device="cpu", **kwargs):
    """transformers' mask interface (the arguments of ``masking_utils.sdpa_mask``): a
    :class:`PaddedCausalMask` for the causal and sliding-window causal rules with integer offsets,
    ``sdpa_mask``'s own result otherwise (see the module docstring)."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if isinstance(attention_mask, PaddedCausalMask):  # prepared earlier (generate): already the answer
        return attention_mask
    mask_function = causal_mask_function if mask_function is None else mask_function
    # Not read while dynamo traces (the tensor mask is used then anyway): torch 2.11's dynamo breaks
    # the graph at reading a closure's cells (3 graph breaks in a tiny Gemma3 forward)
    compiling = torch.compiler.is_compiling()
    rule_window = None if compiling else _rule_window(mask_function, local_size)
    # Under compilation the tensor mask is what dynamo traces without surprises; the structured mask
    # is an eager-mode saving. And where sdpa_mask would return None (no padding, and one query row
    # or a square call), so does this function: the attention path then knows the layout without any
    # mask (the decode step's sink is key column 0 of every row, its cheapest path).
    structured = (rule_window is not None and allow_is_causal_skip and not kwargs.get("use_vmap", False)
                  and isinstance(q_offset, int) and isinstance(kv_offset, int) and not compiling)
    if not structured:  # the caller asked for a tensor, or the pattern is not ours to express
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=allow_is_causal_skip, device=device, **kwargs)
    # sdpa_mask reads padding_mask[b, kv_offset + j], padded with False past the 2-D mask
    padding = None if attention_mask is None else prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if _sdpa_would_skip(padding, q_length, kv_length, q_offset, kv_offset, local_size):
        return None
    key_padding = None
    if padding is not None:
        key_padding = padding[:, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
        key_padding = key_padding.expand(batch_size, kv_length)
    return PaddedCausalMask(key_padding=key_padding, q_len=q_length, k_len=kv_length, batch=batch_size,
                            causal_offset=q_offset - kv_offset, window=rule_window or None, device=torch.device(device))


def _sdpa_would_skip(padding: torch.Tensor | None, q_length: int, kv_length: int, q_offset: int, kv_offset: int,
                     local_size: int | None) -> bool:
    """transformers' own test for returning no mask at all, on the prepared padding mask (a private
    helper: without it, never skip)."""
    try:
        from transformers.masking_utils import _ignore_causal_mask_sdpa
    except ImportError:
        return False
    return bool(_ignore_causal_mask_sdpa(padding, q_length, kv_length, q_offset, kv_offset, local_size))
