"""Sink-aware attention on PyTorch, and the dispatch between the PyTorch path and the Triton kernels.

The PyTorch path uses the split formulation (docs/formulas.md) so that it never materialises the
(B, H, Q, K) score matrix unless the caller asks for the probabilities:

* the non-sink part (keys N) goes through a flash-style op that also returns the log-sum-exp;
* the sink part (a handful of key columns S) is computed explicitly: Q x |S| scores per head;
* the policy is applied in an epilogue that combines the two with one shared maximum.

Measured on SmolLM2-135M (CPU, 2 threads, 512 tokens) the separate sink term and epilogue cost a few
percent of the attention op (benchmarks/README.md).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import torch

from sinkfix.errors import BackendUnavailableError, UsageError
from sinkfix.ops.reference import reference_sink_attention, sink_key_mask, visibility_mask, zero_value_lse

__all__ = ["AttentionResult", "sink_attention", "sink_attention_torch", "flash_with_lse", "cpu_flash_available"]


class AttentionResult(NamedTuple):
    out: torch.Tensor  # (B, Hq, Q, D), input dtype
    lse: torch.Tensor | None  # (B, Hq, Q) fp32, log(l_S + l_N) over real keys
    sink_mass: torch.Tensor | None  # (B, Hq, Q) fp32, stock softmax mass on the sink set (before correction)
    probs: torch.Tensor | None  # (B, Hq, Q, K) corrected probabilities, only when asked for


# -- flash op with log-sum-exp ------------------------------------------------------------------
# torch ships a CPU flash kernel that returns (out, logsumexp). It is a private op, so it is
# wrapped here, feature-detected once per dtype, and backed by a dense fallback that is always
# correct. At (1, 9, 512, 64) causal it runs as fast as scaled_dot_product_attention (3.5 vs 3.2 ms).
_CPU_FLASH_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@functools.lru_cache(maxsize=None)
def cpu_flash_available(dtype: torch.dtype) -> bool:
    if _CPU_FLASH_OP is None:
        return False
    try:
        probe = torch.randn(1, 2, 3, 8, dtype=dtype)
        out, lse = _CPU_FLASH_OP(probe, probe[:, :1], probe[:, :1], 0.0, True)
        return out.shape == probe.shape and lse.shape == probe.shape[:3]
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def flash_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    visible: torch.Tensor | None,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning ``(out, lse)``. GQA handled natively (k/v not repeated).

    ``visible`` is a bool (B, 1, Q, K) mask or None; ``is_causal`` is upper-left aligned. Rows with
    no visible key return garbage that the caller must discard (it knows which rows those are).
    """
    if q.device.type == "cpu" and cpu_flash_available(q.dtype):
        additive = None
        if visible is not None:
            additive = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
            additive.masked_fill_(~visible, torch.finfo(q.dtype).min)
        return _CPU_FLASH_OP(q, k, v, 0.0, is_causal, attn_mask=additive, scale=scale)
    if visible is None and is_causal:
        visible = visibility_mask(q.shape[0], q.shape[2], k.shape[2], causal=True, device=q.device)
    out, _, lse = reference_sink_attention(
        q, k, v, attn_mask=visible, scale=scale, compute_dtype=torch.float32
    )
    return out.to(q.dtype), lse


# -- the PyTorch path ---------------------------------------------------------------------------
def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _is_first_column_sink(sink_cols: torch.Tensor | None) -> bool:
    """True when the sink set is exactly key column 0 in every batch row (no padding, n_sink=1)."""
    if sink_cols is None or sink_cols.shape[-1] == 0:
        return False
    return bool((sink_cols[:, 0] == 0).all()) and bool((sink_cols[:, 1:] < 0).all())


class _Layout(NamedTuple):
    """Which keys each query row sees: the arguments of :func:`visibility_mask`."""

    attn_mask: torch.Tensor | None
    causal: bool
    causal_offset: int
    sliding_window: int | None

    def is_plain(self, q_len: int, k_len: int) -> bool:
        """No mask and no window, and either full attention or causal with Q == K: the flash op's
        own ``is_causal`` (upper-left) expresses it, no mask needs to be built."""
        simple_causal = self.causal and self.causal_offset == 0 and q_len == k_len
        return self.attn_mask is None and self.sliding_window is None and (simple_causal or not self.causal)

    def visible(self, batch: int, q_len: int, k_len: int, device) -> torch.Tensor:
        return visibility_mask(batch, q_len, k_len, **self._asdict(), device=device)


def _dense_path(q, k, v, layout: _Layout, scale, softcap, sink_cols, beta, extra_logits, virtual_sink_logit,
                return_probs: bool, need_sink_mass: bool) -> AttentionResult:
    """The reference formula in fp32 (fp64 for fp64 inputs): differentiable, returns probabilities."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    common = dict(**layout._asdict(), scale=scale, softcap=softcap, sink_cols=sink_cols, extra_logits=extra_logits,
                  virtual_sink_logit=virtual_sink_logit, compute_dtype=compute)
    out, probs, lse = reference_sink_attention(q, k, v, beta=beta, **common)
    sink_mass = None
    if need_sink_mass:
        # the mass on the sink set before sink scaling (zero-value logits counted, as in the split
        # path), recomputed with beta = 1
        _, p_stock, _ = reference_sink_attention(q, k, v, **common)
        is_sink = sink_key_mask(sink_cols, q.shape[0], k.shape[2], q.device)[:, None, None, :]
        sink_mass = (p_stock * is_sink).sum(-1).float()
    return AttentionResult(out.to(q.dtype), lse.float(), sink_mass, probs if return_probs else None)


def _augmented_applies(q, k, layout: _Layout, sink_cols, softcap, return_probs: bool, need_sink_mass: bool) -> bool:
    """Whether :func:`_augmented_path` computes this call: one sink at key column 0 that every query
    row sees (a causal window without padding), no softcap, and neither probabilities nor the sink
    mass requested. Anything else takes the dense formula."""
    if return_probs or need_sink_mass or softcap is not None or not _is_first_column_sink(sink_cols):
        return False
    if layout.is_plain(q.shape[2], k.shape[2]):
        return True
    visible = layout.visible(q.shape[0], q.shape[2], k.shape[2], q.device)
    return bool(visible[..., 0].all())


def _augmented_path(q, k, v, layout: _Layout, scale: float, beta, extra_logits, virtual_sink_logit) -> AttentionResult:
    """The policy formula, differentiable, through one ``scaled_dot_product_attention`` call.

    Gradients (calibration) need the log-sum-exp of the non-sink keys, which the CPU flash op does not
    differentiate; the dense formula that does costs many passes over a (B, Hq, Q, K) tensor per layer
    (about half of a SmolLM2 calibration step). Instead every term is read off one softmax:

    * each zero-value logit a becomes an extra key column whose score is exactly a: the query gets a
      constant-1 channel and that key carries ``a / scale`` there and zeros elsewhere;
    * the value gets two indicator channels, 1 on the sink column and 1 on the non-sink columns, and
      the sink's own value is zeroed in the ordinary channels.

    One softmax over [zero-value columns, keys] then yields ``acc_N / Z``, ``l_S / Z`` and ``l_N / Z``,
    each a sum of positive terms (no cancellation when the sink takes almost all the mass), and
    ``o = beta * (l_S / Z) * v_sink + (l_N / Z + (1 - beta) * l_S / Z) * (acc_N / Z) / (l_N / Z)``.
    Matches the dense formula to rounding (fp64: ~1e-14, tests/test_ops_torch.py) and ran a SmolLM2
    layer's forward + backward 3.6x faster (1 thread, 512 tokens). The log-sum-exp is not returned.
    """
    dtype, compute = q.dtype, torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, q_heads, q_len, head_dim = q.shape
    group, k_len = q_heads // k.shape[1], k.shape[2]
    q, k, v = q.to(compute), k.repeat_interleave(group, 1).to(compute), v.repeat_interleave(group, 1).to(compute)
    visible = layout.visible(batch, q_len, k_len, q.device)  # (B, 1, Q, K)
    sees_n = visible[..., 1:].any(-1, keepdim=True)  # (B, 1, Q, 1)
    logits, masks = [], []
    if extra_logits is not None:
        logits.append(extra_logits.to(device=q.device, dtype=compute))
        masks.append(torch.ones_like(sees_n).expand(-1, -1, -1, extra_logits.shape[1]))
    if virtual_sink_logit is not None:
        logits.append(virtual_sink_logit.to(device=q.device, dtype=compute).reshape(q_heads, 1))
        masks.append(sees_n)
    zero_value = torch.cat(logits, 1) if logits else q.new_zeros(q_heads, 0)  # (Hq, E)
    n_zero = zero_value.shape[1]
    q_aug = torch.cat([q, q.new_ones(batch, q_heads, q_len, 1)], -1)
    k_zero = torch.cat([q.new_zeros(q_heads, n_zero, head_dim), (zero_value / scale)[..., None]], -1)
    k_aug = torch.cat([k_zero.expand(batch, -1, -1, -1), torch.cat([k, k.new_zeros(batch, q_heads, k_len, 1)], -1)], 2)
    is_sink = torch.zeros(k_len, 1, dtype=compute, device=q.device)
    is_sink[0] = 1
    indicators = torch.cat([is_sink, 1 - is_sink], -1).expand(batch, q_heads, k_len, 2)
    v_real = torch.cat([v * (1 - is_sink), indicators], -1)
    v_aug = torch.cat([q.new_zeros(batch, q_heads, n_zero, head_dim + 2), v_real], 2)
    mask = torch.cat(masks + [visible], -1)
    out = torch.nn.functional.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=mask, scale=scale)
    acc_n, l_s, l_n = out[..., :head_dim], out[..., head_dim], out[..., head_dim + 1]
    has_n = sees_n[..., 0]
    b = torch.ones_like(l_s) if beta is None else beta.to(device=q.device, dtype=compute)[None, :, None]
    b = torch.where(has_n, b, torch.ones_like(l_s))  # the sink's own row stays stock
    coef_n = torch.where(has_n, (l_n + (1 - b) * l_s) / torch.where(has_n, l_n, torch.ones_like(l_n)), 0)
    o = (b * l_s)[..., None] * v[:, :, :1] + coef_n[..., None] * acc_n
    return AttentionResult(o.to(dtype), None, None, None)


def _identity_path(q, k, v, layout: _Layout, scale: float) -> AttentionResult:
    """Plain softmax: one flash call, nothing else."""
    batch, _, q_len, _ = q.shape
    k_len = k.shape[2]
    plain = layout.is_plain(q_len, k_len)
    visible = None if plain else layout.visible(batch, q_len, k_len, q.device)
    out, lse = flash_with_lse(q, k, v, visible=visible, is_causal=plain and layout.causal, scale=scale)
    if not plain:
        out = out.masked_fill(~visible.any(-1)[..., None], 0)
    return AttentionResult(out, lse, None, None)


def _non_sink_part(q, k, v, layout: _Layout, scale: float, sink_cols: torch.Tensor | None):
    """Flash attention over the keys outside the sink set. Returns (out_n, lse_n (-inf where a row
    sees no non-sink key), sink_cols (B, NS'), sink_visible (B, 1, Q, NS'))."""
    batch, q_heads, q_len, _ = q.shape
    k_len = k.shape[2]
    if layout.is_plain(q_len, k_len) and _is_first_column_sink(sink_cols):
        # Fast path (no padding, sink = column 0): drop column 0 from k/v; causal rows 1.. then keep
        # upper-left alignment, so no mask is materialised. Row 0 sees only the sink.
        out_n = q.new_zeros(q.shape)
        lse_n = q.new_full((batch, q_heads, q_len), float("-inf"), dtype=torch.float32)
        first_row = 1 if layout.causal else 0
        if k_len > 1 and q_len > first_row:
            o, l = _CPU_FLASH_OP(q[:, :, first_row:], k[:, :, 1:], v[:, :, 1:], 0.0, layout.causal, scale=scale)
            out_n[:, :, first_row:] = o
            lse_n[:, :, first_row:] = l
        sink_visible = torch.ones(batch, 1, q_len, 1, dtype=torch.bool, device=q.device)
        return out_n, lse_n, sink_cols[:, :1], sink_visible
    visible = layout.visible(batch, q_len, k_len, q.device)
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)[:, None, None, :]
    visible_n = visible & ~is_sink
    out_n, lse_n = flash_with_lse(q, k, v, visible=visible_n, is_causal=False, scale=scale)
    lse_n = lse_n.float().masked_fill(~visible_n.any(-1), float("-inf"))
    if sink_cols is None:
        sink_cols = torch.full((batch, 1), -1, dtype=torch.long, device=q.device)
    cols = sink_cols.clamp(0, k_len - 1).long()
    valid = (sink_cols >= 0) & (sink_cols < k_len)
    sink_visible = visible.gather(-1, cols[:, None, None, :].expand(batch, 1, q_len, cols.shape[1]))
    return out_n, lse_n, sink_cols, sink_visible & valid[:, None, None, :]


def _sink_part(q, k, v, scale: float, sink_cols: torch.Tensor, sink_visible: torch.Tensor):
    """|S| explicit fp32 scores per row (B, Hq, Q, NS), -inf where not visible, and the sink
    values (B, Hq, NS, D). Repeating |S| key/value rows per query head is tiny, unlike k/v."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    cols = sink_cols.clamp(0, max(k_len - 1, 0)).long()
    gather_idx = cols[:, None, :, None].expand(batch, kv_heads, cols.shape[1], head_dim)
    k_s = k.gather(2, gather_idx).repeat_interleave(group, dim=1).to(torch.float32)
    v_s = v.gather(2, gather_idx).repeat_interleave(group, dim=1).to(torch.float32)
    s_s = torch.matmul(q.to(torch.float32), k_s.transpose(-1, -2)).mul_(scale)
    return s_s.masked_fill_(~sink_visible, float("-inf")), v_s


def _combine(out_n, lse_n, s_s, v_s, beta, extra_logits, virtual_sink_logit, need_sink_mass: bool,
             dtype: torch.dtype) -> AttentionResult:
    """The policy epilogue (docs/formulas.md) with one shared max over both parts and the zero-value
    logits. Rows that see only sink keys keep beta = 1; rows without non-sink keys have l_N = 0, so
    whatever the flash op left in out_n there is multiplied by 0."""
    lse_n = lse_n.to(torch.float32)
    has_n = torch.isfinite(lse_n)
    m = torch.maximum(lse_n, s_s.amax(-1))
    lse_v = zero_value_lse(extra_logits, virtual_sink_logit, has_n)
    if lse_v is not None:
        m = torch.maximum(m, lse_v)
    m = torch.nan_to_num(m, neginf=0.0)  # rows that see nothing
    l_n = torch.exp(lse_n - m)
    e_s = torch.exp(s_s - m[..., None])
    l_s = e_s.sum(-1)
    z = l_n + l_s
    lse = torch.log(z) + m
    if lse_v is not None:
        z = z + torch.exp(lse_v - m)
    z = torch.where(z > 0, z, torch.ones_like(z))
    if beta is None:
        coef_n = l_n / z
        coef_s = e_s / z[..., None]
    else:
        b = torch.where(has_n, beta.to(torch.float32)[None, :, None], 1.0)
        coef_n = torch.addcmul(l_n, 1 - b, l_s) / z
        coef_s = e_s * (b / z)[..., None]
    out = torch.matmul(coef_s, v_s).addcmul_(coef_n[..., None], out_n.to(torch.float32))
    return AttentionResult(out.to(dtype), lse, (l_s / z) if need_sink_mass else None, None)


def sink_attention_torch(
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
    virtual_sink_logit: torch.Tensor | None = None,
    return_probs: bool = False,
    need_sink_mass: bool = False,
) -> AttentionResult:
    """Sink-aware attention, PyTorch path. Same semantics and arguments as
    :func:`sinkfix.ops.reference.reference_sink_attention` (read its docstring for the formula).

    The split formulation: the non-sink keys through a flash op with log-sum-exp, the sink columns
    explicitly, the policy as an epilogue. Falls back to the dense formula (which materialises the
    scores) when the probabilities are requested, with ``softcap`` (the flash op cannot apply
    it), when gradients are needed (the CPU flash op has no gradient for its log-sum-exp) and on
    devices without a flash-with-LSE op. With gradients, the common case (one sink at column 0 that
    every row sees) goes through :func:`_augmented_path` instead, which returns no log-sum-exp.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    layout = _Layout(attn_mask, causal, causal_offset, sliding_window)
    flash_ok = q.device.type == "cpu" and cpu_flash_available(q.dtype)
    if _needs_autograd(q, k, v, beta, extra_logits, virtual_sink_logit) and _augmented_applies(
            q, k, layout, sink_cols, softcap, return_probs, need_sink_mass):
        return _augmented_path(q, k, v, layout, scale, beta, extra_logits, virtual_sink_logit)
    if return_probs or softcap is not None or not flash_ok or _needs_autograd(q, k, v, beta, extra_logits,
                                                                              virtual_sink_logit):
        return _dense_path(q, k, v, layout, scale, softcap, sink_cols, beta, extra_logits, virtual_sink_logit,
                           return_probs, need_sink_mass)
    identity = (beta is None or bool((beta == 1).all())) and extra_logits is None and virtual_sink_logit is None
    if identity and not need_sink_mass:
        return _identity_path(q, k, v, layout, scale)
    out_n, lse_n, sink_cols, sink_visible = _non_sink_part(q, k, v, layout, scale, sink_cols)
    s_s, v_s = _sink_part(q, k, v, scale, sink_cols, sink_visible)
    return _combine(out_n, lse_n, s_s, v_s, beta, extra_logits, virtual_sink_logit, need_sink_mass, q.dtype)


# -- dispatch -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a requested backend to the one that will run on ``device``."""
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {BACKENDS}, got {backend!r}")
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return "torch"
    from sinkfix import kernels

    usable = kernels.triton_available() and (device.type == "cuda" or interpreter)
    if backend == "triton":
        if not usable:
            raise BackendUnavailableError(
                "backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 for the CPU "
                "interpreter); use backend='torch' or 'auto' on this machine"
            )
        return "triton"
    return "triton" if usable and device.type == "cuda" else "torch"


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto", **kwargs) -> AttentionResult:
    """Dispatch to the Triton kernels or the PyTorch path. Probabilities always come from PyTorch."""
    chosen = resolve_backend(backend, q.device)
    if chosen == "triton" and kwargs.get("return_probs"):
        _warn_once("output_attentions: attention probabilities are computed on the PyTorch path (slower, "
                   "materialises the scores); the Triton kernels never build them")
    policy_tensors = (kwargs.get("beta"), kwargs.get("extra_logits"), kwargs.get("virtual_sink_logit"))
    if chosen == "triton" and not kwargs.get("return_probs") and not _needs_autograd(q, k, v, *policy_tensors):
        from sinkfix import kernels

        need_sink_mass = kwargs.pop("need_sink_mass", False)
        kwargs.pop("return_probs", None)
        if need_sink_mass:  # statistics are gathered on the PyTorch path
            return sink_attention_torch(q, k, v, need_sink_mass=True, **kwargs)
        out, lse = kernels.sink_attention_triton(q, k, v, **kwargs)
        return AttentionResult(out, lse, None, None)
    return sink_attention_torch(q, k, v, **kwargs)
