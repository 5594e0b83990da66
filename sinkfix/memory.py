"""Peak memory of one call, measured in-process: CUDA allocator statistics, or the process's resident set.

On Linux CPUs the kernel's own resident high-water mark (``VmHWM`` in ``/proc/self/status``) is
reset before the call and read after it; elsewhere the resident set is sampled from a thread, and as
a last resort the ``ru_maxrss`` delta is used. :func:`release_memory` and :func:`pin_mmap_threshold`
keep glibc's allocator from hiding or inflating a peak; :func:`keep_freed_heap` keeps it from giving
freed memory back between timed passes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["MemoryPeak", "measure_peak_memory", "release_memory", "pin_mmap_threshold", "keep_freed_heap"]


@dataclass(frozen=True)
class MemoryPeak:
    peak_bytes: int  # peak above the baseline while the call ran
    baseline_bytes: int  # resident (CPU) or allocated (CUDA) bytes just before the call
    method: str  # "cuda_max_allocated" | "linux_vmhwm" | "rss_sampling" | "ru_maxrss_delta"


_LIBC: Any = None


def _libc() -> Any:
    """glibc, loaded once (False off Linux or where it cannot be loaded)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError):
                _LIBC = False
    return _LIBC


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Without the trim, memory freed by an earlier configuration stays resident and the next
    configuration's peak *above baseline* reads low: the allocator reuses those pages and the
    kernel sees no new growth.
    """
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False off glibc or when glibc refuses the value."""
    libc = _libc()
    return bool(libc and hasattr(libc, "mallopt") and libc.mallopt(param, int(value)))


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
    release_memory()
    return _mallopt(_M_MMAP_THRESHOLD, threshold)


def keep_freed_heap(limit: int = 1 << 30) -> bool:
    """Keep every freed heap block for reuse, from now on: glibc gives no memory at the top of its
    heap back to the system and maps no block on its own below ``limit`` bytes, so a timed pass reuses
    the pages of the one before instead of faulting them in again (a 512-token SmolLM2 prefill after a
    trim took about 8,800 minor faults, 34 MB). The process then keeps its largest heap. Same effect as
    ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` set to ``limit`` in the environment.
    Returns False off glibc or when glibc refuses a threshold."""
    return _mallopt(_M_TRIM_THRESHOLD, limit) and _mallopt(_M_MMAP_THRESHOLD, limit)


# -- /proc --------------------------------------------------------------------------------------
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


# -- one strategy each, best first ------------------------------------------------------------------
def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> MemoryPeak:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return MemoryPeak(torch.cuda.max_memory_allocated(device) - base, base, "cuda_max_allocated")


def _high_water_peak(fn: Callable[[], Any]) -> MemoryPeak:
    """Exact, no sampling gaps; only call after :func:`_reset_high_water_mark` returned True."""
    base_kb = _proc_status_kb("VmRSS") or 0
    fn()
    peak_kb = _proc_status_kb("VmHWM") or base_kb
    return MemoryPeak(max(peak_kb - base_kb, 0) * 1024, base_kb * 1024, "linux_vmhwm")


def _sampled_peak(fn: Callable[[], Any], base: int) -> MemoryPeak:
    """RSS sampled every 1 ms from a thread; torch ops release the GIL, so the sampler keeps running."""
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


def _maxrss_peak(fn: Callable[[], Any]) -> MemoryPeak:
    """ru_maxrss only grows over a process's life: honest in a fresh process only."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return MemoryPeak(after - before, before, "ru_maxrss_delta")


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> MemoryPeak:
    """Peak memory above the starting point while ``fn()`` runs.

    CUDA: ``max_memory_allocated`` after a reset. Linux CPU: the kernel's own resident high-water
    mark, reset just before the call (exact, no sampling gaps). Elsewhere: RSS sampled every 1 ms
    from a thread (torch ops release the GIL), or, as a last resort, the ``ru_maxrss`` delta, which
    is monotonic per process and therefore only honest in a fresh process.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    release_memory()
    if _reset_high_water_mark():
        return _high_water_peak(fn)
    base = _current_rss()
    if base is not None:
        return _sampled_peak(fn, base)
    return _maxrss_peak(fn)
