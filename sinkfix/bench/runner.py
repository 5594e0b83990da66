"""The measurements behind ``sinkfix bench``. Importable without rich or matplotlib.

One process, one model, several *variants* (the stock model and patched ones), each measured on:

* **quality**: token-weighted perplexity per domain over strided windows (the protocol of
  :mod:`sinkfix.evaluate`, BOS stated explicitly), and the change against stock in %;
* **extreme-token metrics** (sink share, residual peak ratio, value drain) from
  :mod:`sinkfix.analysis.metrics` when that module is importable, otherwise skipped with a note;
* **speed**: prefill and KV-cached ``generate`` decode, timed in alternating order (ABBA rounds) so
  that machine noise hits every variant alike; spreads, never a single sample;
* **memory**: the peak above the pre-call baseline of one prefill (CUDA max-allocated on GPU, the
  kernel's resident high-water mark on Linux CPUs).

:func:`run_bench` returns a plain dict (JSON-ready) whose layout is documented in ``schema.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Literal, Sequence, TypeVar

import torch

from sinkfix.errors import SinkfixError
from sinkfix.evaluate import Window, bos_token_id, make_windows, model_device, tokenize, windows_nll
from sinkfix.models import DEFAULT_MODEL, load_model
from sinkfix.policy import Policy

__all__ = [
    "SCHEMA_VERSION", "BenchConfig", "Variant", "Spread", "MemoryPeak", "ProgressFactory", "run_bench",
    "windows_nll", "alternate", "measure_peak_memory", "release_memory", "pin_mmap_threshold", "default_variants",
    "time_prefill",
    "prefill_kwargs",
]

SCHEMA_VERSION = "sinkfix.bench/1"

# The default set when no --policy/--profile is given: the patch itself (its overhead and exactness),
# the setting that helped on SmolLM2 with a BOS (beta = 0.9: -1 to -2% perplexity), and dropping the
# sink (beta = 0: +2 to +3%), which shows what removing the sink costs.
DEFAULT_POLICIES = ("sink_scale=0.9", "drop")

T = TypeVar("T")
# progress(description, total) -> context manager yielding advance(n)
ProgressFactory = Callable[[str, int], ContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def _no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n=1: None


# -- configuration ------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """Everything a run depends on; recorded verbatim in the JSON ``config`` section."""

    model: str = DEFAULT_MODEL
    policies: tuple[str, ...] = ()  # --policy SPEC (repeatable); empty and no profile = DEFAULT_POLICIES
    profile: str | None = None  # --profile FILE
    texts: tuple[str, ...] = ()  # --text FILE ...; empty and no dataset = built-in prose + code
    dataset: str | None = None  # --dataset NAME[:CONFIG][@SPLIT]
    seq_len: int = 512
    stride: int | None = None  # None = non-overlapping windows
    batch: int = 1
    max_windows: int = 4  # per domain; 0 = every window of the text
    bos: bool | None = None  # None = what the tokenizer does by itself
    decode_tokens: int = 16  # 0 = skip the decode measurement
    repeats: int = 5  # timed prefill rounds per variant (after warmup)
    decode_repeats: int = 3
    warmup: int = 1
    memory_rounds: int = 2
    metrics_windows: int = 1  # per domain
    hidden_sink_threshold: float | None = 0.1  # ACT's criterion; None skips the hidden-sink pass
    baseline: Literal["sdpa", "eager"] = "sdpa"
    backend: Literal["auto", "torch", "triton"] = "auto"
    device: str = "auto"
    threads: int | None = None

    def validate(self) -> None:
        checks = [
            (self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}"),
            (self.stride is None or self.stride >= 1, f"--stride must be >= 1, got {self.stride}"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (self.max_windows >= 0, f"--max-windows must be >= 0, got {self.max_windows}"),
            (self.decode_tokens == 0 or self.decode_tokens >= 2,
             f"--decode-tokens must be 0 (skip) or >= 2 (a rate needs two steps), got {self.decode_tokens}"),
            (self.repeats >= 1 and self.decode_repeats >= 1, "--repeats must be >= 1"),
            (self.warmup >= 0 and self.memory_rounds >= 0 and self.metrics_windows >= 0, "counts must be >= 0"),
            (self.baseline in ("sdpa", "eager"), f"--baseline must be sdpa or eager, got {self.baseline!r}"),
            (self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}"),
            (not (self.profile and self.policies), "give --profile or --policy, not both"),
            (not (self.texts and self.dataset), "give --text or --dataset, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise SinkfixError(message)


@dataclass
class Variant:
    """One configuration measured: the stock model or the model patched with a policy or profile."""

    name: str
    kind: Literal["stock", "policy", "profile"]
    policy: Policy | None = None
    profile: Any = None
    source: str | None = None  # the spec or file it came from

    def describe(self) -> str:
        if self.kind == "stock":
            return "unpatched model"
        if self.kind == "profile":
            try:
                detail = self.profile.policy().describe()
            except Exception:  # noqa: BLE001 - a description must never fail a run
                detail = "calibrated"
            return f"profile {Path(self.source or 'profile').name}: {detail}"
        return self.policy.describe() if self.policy is not None else "identity"

    @contextlib.contextmanager
    def applied(self, model, backend: str) -> Iterator[Any]:
        if self.kind == "stock":
            yield None
            return
        from sinkfix.patch import patch

        handle = patch(model, self.profile if self.kind == "profile" else self.policy, backend)
        try:
            yield handle
        finally:
            handle.remove()


def default_variants(policies: Sequence[str], profile: Any = None, profile_path: str | None = None) -> list[Variant]:
    """stock, identity, then the given policies / profile (or :data:`DEFAULT_POLICIES`)."""
    variants = [Variant("stock", "stock"), Variant("identity", "policy", Policy(), source="identity")]
    if profile is not None:
        variants.append(Variant(f"profile:{Path(profile_path or 'profile').name}", "profile", profile=profile,
                                source=str(profile_path)))
        return variants
    for spec in policies or DEFAULT_POLICIES:
        policy = Policy.parse(spec)
        name = policy.describe()
        if name == "sink_scale=0":
            name = "drop (sink_scale=0)"
        if any(v.name == name for v in variants):
            continue  # "identity" given explicitly, or a duplicate spec
        variants.append(Variant(name, "policy", policy, source=spec))
    return variants


# -- statistics ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spread:
    """Repeated samples of one quantity; the summary always shows their spread."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a Spread needs at least one sample")

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    def percentile(self, q: float) -> float:
        """Linear interpolation between closest ranks (numpy's default)."""
        ordered = sorted(self.samples)
        pos = (len(ordered) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        return {
            "min": self.min * scale, "median": self.median * scale, "max": self.max * scale,
            "mean": self.mean * scale, "p50": self.percentile(50) * scale, "p90": self.percentile(90) * scale,
            "n": len(self.samples), "samples": [s * scale for s in self.samples],
        }


def alternate(
    names: Sequence[str],
    measure: Callable[[str], T],
    *,
    repeats: int,
    warmup: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, list[T]]:
    """Call ``measure(name)`` for every name, ``warmup + repeats`` rounds, in ABBA order.

    Reversing the order every other round cancels a linear drift (thermal, another process
    starting) to first order, and every variant sees the same share of the noise. Warm-up rounds
    are measured and discarded.
    """
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        order = list(names) if round_ % 2 == 0 else list(reversed(names))
        for name in order:
            value = measure(name)
            if round_ >= warmup:
                results[name].append(value)
            if on_step is not None:
                on_step(1)
    return results


# -- memory -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPeak:
    peak_bytes: int  # peak above the baseline while the call ran
    baseline_bytes: int  # resident (CPU) or allocated (CUDA) bytes just before the call
    method: str  # "cuda_max_allocated" | "linux_vmhwm" | "rss_sampling" | "ru_maxrss_delta"


_LIBC: Any = None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Without the trim, memory freed by an earlier configuration stays resident and the next
    configuration's peak *above baseline* reads low: the allocator reuses those pages and the
    kernel sees no new growth.
    """
    global _LIBC
    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Serve every heap block of at least ``threshold`` bytes with its own mmap, from now on.

    glibc raises its mmap threshold on the fly (up to 32 MiB on 64-bit) once large blocks are
    freed; from then on activations come from the heap, and what a later call's resident peak shows
    depends on fragmentation left by earlier calls. Measured on SmolLM2-135M, 2048-token prefill, one
    fresh process each: stock read 168 and 238 MiB above baseline in two identical runs; with the
    threshold pinned, 153.7 and 153.5 MiB (sink_scale=0.9: 318/324 vs 155.2/154.2 MiB). Setting it
    costs speed (a page fault per fresh block), so the bench pins it only for its last phase, memory.
    Same effect as ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment. Returns False off glibc.
    """
    release_memory()  # also loads libc
    if not _LIBC or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_high_water_mark() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM) of this process; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil  # optional

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil absent or unusable: fall back further
        return None


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> MemoryPeak:
    """Peak memory above the starting point while ``fn()`` runs.

    CUDA: ``max_memory_allocated`` after a reset. Linux CPU: the kernel's own resident high-water
    mark, reset just before the call (exact, no sampling gaps). Elsewhere: RSS sampled every 1 ms
    from a thread (torch ops release the GIL), or, as a last resort, the ``ru_maxrss`` delta, which
    is monotonic per process and therefore only honest in a fresh process.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return MemoryPeak(torch.cuda.max_memory_allocated(device) - base, base, "cuda_max_allocated")
    release_memory()
    if _reset_high_water_mark():
        base_kb = _proc_status_kb("VmRSS") or 0
        fn()
        peak_kb = _proc_status_kb("VmHWM") or base_kb
        return MemoryPeak(max(peak_kb - base_kb, 0) * 1024, base_kb * 1024, "linux_vmhwm")
    base = _current_rss()
    if base is not None:
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                rss = _current_rss()
                if rss is not None and rss > peak[0]:
                    peak[0] = rss
                stop.wait(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            fn()
        finally:
            stop.set()
            sampler.join()
        return MemoryPeak(max(peak[0] - base, 0), base, "rss_sampling")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return MemoryPeak(after - before, before, "ru_maxrss_delta")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- text sources -------------------------------------------------------------------------------
@dataclass
class Domain:
    name: str
    source: str
    ids: torch.Tensor
    windows: list[Window] = field(default_factory=list)


def load_texts(config: BenchConfig) -> dict[str, tuple[str, str]]:
    """name -> (text, source). Files and datasets fail with a one-line :class:`SinkfixError`."""
    from sinkfix.texts import domain_text, read_text_file

    texts: dict[str, tuple[str, str]] = {}
    if config.texts:
        for path in config.texts:
            base = Path(path).stem or "text"
            name, k = base, 2
            while name in texts:
                name, k = f"{base}-{k}", k + 1
            texts[name] = (read_text_file(path), str(path))
        return texts
    if config.dataset:
        name = config.dataset.split(":")[0].split("@")[0]
        return {name: (_dataset_text(config.dataset), f"dataset {config.dataset}")}
    texts["prose"] = (domain_text("prose", "eval"), "built-in prose: Python language reference (pydoc_data.topics)")
    texts["code"] = (domain_text("code", "eval"), "built-in code: Python standard-library source (eval split)")
    return texts


def _dataset_text(spec: str, max_chars: int = 4_000_000) -> str:
    """``NAME[:CONFIG][@SPLIT]`` through the ``datasets`` package (needs it installed and the network)."""
    try:
        import datasets  # optional dependency
    except ImportError:
        raise SinkfixError(
            f"--dataset {spec} needs the 'datasets' package (pip install datasets) and network access; "
            "use --text FILE for local text"
        ) from None
    name_config, _, split = spec.partition("@")
    name, _, config_name = name_config.partition(":")
    try:
        ds = datasets.load_dataset(name, config_name or None, split=split or "test")
    except Exception as exc:  # noqa: BLE001 - network, missing dataset, bad split: all one clear line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SinkfixError(f"could not load dataset {spec!r}: {first}") from None
    column = "text" if "text" in ds.column_names else next(
        (c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None
    )
    if column is None:
        raise SinkfixError(f"dataset {spec!r} has no text column (columns: {', '.join(ds.column_names)})")
    parts, size = [], 0
    for row in ds[column]:
        if row:
            parts.append(row)
            size += len(row)
            if size >= max_chars:
                break
    text = "\n".join(parts)
    if not text.strip():
        raise SinkfixError(f"dataset {spec!r} column {column!r} is empty")
    return text


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == bos


def max_positions(config) -> int | None:
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _text_config(config):
    return getattr(config, "text_config", None) or config


# -- speed --------------------------------------------------------------------------------------
def prefill_kwargs(model) -> dict[str, Any]:
    # generate() computes logits for the last position only during prefill; doing the same keeps
    # the (S x vocab) LM-head product (14.5 GFLOP at 512 tokens on SmolLM2, ~10% of the forward)
    # and its 100 MB fp32 logits out of a measurement meant for the model body.
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.no_grad()
def time_prefill(model, ids: torch.Tensor, extra: dict[str, Any] | None = None) -> float:
    """Seconds of one prefill forward of ``ids`` (B, S) with a KV cache; ``extra`` from :func:`prefill_kwargs`."""
    extra = prefill_kwargs(model) if extra is None else extra
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, **extra)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def _decode_once(model, ids: torch.Tensor, new_tokens: int, pad_id: int) -> list[float]:
    """Step latencies (s) of the ``new_tokens - 1`` cached decode steps of one ``generate`` call."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    device = ids.device
    stamps: list[float] = []

    class StepClock(StoppingCriteria):
        # called once per generated token, right after its forward: consecutive calls bracket one
        # KV-cached decode step (the first call closes the prefill)
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            _sync(device)
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    gen = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
        eos_token_id=None, use_cache=True,
    )
    model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen,
        stopping_criteria=StoppingCriteriaList([StepClock()]),
    )
    return [b - a for a, b in zip(stamps, stamps[1:])]


# -- extreme-token metrics ----------------------------------------------------------------------
def _metrics_module() -> tuple[Any, str | None]:
    try:
        from sinkfix.analysis import metrics
    except ImportError as exc:
        return None, f"extreme-token metrics skipped: sinkfix.analysis.metrics is not available ({exc})"
    if not hasattr(metrics, "measure_extreme_tokens"):
        return None, "extreme-token metrics skipped: sinkfix.analysis.metrics has no measure_extreme_tokens"
    return metrics, None


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)


def _summarise_metrics(result: Any) -> dict[str, Any]:
    sink = torch.as_tensor(result.sink_share, dtype=torch.float64)  # [L, Hq]
    drain = torch.as_tensor(result.value_drain, dtype=torch.float64)  # [L, Hkv]
    peak = torch.as_tensor(result.residual_peak, dtype=torch.float64)  # [L]
    sink_layer = sink.nanmean(-1) if sink.ndim == 2 else sink
    drain_layer = drain.nanmean(-1) if drain.ndim == 2 else drain
    hidden = getattr(result, "hidden_sink_share", None)
    hidden = None if hidden is None else torch.as_tensor(hidden, dtype=torch.float64)
    return {
        "summary": {
            "hidden_sink_share_mean": None if hidden is None else float(hidden.nanmean()),
            "sink_share_mean": float(sink.nanmean()),
            "sink_share_max_layer": float(sink_layer.max()),
            "residual_peak_max": float(peak.max()),
            "residual_peak_argmax_layer": int(peak.argmax()),
            "value_drain_mean": float(drain.nanmean()),
            "value_drain_min": float(drain[~drain.isnan()].min()) if (~drain.isnan()).any() else None,
        },
        "sink_share_layer": sink_layer.tolist(),
        "residual_peak_layer": peak.tolist(),
        "value_drain_layer": drain_layer.tolist(),
        "sink_share": sink.tolist(),
        "value_drain": drain.tolist(),
        "peak_positions": _jsonable(getattr(result, "peak_positions", None)),
    }


# -- provenance ---------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("sinkfix", "torch", "transformers", "tokenizers", "numpy", "gguf", "triton", "accelerate"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return {"revision": None, "dirty": None}
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=True).stdout
        return {"revision": rev or None, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _provenance(device: torch.device) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "device": device.type,
        "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "load_average_start": _load_average(),
        "load_average_end": None,
        "platform": platform.platform(),
        "versions": _versions(),
        "git": _git(),
        "argv": list(sys.argv),
    }


# -- the run ------------------------------------------------------------------------------------
def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SinkfixError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SinkfixError("--device cuda requested but torch sees no CUDA device")
    return device


def _load_profile(path: str) -> Any:
    try:
        from sinkfix.profile import Profile
    except ImportError as exc:
        raise SinkfixError(f"--profile needs sinkfix.profile, which this installation lacks ({exc})") from None
    return Profile.load(path)


def run_bench(
    config: BenchConfig,
    *,
    progress: ProgressFactory | None = None,
    log: Callable[[str], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Run every measurement and return the results dict (layout: ``schema.md``).

    Bad input raises :class:`SinkfixError` (or ValueError/OSError subclasses) *before* the long
    steps: texts are read before the model is loaded, and every patched variant is applied once to
    the loaded model before any measurement.

    Side effects on the process: ``config.threads`` sets torch's thread count, ``config.baseline``
    the model's attention implementation, and on glibc CPUs the memory phase (the last one) pins
    malloc's mmap threshold for the rest of the process (:func:`pin_mmap_threshold`).
    """
    started = time.perf_counter()
    load_start = _load_average()
    phases: dict[str, float] = {}
    last = [started]

    def phase_done(name: str) -> None:
        now = time.perf_counter()
        phases[name] = now - last[0]
        last[0] = now

    progress = progress or _no_progress
    say = log or (lambda message: None)
    notes: list[str] = []
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = _pick_device(config.device)

    # -- inputs first: a bad file fails in milliseconds, not after a 15 s model load
    texts = load_texts(config)
    profile = _load_profile(config.profile) if config.profile else None
    variants = default_variants(config.policies, profile, config.profile)

    if model_and_tokenizer is not None:
        model, tokenizer = model_and_tokenizer
    else:
        say(f"loading {config.model} ...")
        model, tokenizer = load_model(config.model, device=device)
    device = model_device(model)
    model_cfg = model.config
    limit = max_positions(model_cfg)
    if limit is not None and config.seq_len > limit:
        raise SinkfixError(
            f"--seq-len {config.seq_len} is larger than {config.model} supports "
            f"(max_position_embeddings = {limit})"
        )
    # the decode prompt is the prefill prompt, shortened if prompt + new tokens would not fit
    prompt_len = config.seq_len
    if config.decode_tokens and limit is not None:
        prompt_len = min(prompt_len, limit - config.decode_tokens)
        if prompt_len < 2:
            raise SinkfixError(f"--decode-tokens {config.decode_tokens} leaves no room for a prompt "
                               f"(max_position_embeddings = {limit})")
    if config.baseline != getattr(model_cfg, "_attn_implementation", None):
        try:
            model.set_attn_implementation(config.baseline)
        except (ValueError, ImportError) as exc:
            raise SinkfixError(f"--baseline {config.baseline} is not available for this model: {exc}") from None
    from sinkfix.ops.attention import resolve_backend

    try:
        backend = resolve_backend(config.backend, device)
    except (RuntimeError, AttributeError, ImportError) as exc:
        raise SinkfixError(f"--backend {config.backend}: {exc}") from None
    for variant in variants[1:]:  # fail fast: a profile for another model, a policy of the wrong shape
        with variant.applied(model, backend):
            pass

    phase_done("setup")

    # -- protocol: windows per domain
    bos = tokenizer_adds_bos(tokenizer) if config.bos is None else config.bos
    bos_id = bos_token_id(tokenizer) if bos else None
    body = config.seq_len - (1 if bos else 0)
    stride = config.stride or body
    if stride > body:
        raise SinkfixError(f"--stride {stride} exceeds the {body} text tokens per window (every token must be scored)")
    domains: list[Domain] = []
    for name, (text, source) in texts.items():
        try:
            ids = tokenize(tokenizer, text)
        except ValueError as exc:
            raise SinkfixError(f"text {name!r} ({source}): {exc}") from None
        windows = make_windows(ids, config.seq_len, stride, bos_id, config.max_windows or None)
        domains.append(Domain(name, source, ids, windows))

    # -- quality
    quality: dict[str, dict[str, tuple[float, int]]] = {v.name: {} for v in variants}
    total = len(variants) * sum(len(d.windows) for d in domains)
    with progress("perplexity", total) as advance:
        for variant in variants:
            with variant.applied(model, backend):
                for domain in domains:
                    quality[variant.name][domain.name] = windows_nll(model, domain.windows, config.batch, advance)

    phase_done("quality")

    # -- extreme-token metrics
    metrics_mod, metrics_note = _metrics_module()
    metrics: dict[str, Any] = {}
    metric_windows = [w.input_ids for d in domains for w in d.windows[: config.metrics_windows]]
    if metrics_mod is not None and metric_windows:
        with progress("extreme-token metrics", len(variants) * len(metric_windows)) as advance:
            for variant in variants:
                try:
                    with variant.applied(model, backend):
                        result = metrics_mod.measure_extreme_tokens(
                            model, metric_windows, hidden_sink_threshold=config.hidden_sink_threshold,
                            progress=advance,
                        )
                    metrics[variant.name] = _summarise_metrics(result)
                except Exception as exc:  # noqa: BLE001 - keep the other sections; say what failed
                    metrics_note = f"extreme-token metrics failed on {variant.name}: {type(exc).__name__}: {exc}"
                    metrics = {}
                    break
    elif metrics_mod is not None:
        metrics_note = "extreme-token metrics skipped: --metrics-windows 0"
    if metrics_note:
        notes.append(metrics_note)
        say(metrics_note)

    phase_done("metrics")

    # -- speed: prefill, then decode, each in ABBA rounds
    stream = torch.cat([d.ids for d in domains])
    if stream.numel() < config.seq_len:  # speed needs length, not meaning: repeat the text
        stream = stream.repeat(config.seq_len // max(stream.numel(), 1) + 1)
    prompt = stream[: config.seq_len - (1 if bos else 0)]
    if bos:
        prompt = torch.cat([torch.tensor([bos_id], dtype=prompt.dtype), prompt])
    prefill_ids = prompt[None].expand(config.batch, -1).contiguous().to(device)
    decode_ids = prefill_ids[:, :prompt_len]
    by_name = {v.name: v for v in variants}
    names = [v.name for v in variants]
    extra = prefill_kwargs(model)

    def prefill(name: str) -> float:
        with by_name[name].applied(model, backend):
            return time_prefill(model, prefill_ids, extra)

    with progress("prefill timing", (config.warmup + config.repeats) * len(names)) as advance:
        prefill_times = alternate(names, prefill, repeats=config.repeats, warmup=config.warmup, on_step=advance)

    phase_done("prefill")
    decode_steps: dict[str, list[list[float]]] = {}
    if config.decode_tokens:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = pad_id if pad_id is not None else (getattr(tokenizer, "eos_token_id", None) or 0)

        def decode(name: str) -> list[float]:
            with by_name[name].applied(model, backend):
                return _decode_once(model, decode_ids, config.decode_tokens, pad_id)

        with progress("decode timing", (config.warmup + config.decode_repeats) * len(names)) as advance:
            decode_steps = alternate(names, decode, repeats=config.decode_repeats, warmup=config.warmup,
                                     on_step=advance)

    phase_done("decode")

    # -- memory: peak of one prefill per variant, alternating rounds
    memory: dict[str, list[MemoryPeak]] = {name: [] for name in names}
    if config.memory_rounds:
        pinned = device.type == "cpu" and pin_mmap_threshold()
        def peak(name: str) -> MemoryPeak:
            with by_name[name].applied(model, backend):
                return measure_peak_memory(lambda: time_prefill(model, prefill_ids, extra), device)

        with progress("memory", config.memory_rounds * len(names)) as advance:
            memory = alternate(names, peak, repeats=config.memory_rounds, warmup=0, on_step=advance)
        method = next(iter(memory.values()))[0].method
        if method in ("linux_vmhwm", "rss_sampling", "ru_maxrss_delta"):
            notes.append(
                f"memory: process resident-set peak above the pre-call baseline ({method}), one "
                f"{config.batch}x{config.seq_len} prefill, measured in-process after gc + malloc_trim"
                + (" with glibc's mmap threshold pinned" if pinned else "")
                + "; benchmarks/bench_patch_overhead.py measures each configuration in a fresh process"
            )

    phase_done("memory")

    # -- assemble
    stock = variants[0].name
    tc = _text_config(model_cfg)
    results: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": None,
        "phase_seconds": phases,
        "config": asdict(config) | {"policies": list(config.policies), "texts": list(config.texts)},
        "provenance": _provenance(device),
        "model": {
            "name": getattr(model, "sinkfix_name", config.model),
            "architecture": type(model).__name__,
            "num_layers": getattr(tc, "num_hidden_layers", None),
            "num_heads": getattr(tc, "num_attention_heads", None),
            "num_kv_heads": getattr(tc, "num_key_value_heads", getattr(tc, "num_attention_heads", None)),
            "hidden_size": getattr(tc, "hidden_size", None),
            "vocab_size": getattr(tc, "vocab_size", None),
            "max_position_embeddings": limit,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "baseline_attention": config.baseline,
            "patch_backend": backend,
        },
        "protocol": {
            "bos": bos,
            "bos_id": bos_id,
            "bos_source": "tokenizer" if config.bos is None else "flag",
            "seq_len": config.seq_len,
            "stride": stride,
            "max_windows": config.max_windows,
            "batch": config.batch,
            "description": (
                f"{'BOS + ' if bos else 'no BOS, '}{config.seq_len}-token windows, stride {stride}, no token "
                "scored twice, perplexity token-weighted over windows"
            ),
            "prefill": f"{config.batch}x{config.seq_len} tokens, one forward with KV cache"
                       + (", logits for the last position only (as generate does)" if extra else ""),
            "decode": (f"greedy generate of {config.decode_tokens} tokens after a {prompt_len}-token prompt, "
                       f"{config.decode_tokens - 1} KV-cached steps timed") if config.decode_tokens else None,
            "timing_order": "ABBA rounds over variants after warmup rounds",
        },
        "domains": {
            d.name: {
                "source": d.source,
                "tokens_available": int(d.ids.numel()),
                "windows": len(d.windows),
                "scored_tokens": quality[stock][d.name][1],
            }
            for d in domains
        },
        "metrics_status": {
            "available": bool(metrics),
            "note": metrics_note,
            "windows": len(metric_windows),
            "hidden_sink_threshold": config.hidden_sink_threshold,
        },
        "variants": [],
        "notes": notes,
    }

    stock_nll = quality[stock]
    stock_prefill = Spread(tuple(prefill_times[stock]))
    stock_decode = _decode_rates(decode_steps.get(stock), config.batch)
    stock_mem = _median_peak(memory.get(stock))
    for variant in variants:
        entry: dict[str, Any] = {
            "name": variant.name,
            "kind": variant.kind,
            "policy": None if variant.kind == "stock" else variant.describe(),
            "source": variant.source,
            "attention": config.baseline if variant.kind == "stock" else "sinkfix",
        }
        q: dict[str, Any] = {}
        pooled_nll, pooled_tokens, stock_pooled, stock_tokens = 0.0, 0, 0.0, 0
        for d in domains:
            nll_sum, tokens = quality[variant.name][d.name]
            s_sum, s_tokens = stock_nll[d.name]
            q[d.name] = _quality_entry(nll_sum, tokens, s_sum, s_tokens)
            pooled_nll, pooled_tokens = pooled_nll + nll_sum, pooled_tokens + tokens
            stock_pooled, stock_tokens = stock_pooled + s_sum, stock_tokens + s_tokens
        q["all"] = _quality_entry(pooled_nll, pooled_tokens, stock_pooled, stock_tokens)
        entry["quality"] = q
        entry["metrics"] = metrics.get(variant.name)

        times = Spread(tuple(prefill_times[variant.name]))
        tokens_per_call = config.batch * config.seq_len
        entry["speed"] = {
            "prefill": {
                "tokens": tokens_per_call,
                "seconds": times.to_dict(),
                "tokens_per_s": _rate_spread(times, tokens_per_call),
                "latency_ms": {"p50": times.percentile(50) * 1e3, "p90": times.percentile(90) * 1e3},
                "time_ratio_vs_stock": times.median / stock_prefill.median,
                "paired_time_ratio_vs_stock": Spread(tuple(
                    a / b for a, b in zip(prefill_times[variant.name], prefill_times[stock])
                )).to_dict(),
            },
            "decode": None,
        }
        if decode_steps:
            rates = _decode_rates(decode_steps[variant.name], config.batch)
            steps = Spread(tuple(s for run in decode_steps[variant.name] for s in run))
            entry["speed"]["decode"] = {
                "new_tokens": config.decode_tokens,
                "prompt_tokens": prompt_len,
                "tokens_per_s": rates.to_dict(),
                "step_latency_ms": {"p50": steps.percentile(50) * 1e3, "p90": steps.percentile(90) * 1e3,
                                    "min": steps.min * 1e3, "max": steps.max * 1e3, "n": len(steps.samples)},
                "time_ratio_vs_stock": stock_decode.median / rates.median,
                "paired_time_ratio_vs_stock": Spread(tuple(
                    sum(a) / sum(b) for a, b in zip(decode_steps[variant.name], decode_steps[stock]) if a and b
                ) or (float("nan"),)).to_dict(),
            }
        peaks = memory.get(variant.name) or []
        if peaks:
            median_peak = _median_peak(peaks)
            entry["memory"] = {
                "peak_bytes": median_peak,
                "samples": [p.peak_bytes for p in peaks],
                "baseline_bytes": peaks[0].baseline_bytes,
                "ratio_vs_stock": median_peak / stock_mem if stock_mem else None,
                "method": peaks[0].method,
            }
        else:
            entry["memory"] = None
        results["variants"].append(entry)

    results["provenance"]["load_average_start"] = load_start
    results["provenance"]["load_average_end"] = _load_average()
    prov = results["provenance"]
    loads = [x[0] for x in (prov["load_average_start"], prov["load_average_end"]) if x]
    usable = results["provenance"]["usable_cpus"] or 1
    if device.type == "cpu" and loads and max(loads) > usable:
        # with more runnable threads than CPUs, torch's workers wait for each other at every
        # parallel region: code made of many small ops (decode steps, the patched epilogue) slows
        # down far more than one big fused op, so ratios drift from what an idle machine shows
        notes.append(
            f"the machine was busy (load average up to {max(loads):.1f} on {usable} usable CPUs): timings and "
            "ratios are noisier than on an idle machine; the paired ratios show the spread (--threads 1 suffers less)"
        )
    results["wall_time_s"] = time.perf_counter() - started
    return _jsonable(results)


def _quality_entry(nll_sum: float, tokens: int, stock_sum: float, stock_tokens: int) -> dict[str, Any]:
    nll = nll_sum / max(tokens, 1)
    stock_ppl = math.exp(stock_sum / max(stock_tokens, 1))
    ppl = math.exp(nll)
    return {"nll": nll, "ppl": ppl, "tokens": tokens, "delta_pct": 100.0 * (ppl / stock_ppl - 1.0)}


def _rate_spread(times: Spread, tokens: int) -> dict[str, float]:
    # the fastest run gives the highest rate: min/max swap when inverting
    return {"min": tokens / times.max, "median": tokens / times.median, "max": tokens / times.min}


def _decode_rates(runs: list[list[float]] | None, batch: int) -> Spread:
    if not runs:
        return Spread((float("nan"),))
    return Spread(tuple(batch * len(steps) / sum(steps) for steps in runs if steps))


def _median_peak(peaks: list[MemoryPeak] | None) -> int | None:
    if not peaks:
        return None
    return int(statistics.median(p.peak_bytes for p in peaks))
