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

__all__ = ["Rotary", "check_model_rotation", "rotary_for", "rotate_keys", "POSITION_DEPENDENT_ROPE"]

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


def check_model_rotation(config, rotary: Rotary) -> None:
    """Refuse a model whose attention does not rotate keys as :func:`rotate_keys` does.

    :func:`rotate_keys` pairs channel ``i`` with ``i + R/2`` (transformers' ``rotate_half``). Some
    families pair neighbouring channels (Cohere, GLM, GLM4, Helium), rotate by complex products
    (Llama4) or skip RoPE in some layers (``no_rope_layers``: Llama4, SmolLM3); a kept key moved with
    the wrong pairing is silently wrong after the first eviction (logits 0.1-0.2 off on tiny GLM4 and
    Helium models). So the model family's own ``apply_rotary_pos_emb`` is run once on a few keys, with
    these frequencies in the layouts transformers' rotary modules produce (each pair's angle twice,
    or once), and must move them as :func:`rotate_keys` does."""
    import importlib

    kind = getattr(config, "model_type", type(config).__name__)
    skipped = [i for i, uses in enumerate(getattr(config, "no_rope_layers", None) or []) if not uses]
    if skipped:
        raise UnsupportedModelError(
            f"{kind} applies no rotary embedding in layers {skipped[:4]}{'...' if len(skipped) > 4 else ''} "
            "(no_rope_layers): a sink cache moves every kept key by a rotation, which is wrong for keys that carry "
            "no position; window=None (no eviction) serves it")
    if getattr(config, "rope_interleave", False):
        raise UnsupportedModelError(
            f"{kind} is configured with rope_interleave=True (neighbouring channels rotate together): a sink cache "
            "moves kept keys with channel i paired with i + head_dim/2; window=None (no eviction) serves it")
    try:
        module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    except ImportError:
        module = None
    apply = getattr(module, "apply_rotary_pos_emb", None)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 4, rotary.dim, generator=generator)
    delta = torch.tensor([[0, 1, 7, 1000]])
    expected = rotate_keys(keys, delta, rotary)
    angles = delta[0].float()[:, None] * rotary.inv_freq  # as the models compute them, in fp32
    matched = False
    for cos, sin in ((torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)),
                     (angles.cos(), angles.sin())):
        try:
            _, moved = apply(keys, keys, cos[None], sin[None])
        except Exception:  # another layout (or no such function): try the next, or refuse below
            continue
        if moved.shape == expected.shape and torch.allclose(moved, expected, atol=1e-4, rtol=1e-4):
            matched = True
            break
    if not matched:
        raise UnsupportedModelError(
            f"{kind}'s attention does not rotate keys by the channel pairs a sink cache moves them with (channel i "
            "with i + head_dim/2, as Llama, Mistral, Qwen, Gemma do): kept keys would be moved wrongly after an "
            "eviction; window=None (no eviction, quantization only) serves it")


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
