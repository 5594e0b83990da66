"""Triton kernels of sinkfix (import name ``sinkfix.kernels``): sink-aware attention (prefill and
split-KV decode) and fused residual clipping. Plain tensors in, plain tensors out; nothing here
knows about transformers (a test imports these modules with transformers made unimportable).

Importing this package never imports triton: the kernel modules are loaded on first use, so the
package works (with :func:`triton_available` returning False) where triton is missing. Triton
decides between compiling and interpreting when a kernel module is imported, so set
``TRITON_INTERPRET=1`` before the first call if the CPU interpreter is wanted.

Modules: ``masks`` (key padding ranges and bit-packed masks, torch only), ``attention_common``
(constants, jit helpers and launch preparation shared by the two attention kernels),
``attention_prefill``, ``attention_decode``, ``column_mass`` (content-dependent sinks' column
statistics), ``residual_clip``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path

if __name__ == "kernels":
    # This folder was found as a top-level "kernels" because the repository root is on sys.path (a
    # Python started there, `python -m pytest`). That name belongs to another package, which
    # transformers >= 5.25 imports: where it is installed, hand the import over to it (the import
    # system returns what sys.modules holds once this file has run). Where it is not, this folder
    # stays what it was (transformers 5.24 probes the name and copes with what it finds).
    _root = Path(__file__).resolve().parent.parent
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [entry for entry in sys.path if Path(entry or ".").resolve() != _root])
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)

import torch

__all__ = ["triton_available", "triton_unusable_reason", "sink_attention_triton", "residual_clip_triton", "DECODE_MAX_Q", "DECODE_MIN_K"]

# Heuristic for the split-KV decode kernel (see sink_attention_triton): up to 16 query tokens, a
# (GROUP * Q)-row tile still fits one program per kv head, and from 256 keys on the key axis can be
# cut into at least one 256-key split per program, which is what lets batch 1 fill the GPU. Below
# that, or for more query tokens, the prefill kernel's query tiles already give enough programs.
DECODE_MAX_Q = 16
DECODE_MIN_K = 256


#: The oldest triton the kernels run with. They use ``triton.knobs`` and
#: ``triton.tools.tensor_descriptor``, which triton 3.3 lacks (an AttributeError here, then an
#: ImportError in attention_common); 3.6 is the oldest run on a GPU (H200), 3.9 the one tested on the CPU.
TRITON_MIN_VERSION = (3, 6)


#: The oldest triton whose CPU interpreter runs the kernels with numpy 2.4 or later. triton 3.6's
#: interpreter turns a one-element array into a Python int with ``int()``, which numpy 2.4 refuses for
#: an array of one dimension ("only 0-dimensional arrays can be converted to Python scalars"): every
#: kernel whose loop bounds are computed (``tl.range(lo, hi)``) failed with it (torch 2.11, triton
#: 3.6.0, numpy 2.4.6); 3.7.0 squeezes the array first. Compiled kernels are not concerned.
TRITON_MIN_INTERPRETER_VERSION = (3, 7)


def _major_minor(version: object) -> tuple[int, int] | None:
    import re

    found = re.match(r"(\d+)\.(\d+)", str(version or ""))
    return None if found is None else (int(found.group(1)), int(found.group(2)))


def _triton_too_old(triton) -> str | None:
    """What to install, when the importable triton is older than the kernels need; None otherwise."""
    version = str(getattr(triton, "__version__", ""))
    found = _major_minor(version)
    if found is not None and found >= TRITON_MIN_VERSION:
        return None
    if found is None and hasattr(triton, "knobs"):  # a build without a readable version: judge by the API
        return None
    need = ".".join(map(str, TRITON_MIN_VERSION))
    return (f"triton {version or '(unknown version)'} is installed, but the sinkfix Triton kernels need "
            f"triton>={need}: pip install 'triton>={need}' (or 'sinkfix[triton]'); until then the Triton "
            "backend counts as unavailable")


def _interpreter_unusable(triton) -> str | None:
    """Why the CPU interpreter of this triton cannot run the kernels with the installed numpy
    (:data:`TRITON_MIN_INTERPRETER_VERSION`); None when it can, or when a version is unreadable."""
    import numpy

    found, numpy_found = _major_minor(getattr(triton, "__version__", "")), _major_minor(numpy.__version__)
    if found is None or numpy_found is None or numpy_found < (2, 4) or found >= TRITON_MIN_INTERPRETER_VERSION:
        return None
    need = ".".join(map(str, TRITON_MIN_INTERPRETER_VERSION))
    return (f"the CPU interpreter of triton {triton.__version__} cannot run the sinkfix Triton kernels with numpy "
            f"{numpy.__version__} (it converts one-element arrays with int(), which numpy 2.4 refuses): pip install "
            f"'triton>={need}' (or 'numpy<2.4'); until then the Triton backend counts as unavailable under "
            "TRITON_INTERPRET=1")


def _importable_triton():
    """The triton module, or None where it is missing or its import fails (a broken install counts as
    missing)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return None
        import triton
    except Exception:
        return None
    return triton


def triton_unusable_reason(interpreted: bool | None = None) -> str | None:
    """What keeps the installed triton from running the kernels here (too old, or an interpreter that
    cannot run them with this numpy), as an instruction; None when nothing does, or when triton is
    missing (:func:`triton_available` says so). ``interpreted``: whether the kernels run under the
    interpreter (default: triton's own setting)."""
    triton = _importable_triton()
    if triton is None:
        return None
    too_old = _triton_too_old(triton)
    if too_old is not None:
        return too_old
    if interpreted is None:
        interpreted = triton.knobs.runtime.interpret
    return _interpreter_unusable(triton) if interpreted else None


def triton_available() -> bool:
    """True when triton (at least :data:`TRITON_MIN_VERSION`) is importable and either a CUDA device is
    present or the interpreter is on (and can run the kernels: :data:`TRITON_MIN_INTERPRETER_VERSION`).
    A triton that cannot counts as missing, with a warning saying what to install."""
    triton = _importable_triton()
    if triton is None:
        return False
    reason = triton_unusable_reason()
    if reason is not None:
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
        return False
    if triton.knobs.runtime.interpret:
        return True
    return torch.cuda.is_available()


def sink_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    key_ranges: torch.Tensor | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sink_cols: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    extra_logits: torch.Tensor | None = None,
    virtual_sink_logit: torch.Tensor | None = None,
    sink_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sink-aware attention on the Triton kernels; semantics of
    :func:`sinkfix.ops.reference.reference_sink_attention` (which see for every argument).

    q (B, Hq, Q, D); k, v (B, Hkv, K, D), any strides, GQA by index. ``key_padding`` (B|1, K) bool
    and its ``key_ranges`` (:func:`sinkfix.kernels.masks.key_padding_ranges`) express a padded
    causal mask without a (Q, K) tensor (see ``sink_attention_prefill``). Returns ``(out, lse)``:
    out (B, Hq, Q, D) in q's dtype (a view of (B, Q, Hq, D) memory), lse (B, Hq, Q) fp32.
    Uses the split-KV decode kernel when Q <= DECODE_MAX_Q and K >= DECODE_MIN_K, the tiled
    prefill kernel otherwise.

    ``sink_stats``: optional fp32 (B, Hq, 2) contiguous tensor, usually zero-filled, into which the
    kernels *add* the statistics of serving-time telemetry (``AttentionResult.sink_stats``,
    docs/monitoring.md): at [b, h, 0] the stock sink mass (before sink scaling, zero-value logits
    counted) summed over the query rows that see at least one non-sink key, at [b, h, 1] the number
    of those rows. They come from the partial sums the kernels keep anyway, through a separate
    compile-time variant (HAS_STATS), so calls without it run the kernels exactly as before. Sums
    arrive by fp32 atomic adds, so their order (and last bits) may vary between runs.
    """
    kwargs = dict(
        attn_mask=attn_mask, key_padding=key_padding, key_ranges=key_ranges, causal=causal,
        causal_offset=causal_offset, sliding_window=sliding_window,
        scale=scale, softcap=softcap, sink_cols=sink_cols, beta=beta, extra_logits=extra_logits,
        virtual_sink_logit=virtual_sink_logit, sink_stats=sink_stats,
    )
    if q.dim() == 4 and k.dim() == 4 and q.shape[2] <= DECODE_MAX_Q and k.shape[2] >= DECODE_MIN_K:
        from .attention_decode import sink_attention_decode

        return sink_attention_decode(q, k, v, **kwargs)
    from .attention_prefill import sink_attention_prefill

    return sink_attention_prefill(q, k, v, **kwargs)


_DEPRECATED = {"sink_attention": "sink_attention_triton", "clip_residual": "residual_clip_triton"}


def __getattr__(name: str):
    if name == "residual_clip_triton":  # imported on first use: importing triton is slow
        from .residual_clip import residual_clip_triton

        return residual_clip_triton
    # names of sinkfix 0.1: two functions were called sink_attention (this one returned a tuple,
    # sinkfix.ops.sink_attention an AttentionResult) and three were called some *clip*
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"sinkfix.kernels.{name} is deprecated; use sinkfix.kernels.{new}", FutureWarning,
                      stacklevel=2)
        return __getattr__(new) if new not in globals() else globals()[new]
    raise AttributeError(f"module 'sinkfix.kernels' has no attribute {name!r}")
