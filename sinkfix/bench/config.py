"""What a bench run measures: its settings (:class:`BenchConfig`) and the variants it compares (:class:`Variant`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from sinkfix.errors import SinkfixError, UsageError
from sinkfix.models import DEFAULT_MODEL
from sinkfix.policy import Policy

__all__ = ["DEFAULT_POLICIES", "BenchConfig", "Variant", "default_variants"]

# The default set when no --policy/--profile is given: the patch itself (its overhead and exactness),
# the setting that helped on SmolLM2 with a BOS (beta = 0.9: -1 to -2% perplexity), and dropping the
# sink (beta = 0: +2 to +3%), which shows what removing the sink costs.
DEFAULT_POLICIES = ("sink_scale=0.9", "drop")


@dataclass
class BenchConfig:
    """Everything a run depends on; recorded verbatim in the JSON ``config`` section."""

    model: str = DEFAULT_MODEL
    policies: tuple[str, ...] = ()  # --policy SPEC (repeatable); empty and no profile = DEFAULT_POLICIES
    profile: str | None = None  # --profile FILE
    texts: tuple[str, ...] = ()  # --text FILE ...; empty and no dataset = built-in pydoc + python
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
            (not self.bos or self.seq_len >= 3,
             f"--seq-len must be >= 3 with --bos (the BOS and 2 text tokens), got {self.seq_len}"),
            (self.stride is None or self.stride >= 1, f"--stride must be >= 1, got {self.stride}"),
            # known from the options alone: refused before the model loads (a BOS the tokenizer or a
            # profile adds shortens the body by one more, checked once that is known)
            (self.stride is None or self.stride <= self.seq_len - (1 if self.bos else 0),
             f"--stride {self.stride} exceeds the {self.seq_len - (1 if self.bos else 0)} text tokens per window "
             f"(--seq-len {self.seq_len}{' less the BOS of --bos' if self.bos else ''}; every token must be scored)"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (self.max_windows >= 0, f"--max-windows must be >= 0, got {self.max_windows}"),
            (self.decode_tokens == 0 or self.decode_tokens >= 2,
             f"--decode-tokens must be 0 (skip) or >= 2 (a rate needs two steps), got {self.decode_tokens}"),
            (self.repeats >= 1, f"--repeats must be >= 1, got {self.repeats}"),
            (self.decode_repeats >= 1, f"--decode-repeats must be >= 1, got {self.decode_repeats}"),
            (self.warmup >= 0 and self.memory_rounds >= 0 and self.metrics_windows >= 0, "counts must be >= 0"),
            (self.baseline in ("sdpa", "eager"), f"--baseline must be sdpa or eager, got {self.baseline!r}"),
            (self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}"),
            (not (self.profile and self.policies), "give --profile or --policy, not both"),
            (not (self.texts and self.dataset), "give --text or --dataset, not both"),
            # an unset shell variable (--dataset "$DATA") silently measured the built-in texts
            (self.dataset is None or bool(self.dataset.strip()), "--dataset is empty: name a dataset, or leave the "
                                                                 "option out for the built-in texts"),
        ]
        for ok, message in checks:
            if not ok:
                raise SinkfixError(message)
        if self.hidden_sink_threshold is not None:  # None skips the hidden-sink pass
            from sinkfix.analysis.metrics import check_hidden_sink_threshold

            check_hidden_sink_threshold(self.hidden_sink_threshold, "hidden_sink_threshold", SinkfixError)


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
        same = next((v for v in variants if v.name == name), None)
        if same is not None:
            if spec.strip() == "identity":
                continue  # measured anyway
            # a spec that is another one again (or the identity, as `virtual_logit_on_sink_rows=0` alone
            # is) was dropped without a word
            already = "is measured anyway" if same.name == "identity" else f"--policy {same.source!r} already gives"
            raise UsageError(f"--policy {spec!r} is the policy {name!r}, which {already}: give each policy once")
        variants.append(Variant(name, "policy", policy, source=spec))
    return variants
