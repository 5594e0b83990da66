"""Where a result came from: package versions, the git revision, the device, the machine's load."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["provenance", "provenance_line", "load_average", "versions", "git_state", "device_name", "usable_cpus"]

_DISTRIBUTIONS = ("sinkfix", "torch", "transformers", "tokenizers", "numpy", "gguf", "triton", "accelerate")


def versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Python's and each distribution's version (None where not installed): the usual ones, then
    ``extra`` (what one command's numbers also depend on, e.g. a quantization backend)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _DISTRIBUTIONS + tuple(extra):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_state() -> dict[str, Any]:
    """Revision and dirtiness of the checkout this package runs from; nulls for an installed copy."""
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


def device_name(device: torch.device) -> str:
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


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def usable_cpus() -> int | None:
    """CPUs this process may run on (its affinity mask), which a container can set below ``cpu_count``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def provenance(device: torch.device, extra_distributions: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON ``provenance`` section; the runner fills in the two load averages. ``extra_distributions``:
    packages whose versions are recorded besides the usual ones (:func:`versions`)."""
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "load_average_start": load_average(),
        "load_average_end": None,
        "platform": platform.platform(),
        "versions": versions(extra_distributions),
        "git": git_state(),
        "argv": list(sys.argv),
    }


def provenance_line(origin: dict[str, Any]) -> str:
    """One line naming the device and the versions a run's numbers belong to (``origin``: what
    :func:`provenance` returned), for a benchmark script's header."""
    found = origin["versions"]
    return (f"device {origin['device_name']} ({origin['device']}); " + ", ".join(
        f"{name} {found.get(name) or 'not installed'}" for name in ("sinkfix", "torch", "transformers", "triton")))
