"""Exceptions raised by sinkfix. All derive from :class:`SinkfixError` so callers can catch one type."""

from __future__ import annotations

__all__ = ["SinkfixError", "PolicyError", "UnsupportedModelError", "ModelLoadError", "ProfileError"]


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
