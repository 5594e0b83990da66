"""Before any measurement: the device, the model with its baseline attention and patch backend, the windows.

Everything here can fail on bad input, and does so with a one-line :class:`SinkfixError` before the
first timed step: an unknown device, a ``--seq-len`` beyond the model, a baseline the model lacks, a
profile made for another model, a text too short for one window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from sinkfix.bench.config import BenchConfig, Variant
from sinkfix.errors import SinkfixError
from sinkfix.evaluate import (Window, bos_token_id, check_positions, make_windows, max_positions, model_device,
                              model_label, tokenize)
from sinkfix.models import load_model, pick_device
from sinkfix.texts import TextSource

__all__ = [
    "Setup", "Domain", "Protocol", "BosChoice", "pick_device", "load_profile", "choose_bos", "window_length_note",
    "prepare_model",
    "build_protocol", "tokenizer_adds_bos", "max_positions", "text_config",
]


@dataclass
class Setup:
    """The loaded model and what was decided about it."""

    model: Any
    tokenizer: Any
    device: torch.device
    backend: str  # the patch backend actually used ("torch" or "triton")
    variants: list[Variant]
    limit: int | None  # max_position_embeddings, when the config states one
    prompt_len: int  # decode prompt: the prefill prompt, shortened so that prompt + new tokens fit
    model_name: str  # what the results call the model


@dataclass
class Domain:
    name: str
    source: str
    ids: torch.Tensor
    windows: list[Window] = field(default_factory=list)


@dataclass
class Protocol:
    """How text becomes scored windows."""

    bos: bool
    bos_id: int | None
    stride: int
    domains: list[Domain]
    bos_source: str = "tokenizer"  # who decided ``bos``: "flag", "profile" or "tokenizer"


@dataclass
class BosChoice:
    """Whether windows start with a BOS, decided before the model loads where a flag or profile says so."""

    bos: bool | None  # None: what the tokenizer does by itself
    source: str  # "flag", "profile" or "tokenizer"
    note: str | None = None  # a profile's protocol followed, or overridden


def choose_bos(config: BenchConfig, profile: Any = None) -> BosChoice:
    """``--bos`` / ``--no-bos`` when given, else the profile's calibration protocol, else the tokenizer's
    habit: a profile fitted with a BOS and measured without one (or the reverse) is judged on text it
    was not fitted for (SmolLM2's BOS profile: python +7% perplexity without a BOS, -13% with one)."""
    from sinkfix.profile import bos_choice

    recorded = None if profile is None else profile.recorded_bos
    name = Path(config.profile or "profile").name
    bos, source, note = bos_choice(config.bos, recorded, name, "its perplexity changes")
    if source != "profile":
        return BosChoice(bos, source, note)
    if recorded and config.seq_len < 3:
        raise SinkfixError(f"--seq-len must be >= 3 with a BOS (the BOS and 2 text tokens), got {config.seq_len}: "
                           f"--profile {name} was calibrated with a BOS; or pass --no-bos")
    how = "windows start with a BOS" if recorded else "windows have no BOS"
    other = "--no-bos to measure without" if recorded else "--bos to measure with one"
    return BosChoice(recorded, "profile", f"--profile {name}: {how}, as the profile was calibrated ({other})")


def window_length_note(config: BenchConfig, profile: Any = None) -> str | None:
    """A note where ``--seq-len`` differs from the window length the profile was calibrated on
    (``calibration.protocol.seq_len``): its perplexity changes are then measured on other windows than
    it was fitted for (not refused: the length a profile is read at is the user's to choose)."""
    recorded = None if profile is None else profile.recorded_seq_len
    if recorded is None or recorded == config.seq_len:
        return None
    name = Path(config.profile or "profile").name
    return (f"--profile {name} was calibrated on {recorded}-token windows and is measured on {config.seq_len}-token "
            f"ones (--seq-len {recorded} to measure as calibrated): its perplexity changes need not match the "
            "calibration's")


def load_profile(path: str) -> Any:
    try:
        from sinkfix.profile import Profile
    except ImportError as exc:
        raise SinkfixError(f"--profile needs sinkfix.profile, which this installation lacks ({exc})") from None
    return Profile.load(path)


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == bos


def text_config(config):
    return getattr(config, "text_config", None) or config


def _prompt_len(config: BenchConfig, limit: int | None) -> int:
    prompt_len = config.seq_len
    if config.decode_tokens and limit is not None:
        prompt_len = min(prompt_len, limit - config.decode_tokens)
        if prompt_len < 2:
            raise SinkfixError(f"--decode-tokens {config.decode_tokens} leaves no room for a prompt "
                               f"(max_position_embeddings = {limit})")
    return prompt_len


def _set_baseline(model, baseline: str) -> None:
    if baseline == getattr(model.config, "_attn_implementation", None):
        return
    try:
        model.set_attn_implementation(baseline)
    except (ValueError, ImportError) as exc:
        raise SinkfixError(f"--baseline {baseline} is not available for this model: {exc}") from None


def _resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None) -> str:
    from sinkfix.ops.attention import resolve_backend

    try:
        return resolve_backend(name, device, dtype)
    except (RuntimeError, AttributeError, ImportError) as exc:
        raise SinkfixError(f"--backend {name}: {exc}") from None


def prepare_model(
    config: BenchConfig,
    variants: list[Variant],
    device: torch.device,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> Setup:
    """Load the model (unless given), set its baseline attention, and apply every patched variant once."""
    if model_and_tokenizer is not None:
        model, tokenizer = model_and_tokenizer
        name = model_label(model)  # config.model names the default model, not the caller's
    else:
        say(f"loading {config.model} ...")
        model, tokenizer = load_model(config.model, device=device)
        name = getattr(model, "sinkfix_name", None) or config.model
    device = model_device(model)
    limit = check_positions(config.seq_len, model.config, "--seq-len", config.model, SinkfixError)
    prompt_len = _prompt_len(config, limit)
    _set_baseline(model, config.baseline)
    backend = _resolve_backend(config.backend, device, getattr(model, "dtype", None))
    for variant in variants[1:]:  # fail fast: a profile for another model, a policy of the wrong shape
        with variant.applied(model, backend):
            pass
    return Setup(model, tokenizer, device, backend, variants, limit, prompt_len, name)


def build_protocol(config: BenchConfig, tokenizer, texts: Mapping[str, TextSource],
                   choice: BosChoice | None = None) -> Protocol:
    """Tokenize every text and cut it into the windows that are scored (BOS as ``choice`` says, by
    default :func:`choose_bos` without a profile: the flag, else the tokenizer)."""
    choice = choice or choose_bos(config)
    bos = tokenizer_adds_bos(tokenizer) if choice.bos is None else choice.bos
    if bos and config.seq_len < 3:  # --bos itself is checked with the other options, before the model loads
        raise SinkfixError(f"--seq-len must be >= 3 when the tokenizer adds a BOS (the BOS and 2 text tokens), "
                           f"got {config.seq_len}; or pass --no-bos")
    bos_id = bos_token_id(tokenizer) if bos else None
    body = config.seq_len - (1 if bos else 0)
    stride = config.stride or body
    if stride > body:
        why = {"flag": "the BOS of --bos", "profile": "the BOS the profile was calibrated with; --no-bos measures "
               "without it", "tokenizer": "the BOS the tokenizer adds; --no-bos measures without it"}
        less = f" less {why.get(choice.source, 'the BOS')}" if bos else ""
        raise SinkfixError(f"--stride {stride} exceeds the {body} text tokens per window (--seq-len {config.seq_len}"
                           f"{less}; every token must be scored)")
    domains: list[Domain] = []
    for name, text in texts.items():
        try:
            ids = tokenize(tokenizer, text.text)
        except ValueError as exc:
            raise SinkfixError(f"text {name!r} ({text.source}): {exc}") from None
        windows = make_windows(ids, config.seq_len, stride, bos_id, config.max_windows or None)
        domains.append(Domain(name, text.source, ids, windows))
    return Protocol(bos, bos_id, stride, domains, choice.source)
