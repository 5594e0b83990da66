"""Storage of a sink cache layer's recent tokens (its "body"): full precision or quantized.

The body is a run of consecutive tokens, the same run for every batch row, oldest first; the layer
appends new tokens at the end and evicts the oldest from the front. The sinks live elsewhere (the
layer's sink store, always full precision). Both kinds of body share one interface:
``append``, ``drop_front``, ``materialize`` (full-precision (B, H, L, D) keys and values), and the
batch-row operations beam search needs.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import torch

from sinkfix.caches.quantize import KVQuantizer, fp8_dequantize, fp8_quantize, fp8_quantize_counting, fp8_scale
from sinkfix.errors import CacheError

__all__ = ["FullBody", "QuantizedBody", "Fp8Body", "QUANTIZED_BODIES", "make_body"]


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` in memory of its own when it is a view of a larger tensor (an eviction's slice keeps
    the whole concatenation it was cut from alive)."""
    if t is None or t.untyped_storage().nbytes() == t.nelement() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


class FullBody:
    """Full-precision body: one (B, H, L, D) tensor each for keys and values."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[-2]

    def fresh(self) -> "FullBody":
        return FullBody()

    def append(self, k: torch.Tensor, v: torch.Tensor, calibrate: torch.Tensor | None = None) -> None:
        self.k, self.v = _cat(self.k, k), _cat(self.v, v)

    def drop_front(self, n: int) -> None:
        if n > 0 and self.k is not None:
            self.k, self.v = self.k[:, :, n:], self.v[:, :, n:]

    def compact(self) -> None:
        """Copy what is kept out of the tensors it was cut from (SinkLayer says when)."""
        self.k, self.v = _own(self.k), _own(self.v)

    def materialize(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.k, self.v

    def select_rows(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index.to(self.k.device)), self.v.index_select(0, index.to(self.v.device))

    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nelement() * self.k.element_size() * 2


class QuantizedBody:
    """KIVI-style body, flushed exactly as transformers' ``QuantizedLayer`` flushes.

    The first append is quantized at once. Later tokens wait in a full-precision residual; when the
    residual plus the new tokens reach ``residual_length``, everything (dequantized old part, residual,
    new tokens) is quantized again as one tensor and the residual empties. With quanto's per-token
    groups that requantization leaves the old tokens unchanged up to a float rounding; HQQ's optimizer
    can move them (:mod:`sinkfix.caches.quantize`); and one quantized
    tensor means one dequantization per step (quanto's costs ~2-9 ms per call on this CPU whatever
    the length, measured, so a list of blocks would cost that per block).

    Evicted tokens at the front of the quantized part are skipped (``offset``) until the next flush
    requantizes only what is kept, or released as soon as every quantized token is evicted. Beam
    reordering of the quantized part is applied after dequantizing (``rows``), so no reorder ever
    round-trips through quantization.
    """

    def __init__(self, quantizer: KVQuantizer, residual_length: int) -> None:
        self.quantizer = quantizer
        self.residual_length = residual_length
        self.qk: Any = None
        self.qv: Any = None
        self.q_len = 0  # tokens in the quantized tensors, evicted ones included
        self.offset = 0  # evicted tokens at the front of the quantized tensors
        self.rows: torch.Tensor | None = None  # batch rows to read the quantized tensors in (beam search)
        self.rk: torch.Tensor | None = None  # full-precision residual
        self.rv: torch.Tensor | None = None
        self._started = False

    def __len__(self) -> int:
        return self.q_len - self.offset + (0 if self.rk is None else self.rk.shape[-2])

    @property
    def quantized_len(self) -> int:
        """Tokens at the front of the body that are held quantized."""
        return self.q_len - self.offset

    def _dequantized(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.qk is None or self.quantized_len == 0:
            return None, None
        k, v = self.quantizer.dequantize(self.qk), self.quantizer.dequantize(self.qv)
        if self.rows is not None:
            k, v = k.index_select(0, self.rows.to(k.device)), v.index_select(0, self.rows.to(v.device))
        return k[:, :, self.offset:], v[:, :, self.offset:]

    def materialize(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        k, v = self._dequantized()
        if self.rk is None:
            return k, v
        return _cat(k, self.rk), _cat(v, self.rv)

    def _quantize_all(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.qk, self.qv = self.quantizer.quantize(k), self.quantizer.quantize(v)
        self.q_len, self.offset, self.rows = k.shape[-2], 0, None
        self.rk = self.rv = None

    def fresh(self) -> "QuantizedBody":
        return QuantizedBody(self.quantizer, self.residual_length)

    def append(self, k: torch.Tensor, v: torch.Tensor, calibrate: torch.Tensor | None = None) -> None:
        # ``calibrate`` is for per-tensor scales (Fp8Body); per-token groups need no calibration
        if not self._started:
            self._started = True
            self._quantize_all(k, v)
            return
        residual = 0 if self.rk is None else self.rk.shape[-2]
        if residual + k.shape[-2] >= self.residual_length:
            old_k, old_v = self.materialize()
            self._quantize_all(_cat(old_k, k), _cat(old_v, v))
        else:
            self.rk, self.rv = _cat(self.rk, k), _cat(self.rv, v)

    def drop_front(self, n: int) -> None:
        from_quantized = min(n, self.quantized_len)
        self.offset += from_quantized
        if self.qk is not None and self.quantized_len == 0:
            # all of it evicted: release it now rather than at the next flush, which a window no
            # longer than residual_length (a hybrid model's sliding layer) never reaches
            self.qk = self.qv = self.rows = None
            self.q_len = self.offset = 0
        rest = n - from_quantized
        if rest > 0 and self.rk is not None:
            self.rk, self.rv = self.rk[:, :, rest:], self.rv[:, :, rest:]

    def compact(self) -> None:
        """The residual's kept tokens copied out (the quantized block is rebuilt at each flush)."""
        self.rk, self.rv = _own(self.rk), _own(self.rv)

    def select_rows(self, index: torch.Tensor) -> None:
        if self.qk is not None:
            self.rows = index.clone() if self.rows is None else self.rows.index_select(0, index.to(self.rows.device))
        if self.rk is not None:
            self.rk, self.rv = self.rk.index_select(0, index.to(self.rk.device)), self.rv.index_select(0, index.to(self.rv.device))

    def nbytes(self) -> int:
        """Bytes held: the quantized tensors (packed data, scales, offsets) plus the residual."""
        total = sum(_tensor_bytes(q) for q in (self.qk, self.qv))
        if self.rk is not None:
            total += self.rk.nelement() * self.rk.element_size() * 2
        return total

    def __deepcopy__(self, memo: dict) -> "QuantizedBody":
        # quanto's quantized tensors (WeightQBitsTensor, a wrapper subclass) implement no clone(), so
        # torch's default deepcopy of them raised a RuntimeError and copy.deepcopy of a quanto cache
        # died at its first quantized block (a prompt cache copied to reuse its prefix); they are
        # copied through their inner tensors instead (HQQ's (data, meta) pair deepcopies as it is)
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            copied.__dict__[name] = _copy_quantized(value, memo) if name in ("qk", "qv") else copy.deepcopy(value, memo)
        return copied


def _copy_quantized(q: Any, memo: dict) -> Any:
    """A deep copy of a backend's quantized tensor: a tensor subclass (quanto) rebuilt from copies of
    its inner tensors (``__tensor_flatten__`` / ``__tensor_unflatten__``, recursively: 4-bit data is a
    ``PackedTensor`` of its own), or through pickling (``torch.save`` / ``torch.load``, which quanto's
    tensors support) when it cannot be rebuilt so; anything else (HQQ's pair, plain tensors) by
    ``copy.deepcopy``. The copy dequantizes to the same values bit for bit (tested)."""
    if id(q) in memo:
        return memo[id(q)]
    flatten = getattr(q, "__tensor_flatten__", None)
    if not isinstance(q, torch.Tensor) or flatten is None:
        return copy.deepcopy(q, memo)
    try:
        names, context = flatten()
        inner = {name: _copy_quantized(getattr(q, name), memo) for name in names}
        copied = type(q).__tensor_unflatten__(inner, context, q.size(), q.stride())
    except Exception:  # noqa: BLE001 - another backend's subclass: the pickle route below
        buffer = io.BytesIO()
        try:
            torch.save(q, buffer)
            buffer.seek(0)
            copied = torch.load(buffer, weights_only=False)  # bytes this process just wrote
        except Exception as exc:  # noqa: BLE001
            raise CacheError(f"cannot copy this cache's quantized {type(q).__name__} ({exc}): copy.deepcopy of a "
                             "quantized SinkCache needs the backend's tensors to be copyable; feed the prompt again "
                             "into a new cache instead") from None
    memo[id(q)] = copied
    return copied


def _tensor_bytes(q: Any) -> int:
    """Bytes of a backend's quantized tensor: every plain tensor it holds (quanto subclass inner
    tensors, or HQQ's (data, meta) pair)."""
    if q is None:
        return 0
    if isinstance(q, tuple):
        data, meta = q
        return _tensor_bytes(data) + sum(_tensor_bytes(t) for t in meta.values() if isinstance(t, torch.Tensor))
    flatten = getattr(q, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(q, name)) for name in names)
    return q.nelement() * q.element_size()


class Fp8Body:
    """fp8 body with one frozen scale per tensor, as transformers' ``Fp8QuantizedLayer``.

    The scale (keys and values each) is calibrated on the first tokens appended whose ``calibrate``
    flag is set (the layer clears it for its sinks and for left padding, so the sink's outlier states
    do not set every other token's resolution) and frozen; every later token is cast with it and
    appended, no residual window, no requantization. Tokens appended before any token could be
    calibrated on (a first block made only of sinks or padding) wait in full precision and are cast
    with the scale once it exists. With every flag set (no sinks, no padding) the casts are exactly
    transformers'. Eviction slices the fp8 tensors; beam reordering indexes them directly (a
    per-tensor scale does not depend on the batch row).
    """

    def __init__(self, quantizer: KVQuantizer) -> None:
        self.quantizer = quantizer
        self.qk: torch.Tensor | None = None  # float8 (B, H, L, D)
        self.qv: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.pk: torch.Tensor | None = None  # full-precision tokens waiting for a scale
        self.pv: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        # key and value elements appended after the scale froze that lay beyond its range (cast to
        # +-448 x scale); kept on the device, read by SinkCache.fp8_saturated()
        self.saturated: torch.Tensor | None = None

    def fresh(self) -> "Fp8Body":
        return Fp8Body(self.quantizer)

    def __len__(self) -> int:
        return sum(0 if t is None else t.shape[-2] for t in (self.qk, self.pk))

    @property
    def quantized_len(self) -> int:
        """Tokens at the front of the body that are held quantized (all of them once calibrated)."""
        return 0 if self.qk is None else self.qk.shape[-2]

    def append(self, k: torch.Tensor, v: torch.Tensor, calibrate: torch.Tensor | None = None) -> None:
        """``calibrate`` (B, L) bool: which of the new tokens may set the scale (None = all)."""
        if self.dtype is None:
            self.dtype = k.dtype
        if self.k_scale is not None:
            qk, k_out = fp8_quantize_counting(k, self.k_scale)
            qv, v_out = fp8_quantize_counting(v, self.v_scale)
            self.qk, self.qv = _cat(self.qk, qk), _cat(self.qv, qv)
            self.saturated = k_out + v_out if self.saturated is None else self.saturated + k_out + v_out
            return
        waiting = 0 if self.pk is None else self.pk.shape[-2]
        k_all, v_all = _cat(self.pk, k), _cat(self.pv, v)
        if calibrate is not None and waiting:  # waiting tokens were never calibration tokens
            calibrate = torch.cat([calibrate.new_zeros(calibrate.shape[0], waiting), calibrate], dim=1)
        k_scale = fp8_scale(k_all, calibrate)
        if k_scale is None:
            self.pk, self.pv = k_all, v_all
            return
        self.k_scale, self.v_scale = k_scale, fp8_scale(v_all, calibrate)
        self.qk, self.qv = fp8_quantize(k_all, self.k_scale), fp8_quantize(v_all, self.v_scale)
        self.pk = self.pv = None

    def read_back(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``k``, ``v`` as the body would return them once stored: cast with the frozen scales and back."""
        return (fp8_dequantize(fp8_quantize(k, self.k_scale), self.k_scale, k.dtype),
                fp8_dequantize(fp8_quantize(v, self.v_scale), self.v_scale, v.dtype))

    def drop_front(self, n: int) -> None:
        if n <= 0:
            return
        if self.qk is not None:
            self.qk, self.qv = self.qk[:, :, n:], self.qv[:, :, n:]
        elif self.pk is not None:
            self.pk, self.pv = self.pk[:, :, n:], self.pv[:, :, n:]

    def compact(self) -> None:
        self.qk, self.qv, self.pk, self.pv = (_own(t) for t in (self.qk, self.qv, self.pk, self.pv))

    def materialize(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.qk is None:
            return self.pk, self.pv
        return fp8_dequantize(self.qk, self.k_scale, self.dtype), fp8_dequantize(self.qv, self.v_scale, self.dtype)

    def select_rows(self, index: torch.Tensor) -> None:
        for name in ("qk", "qv", "pk", "pv"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))

    def nbytes(self) -> int:
        """Bytes held: fp8 keys and values, their two scales, any waiting full-precision tokens."""
        total = sum(t.nelement() * t.element_size() for t in (self.qk, self.qv, self.pk, self.pv) if t is not None)
        return total + sum(4 for scale in (self.k_scale, self.v_scale) if scale is not None)


#: Bodies that hold tokens in reduced precision: the layer restores its sinks (and protected hidden
#: sinks) from full-precision copies when it reads them.
QUANTIZED_BODIES = (QuantizedBody, Fp8Body)


def make_body(quantizer: KVQuantizer | None, residual_length: int):
    """A new body for a layer: full precision, group-wise integer (quanto, HQQ) or fp8."""
    if quantizer is None:
        return FullBody()
    if quantizer.backend == "fp8":
        return Fp8Body(quantizer)
    return QuantizedBody(quantizer, residual_length)
