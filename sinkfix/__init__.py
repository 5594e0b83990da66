"""sinkfix: measure and correct attention sinks, value-state drains and residual-state peaks.

    import sinkfix
    model, tok = sinkfix.load_model("smollm2-135m")
    with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.9)):
        ...
    telemetry = sinkfix.monitor(model, log="telemetry.jsonl")   # live statistics per request

Importing sinkfix registers the attention implementation ``"sinkfix"`` with transformers, so
``from_pretrained(..., attn_implementation="sinkfix")`` works too (identity until patched). The
registration happens when transformers defines its registries, so ``import sinkfix`` itself does
not import transformers' model code.
"""

import os as _os
import signal as _signal
import sys as _sys


def _quiet_interrupt_while_loading() -> None:
    """In the ``sinkfix`` command (the console script, or ``python -m sinkfix``), Ctrl-C while this
    package loads torch and transformers ends with one line and status 130, as it does once a
    command runs (``cli.main`` then installs its own handlers): it printed Python's 46-line traceback
    and ended with status 1. Nothing has been written at that point. Left alone: any other program
    importing sinkfix, and a process that ignores SIGINT or handles it itself."""
    script = _os.path.basename(_sys.argv[0]) if _sys.argv else ""
    as_module = list(getattr(_sys, "orig_argv", []))[1:3] == ["-m", "sinkfix"]
    if script.removesuffix(".exe") != "sinkfix" and not (script == "-m" and as_module):
        return
    if _signal.getsignal(_signal.SIGINT) is not _signal.default_int_handler:
        return

    def interrupted(signum, frame):
        _os.write(2, b"sinkfix: interrupted\n")
        _os._exit(130)

    _signal.signal(_signal.SIGINT, interrupted)


_quiet_interrupt_while_loading()

from sinkfix.errors import CacheError, ModelLoadError, PolicyError, ProfileError, SinkfixError, UnsupportedModelError
from sinkfix.models import load_model
from sinkfix.patch import IMPL_NAME, PatchHandle, patch, register, register_on_import
from sinkfix.policy import ContentSinks, Policy, ResidualClip

__version__ = "0.1.0"

__all__ = [
    "CacheError", "ContentSinks", "IMPL_NAME", "ModelLoadError", "PatchHandle", "Policy", "PolicyError", "ProfileError",
    "ResidualClip",
    "SinkfixError", "UnsupportedModelError", "load_model", "patch", "register", "__version__",
    # imported on first use (__getattr__ below)
    "Profile", "SinkCache", "calibrate", "inspect", "monitor",
]

# "sinkfix" is registered the moment transformers defines its registries: importing sinkfix does
# not import transformers' model code itself (sinkfix.patch.register_on_import)
register_on_import()


def __getattr__(name: str):
    # Analysis entry points are imported on first use: `import sinkfix` stays light.
    if name == "inspect":
        from sinkfix.analysis.inspection import inspect

        return inspect
    if name == "calibrate":
        from sinkfix.analysis.calibration import calibrate

        return calibrate
    if name == "SinkCache":
        from sinkfix.caches import SinkCache

        return SinkCache
    if name == "monitor":
        from sinkfix.telemetry import monitor

        return monitor
    if name == "Profile":
        from sinkfix.profile import Profile

        return Profile
    raise AttributeError(f"module 'sinkfix' has no attribute {name!r}")
