"""Timing one prefill forward and the KV-cached steps of one ``generate`` call."""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["CLOCKS", "decode_step_times", "prefill_kwargs", "synchronize", "time_prefill"]

# "wall" is what a user waits for; "cpu" (CPU seconds of the whole process, every thread) is the
# work done, which other processes competing for the same cores inflate far less than elapsed
# time (they still share caches and memory bandwidth). On a GPU only "wall" (after a synchronize)
# means anything.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _clock(name: str):
    try:
        return CLOCKS[name]
    except KeyError:
        raise ValueError(f"unknown clock {name!r}; choose one of {sorted(CLOCKS)}") from None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it includes that work; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
def time_prefill(model, ids: torch.Tensor, extra: dict[str, Any] | None = None, clock: str = "wall") -> float:
    """Seconds of one prefill forward of ``ids`` (B, S) with a KV cache; ``extra`` from
    :func:`prefill_kwargs`; ``clock`` one of :data:`CLOCKS`."""
    extra = prefill_kwargs(model) if extra is None else extra
    now = _clock(clock)
    device = ids.device
    synchronize(device)
    start = now()
    model(input_ids=ids, use_cache=True, **extra)
    synchronize(device)
    return now() - start


@torch.no_grad()
def compiled_decoding(mode: str = "default") -> dict[str, Any]:
    """``generate`` settings for transformers' compiled decoding: a static cache and a fullgraph,
    static-shape ``CompileConfig`` with inductor's ``mode``, on every device (transformers compiles
    decoding on accelerators only unless told)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode=mode)
    config._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=config)


def decode_step_times(model, ids: torch.Tensor, new_tokens: int, pad_id: int, clock: str = "wall",
                      **generate_kwargs: Any) -> list[float]:
    """Step times (s, on ``clock``, one of :data:`CLOCKS`) of the ``new_tokens - 1`` cached decode
    steps of one ``generate`` call. ``generate_kwargs`` go to ``generate`` (e.g.
    ``cache_implementation="static"`` and a ``compile_config`` for compiled decoding)."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    device = ids.device
    now = _clock(clock)
    stamps: list[float] = []

    class StepClock(StoppingCriteria):
        # called once per generated token, right after its forward: consecutive calls bracket one
        # KV-cached decode step (the first call closes the prefill)
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            synchronize(device)
            stamps.append(now())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    # generation settings (cache_implementation, compile_config) go into the config: transformers
    # deprecates passing them to generate() next to a generation_config; anything else goes to generate()
    defaults = GenerationConfig()
    settings = {name: value for name, value in generate_kwargs.items() if hasattr(defaults, name)}
    rest = {name: value for name, value in generate_kwargs.items() if name not in settings}
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
        eos_token_id=None, use_cache=True, **settings,
    )
    model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen,
        stopping_criteria=StoppingCriteriaList([StepClock()]), **rest,
    )
    return [b - a for a, b in zip(stamps, stamps[1:])]
