"""What a sink cache needs from a model's rotary position embedding: its frequencies, and a rotation.

transformers caches keys *after* RoPE: a key cached at position p is ``R(p) k``. RoPE is a rotation
of each channel pair by ``p * inv_freq``, so ``R(p + d) k = R(d) R(p) k``: a cached key moves to
another position by one more rotation, without its pre-RoPE value. The cache only ever rotates by a
*difference* of positions computed from scratch in fp64 (never by accumulating rotations), so a key
carries at most one rounding of the rotation however long the stream runs (docs/caches.md).

Only position-independent frequency tables qualify: ``dynamic`` (NTK) and ``longrope`` change the
frequencies with the sequence length, so a cached key cannot be moved by a rotation; those models,
and models without rotary embeddings (GPT-2's learned absolute positions), are refused for
streaming (a cache with ``window=None`` never moves a key, and serves models without RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sinkfix.errors import UnsupportedModelError

__all__ = ["Rotary", "rotary_for", "rotate_keys", "POSITION_DEPENDENT_ROPE"]

POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class Rotary:
    """One layer type's RoPE: the model's own inverse frequencies (fp32, as the model computes them)."""

    inv_freq: torch.Tensor  # (R / 2,) rotates the first R channels of each head (R <= head_dim)

    @property
    def dim(self) -> int:
        return 2 * self.inv_freq.numel()


def _rope_parameters(config, layer_type: str | None) -> tuple[dict, str | None]:
    """(this layer type's RoPE parameters, the layer type to pass to transformers' init functions)."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        kind = getattr(config, "model_type", type(config).__name__)
        raise UnsupportedModelError(
            f"{kind} has no rotary position embeddings (absolute or learned positions): a sink cache moves "
            "cached keys to new positions by rotating them, which needs RoPE (Llama, Mistral, Qwen, Gemma, ...); "
            "window=None (no eviction, quantization only) needs none")
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return params[layer_type], layer_type
    return params, None


def rotary_for(config, layer_type: str | None = None) -> Rotary:
    """The RoPE frequencies of ``layer_type``'s attention layers (Gemma3 has one table per layer type)."""
    params, per_type = _rope_parameters(config, layer_type)
    rope_type = params.get("rope_type", "default")
    if rope_type in POSITION_DEPENDENT_ROPE:
        raise UnsupportedModelError(
            f"RoPE type {rope_type!r} changes its frequencies with the sequence length, so cached keys cannot be "
            "moved to new positions by a rotation; sink caches support position-independent RoPE "
            "(default, linear, llama3, yarn, ...)")
    if rope_type == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        # the same fp32 expression as the models' compute_default_rope_parameters, so that a rotation by
        # d here equals the model's own rotation by d
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise UnsupportedModelError(f"unknown RoPE type {rope_type!r}")
        kwargs = {"layer_type": per_type} if per_type is not None else {}
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **kwargs)
    return Rotary(inv_freq.float().cpu())


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """``keys`` (B, H, L, D) cached after RoPE, moved by ``delta`` (B, L) positions each: R(delta) k.

    The angles are computed in fp64 from the integer difference and the rotation is applied in fp32;
    the result has the keys' dtype. Channels beyond the rotary dimension are left as they are.
    """
    r = rotary.dim
    angles = delta.to(torch.float64)[..., None] * rotary.inv_freq.to(device=keys.device, dtype=torch.float64)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).float()[:, None]  # (B, 1, L, R)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).float()[:, None]
    part = keys[..., :r].float()
    half = r // 2
    rotated_half = torch.cat([-part[..., half:], part[..., :half]], dim=-1)  # transformers' rotate_half
    moved = (part * cos + rotated_half * sin).to(keys.dtype)
    return moved if r == keys.shape[-1] else torch.cat([moved, keys[..., r:]], dim=-1)
