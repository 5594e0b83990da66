"""sinkfix: measure and correct attention sinks, value-state drains and residual-state peaks.

    import sinkfix
    model, tok = sinkfix.load_model("smollm2-135m")
    with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.9)):
        ...
    telemetry = sinkfix.monitor(model, log="telemetry.jsonl")   # live statistics per request

Importing sinkfix registers the attention implementation ``"sinkfix"`` with transformers, so
``from_pretrained(..., attn_implementation="sinkfix")`` works too (identity until patched).
"""

from sinkfix.errors import CacheError, ModelLoadError, PolicyError, ProfileError, SinkfixError, UnsupportedModelError
from sinkfix.models import load_model
from sinkfix.patch import IMPL_NAME, PatchHandle, patch, register
from sinkfix.policy import Policy, ResidualClip

__version__ = "0.1.0"

__all__ = [
    "CacheError", "IMPL_NAME", "ModelLoadError", "PatchHandle", "Policy", "PolicyError", "ProfileError", "ResidualClip",
    "SinkfixError", "UnsupportedModelError", "load_model", "patch", "register", "__version__",
]

register()


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
