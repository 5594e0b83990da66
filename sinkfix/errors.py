"""Exceptions raised by sinkfix. All derive from :class:`SinkfixError` so callers can catch one type."""

from __future__ import annotations

import numbers
from pathlib import Path

__all__ = [
    "SinkfixError", "PolicyError", "UnsupportedModelError", "ModelLoadError", "ProfileError", "UsageError",
    "BackendUnavailableError", "OutputError", "EvaluationError", "CacheError", "MonitorError", "is_integer", "is_real",
]


class SinkfixError(Exception):
    """Base class of every error sinkfix raises on purpose."""


class PolicyError(SinkfixError, ValueError):
    """A policy parameter has the wrong shape, range or value."""


class UnsupportedModelError(SinkfixError, TypeError):
    """The model does not route attention through transformers' attention interface."""


class ModelLoadError(SinkfixError, OSError):
    """A model could not be loaded (unknown name, no network, missing package)."""


class ProfileError(SinkfixError, ValueError):
    """A profile file is unreadable, corrupted, or made for another model."""


class UsageError(SinkfixError, ValueError):
    """An argument is out of range or inconsistent (a command-line flag, a text too short for a window)."""


class BackendUnavailableError(SinkfixError, RuntimeError):
    """The requested kernel backend cannot run here (no triton, no CUDA device)."""


class EvaluationError(SinkfixError, ValueError):
    """A downstream evaluation cannot run: lm-eval missing, an unknown task, task data missing or malformed."""


class CacheError(SinkfixError, ValueError):
    """A KV cache was configured wrongly or used with a model, batch or operation it cannot serve."""


#: why content-dependent sinks refuse a SinkCache that has evicted, and what to use instead: said by
#: the cache before a call stores anything and by the attention where the cache could not tell
EVICTED_CACHE_REFUSAL = ("content-dependent sinks cannot follow a SinkCache that has evicted tokens (its key columns "
                         "are the kept sinks, then the window)")
EVICTED_CACHE_REMEDY = "use a cache that grows (DynamicCache) or a window that holds the whole sequence"


class OutputError(SinkfixError, OSError):
    """An output file could not be written; ``path`` is the file that was meant to be written."""

    path: Path | None = None


class MonitorError(SinkfixError, ValueError):
    """Telemetry cannot run as asked: a malformed request file or log, a port already in use, a guard
    without calibration statistics, a request that does not fit the monitor."""


def is_integer(value) -> bool:
    """An int (numpy's too), not a bool: what a count or a length given from Python may be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (int, float, numpy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
