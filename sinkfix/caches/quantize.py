"""Quantization of cached keys and values, as transformers' own quantized caches do it.

transformers 5 ships KIVI-style quantized cache layers for two integer backends, optimum-quanto and
HQQ (``QuantoQuantizedLayer``, ``HQQQuantizedLayer``); both run on the CPU with torch 2.13. Their
quantize / dequantize steps are what :class:`KVQuantizer` calls, so a sink cache quantizes exactly as
the shipped ``QuantizedCache`` does: the only difference is which tokens are left out of it.

Layout (docs/caches.md): groups of ``group_size`` consecutive channels of one token and one kv head,
each with its own scale and offset (quanto ``axis=0``, HQQ ``axis=1``: the same grouping). With quanto,
per-token groups mean a token's quantization never depends on another token, so keeping a sink in
full precision changes nothing for its neighbours; HQQ's optimizer stops on the whole tensor's mean
error, so there it can move them (docs/caches.md: from 1e-6 to 0.39 at 4 bits on random data,
depending on the group size and the data, against a quantization error of about 0.22); and requantizing a dequantized token changes it by at
most a float rounding (quanto, measured: 5e-7 on values of 144), so requantizing everything at every
flush, as transformers does, is harmless.

The third backend, ``fp8`` (``bits=8``), is transformers' ``Fp8QuantizedLayer`` arithmetic: float8
e4m3 with **one scale per tensor** (keys and values each), calibrated on the first block the cache
stores and frozen afterwards; later tokens are cast with it (values beyond the range saturate at
+-448 times the scale, as torch's cast does). A per-tensor scale is where a sink hurts most: the
sink's outlier key or value sets the scale, and every other token is cast with a resolution made
for it. A sink cache therefore calibrates the scale on the tokens it quantizes and reads back,
leaving out its sinks (kept in full precision anyway) and left padding
(:class:`sinkfix.caches.body.Fp8Body`).
"""

from __future__ import annotations

from typing import Any

import torch

from sinkfix.errors import BackendUnavailableError, CacheError

__all__ = ["KVQuantizer", "BACKENDS", "SUPPORTED_BITS", "BITS_BY_BACKEND", "backend_axis", "fp8_scale",
           "fp8_quantize", "fp8_quantize_counting", "fp8_dequantize"]

BACKENDS = ("quanto", "hqq", "fp8")
BITS_BY_BACKEND = {"quanto": (2, 4), "hqq": (2, 4), "fp8": (8,)}
SUPPORTED_BITS = (2, 4, 8)
_PACKAGES = {"quanto": "optimum-quanto", "hqq": "hqq"}
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def fp8_scale(x: torch.Tensor, calibrate: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per-tensor fp8 scale ``amax / 448`` of ``x`` (B, H, L, D), over the tokens where ``calibrate``
    (B, L) is True (all when None); None when no token is to be calibrated on. The floor keeps an
    all-zero tensor from giving a zero scale (as transformers). Non-finite elements are left out: one
    NaN or inf key would otherwise make the frozen scale NaN or inf and every element the layer ever
    stores, in every row, NaN or zero (transformers' fp8 layer does: SmolLM2-shaped layer, one NaN in
    the first block, 1344 of 1344 keys NaN afterwards); left out, a NaN stays the one element it is."""
    magnitude = torch.where(torch.isfinite(x), x.abs(), 0).amax(dim=(1, 3))  # (B, L)
    if calibrate is not None:
        if not bool(calibrate.any()):
            return None
        magnitude = torch.where(calibrate, magnitude, 0)
    return (magnitude.amax().float() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` in float8 e4m3, saturating at +-448: a token larger than the ones the frozen
    scale was set from must not become NaN, which is what torch 2.11's cast makes of out-of-range
    values (2.13's cast saturates by itself, so there the clamp changes no bit)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_quantize_counting(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_quantize`, and how many elements of ``x`` lay beyond the range and were saturated
    (a 0-dim int64 tensor on ``x``'s device: counting does not synchronize)."""
    scaled = x.float() / scale
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), (scaled.abs() > FP8_MAX).sum()


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def backend_axis(backend: str) -> int:
    """The ``axis`` argument that gives per-token channel groups with this backend."""
    return 0 if backend == "quanto" else 1


def check_quantization(bits: int, backend: str, group_size: int, head_dim: int | None = None) -> None:
    """Raise :class:`CacheError` for a bit width, backend or group size the cache cannot use."""
    # 4.0 == 4 passed the membership test and was kept as a float (window=12.0 was refused)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise CacheError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))} (or None for full precision), "
                         f"got {bits!r}")
    if backend not in BACKENDS:
        raise CacheError(f"unknown quantization backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if bits not in BITS_BY_BACKEND[backend]:
        hint = "backend='fp8' for bits=8" if bits == 8 else "backend='quanto' or 'hqq' for 2 or 4 bits"
        raise CacheError(f"the {backend} backend takes bits={' or '.join(map(str, BITS_BY_BACKEND[backend]))}, "
                         f"got {bits}: use {hint}")
    if backend == "fp8":
        return  # per-tensor: no channel groups
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise CacheError(f"q_group_size must be a positive integer, got {group_size!r}")
    if head_dim is not None and head_dim % group_size:
        raise CacheError(f"q_group_size {group_size} does not divide the head dimension {head_dim}: groups hold "
                         "channels of one token and head")


#: The key under which a quantized HQQ tensor padded to a whole byte row keeps its real token count.
PADDED_TOKENS = "sinkfix_tokens"


class KVQuantizer:
    """Quantize / dequantize (B, H, L, D) tensors with one of transformers' integer backends; for
    ``fp8`` it only carries the settings (:class:`~sinkfix.caches.body.Fp8Body` does the casts)."""

    def __init__(self, backend: str = "quanto", bits: int = 4, group_size: int = 64) -> None:
        check_quantization(bits, backend, group_size)
        self.backend, self.bits, self.group_size = backend, bits, group_size
        self.axis = backend_axis(backend)
        self._engine = None if backend == "fp8" else _engine(backend, bits, group_size, self.axis)

    def quantize(self, x: torch.Tensor) -> Any:
        engine = self._engine
        if not engine.is_initialized or engine.keys.dtype != x.dtype or engine.keys.device != x.device:
            # HQQ reads the device and compute dtype off the layer's (empty) full-precision states
            engine.lazy_initialization(x[..., :0, :], x[..., :0, :])
        tokens = x.shape[-2]
        per_byte = 8 // self.bits
        if self.backend == "hqq" and tokens % per_byte:
            # HQQ packs 8 // bits rows of its (groups, group_size) view into one byte row and fails on
            # a row count that is not a multiple (9 tokens of a 1-head, 16-dim model at 2 bits: a
            # shape error from its bitpack; transformers' QuantizedCache fails the same way). Zero
            # tokens pad the count: the groups are per token, so no real token's scale moves, and
            # they are cut off again when dequantized.
            x = torch.nn.functional.pad(x, (0, 0, 0, per_byte - tokens % per_byte))
            data, meta = engine._quantize(x.contiguous(), axis=self.axis)
            return data, {**meta, PADDED_TOKENS: tokens}
        return engine._quantize(x.contiguous(), axis=self.axis)

    def dequantize(self, q: Any) -> torch.Tensor:
        if isinstance(q, tuple) and PADDED_TOKENS in q[1]:
            meta = {key: value for key, value in q[1].items() if key != PADDED_TOKENS}
            return self._engine._dequantize((q[0], meta))[..., :q[1][PADDED_TOKENS], :]
        return self._engine._dequantize(q)

    def __repr__(self) -> str:
        if self.backend == "fp8":
            return "KVQuantizer('fp8', bits=8, per-tensor scale)"
        return f"KVQuantizer({self.backend!r}, bits={self.bits}, group_size={self.group_size})"


def _engine(backend: str, bits: int, group_size: int, axis: int):
    from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

    cls = QuantoQuantizedLayer if backend == "quanto" else HQQQuantizedLayer
    try:
        return cls(nbits=bits, axis_key=axis, axis_value=axis, q_group_size=group_size)
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the {backend} quantization backend needs the {_PACKAGES[backend]} package "
            f"(pip install {_PACKAGES[backend]}, or pip install 'sinkfix[kvquant]'): {exc}") from None
