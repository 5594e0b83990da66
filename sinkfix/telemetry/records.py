"""One telemetry record per request: the versioned JSON object the log, Prometheus and callbacks get.

The schema is documented field by field in docs/monitoring.md; :data:`SCHEMA` and :data:`VERSION`
name it in every record, and readers refuse a newer version than they know. Everything here runs
on the host, on the values :meth:`RequestAccumulator.read` already moved there.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from sinkfix.analysis.metrics import DORMANT_THRESHOLD

__all__ = ["SCHEMA", "VERSION", "RequestInfo", "build_records"]

SCHEMA = "sinkfix-telemetry"
VERSION = 1


@dataclass
class RequestInfo:
    """What the host knows about a request batch, next to the values read from the device."""

    requests: list[str]  # the request id of each batch row
    domains: list[str | None]  # one per batch row
    model: str
    policy: str
    betas: list[torch.Tensor]  # per layer (H,) fp64: the sink scaling the request was served with
    identity_layers: list[int] = field(default_factory=list)  # layers the guard switched off
    guard: list[dict | None] | None = None  # per batch row, None = no guard


def _clean(values: torch.Tensor, digits: int = 6) -> Any:
    """Nested lists of floats rounded to ``digits``, NaN and inf as None (strict JSON)."""
    return _listed(_round(values, digits))


def _round(values: torch.Tensor, digits: int) -> torch.Tensor:
    # rounded as a tensor, then one tolist(): rounding value by value in Python took 0.87 of the
    # 0.9 ms a SmolLM2 record took to build (960 values). n / 10**digits is the double nearest
    # the decimal, as Python's round() gives it (they could differ on an exact tie only)
    return torch.round(values.to(torch.float64), decimals=digits)


def _listed(values: torch.Tensor) -> Any:
    """``values.tolist()`` with NaN and inf as None; the usual all-finite case in one call."""
    out = values.tolist()
    return out if bool(torch.isfinite(values).all()) else _finite_or_none(out)


def _finite_or_none(values: Any) -> Any:
    if isinstance(values, list):
        return [_finite_or_none(v) for v in values]
    return values if math.isfinite(values) else None


def _per_layer(values: torch.Tensor, heads: list[int]) -> list:
    """(L, H) padded -> one list per layer with that layer's own head count."""
    rounded = _round(values, 6)
    if all(count == values.shape[1] for count in heads):
        return _listed(rounded)
    return [_listed(row[:count]) for row, count in zip(rounded, heads)]


def _shares(values: dict[str, torch.Tensor], info: RequestInfo) -> dict[str, torch.Tensor]:
    """(L, B, H) sink shares, dormancy scores and row counts from the sums."""
    mass, rows = values["stats"][..., 0], values["stats"][..., 1]
    seen = rows > 0
    width = mass.shape[-1]
    same = len({(b.device, b.dtype) for b in info.betas}) == 1  # not so across pipeline-sharded devices
    if same and all(b.numel() == width for b in info.betas):  # the usual case: one stack, no padding
        beta = torch.stack(info.betas).detach().to("cpu", torch.float64)[:, None, :]  # (L, 1, H)
    else:
        beta = torch.stack([torch.nn.functional.pad(b.detach().double().cpu(), (0, width - b.numel()), value=1.0)
                            for b in info.betas])[:, None, :]
    weight = values["drain_weight"].double()
    # NaN drain weight: the prompt's sink set held no key (prompt.py); with no sink mass since, the sink
    # share is undefined (null), as inspect reports it, not 0
    no_sink = torch.isnan(weight) & (mass == 0)
    unscaled = torch.where(seen & ~no_sink, mass / rows.clamp(min=1), float("nan"))
    # sink mass from a sink position first reached while decoding, with no sink key in the prompt to
    # take a drain weight from: the dormancy's sink part is unknown (null), not 0
    unweighted = torch.isnan(weight) & (mass > 0)
    # a fraction of each row's attention, so at most 1; the hidden part of a long prompt is extrapolated
    # from sampled rows, and the estimate reached 1.0034 on a prompt whose every row is exactly 1
    dormancy = torch.where(seen & ~unweighted, (beta * weight.nan_to_num(0.0) * mass + values["hidden_part"])
                           / rows.clamp(min=1), float("nan")).clamp(max=1.0)
    return {"unscaled": unscaled, "share": beta * unscaled, "dormancy": dormancy, "rows": rows}


def build_records(values: dict[str, torch.Tensor], info: RequestInfo, num_heads: list[int],
                  kv_heads: list[int]) -> list[dict]:
    """One record per batch row (docs/monitoring.md, "Log schema")."""
    derived = _shares(values, info)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    records = []
    for b, domain in enumerate(info.domains):
        dormancy = derived["dormancy"][:, b]
        moved = (derived["unscaled"][:, b] - derived["share"][:, b]).nanmean(-1)
        tokens, prompt = int(values["tokens"][b]), int(values["prompt_tokens"][b])
        records.append({
            "schema": SCHEMA, "version": VERSION, "time": now, "request": info.requests[b], "index": b,
            "domain": domain, "model": info.model, "policy": info.policy,
            "tokens": tokens, "prompt_tokens": prompt, "decoded_tokens": tokens - prompt,
            "rows": [int(r) for r in derived["rows"][:, b].amax(-1).tolist()],
            "sink_share": _per_layer(derived["share"][:, b], num_heads),
            "sink_share_unscaled": _per_layer(derived["unscaled"][:, b], num_heads),
            "dormancy": _per_layer(dormancy, num_heads),
            "dormant_heads": int((dormancy >= DORMANT_THRESHOLD).sum()),
            "dormant_threshold": DORMANT_THRESHOLD,
            "hidden_sinks": [[int(x) for x in row[:h]] for row, h in zip(values["hidden_sinks"][:, b].tolist(),
                                                                        num_heads)],
            "value_drain": _per_layer(values["value_drain"][:, b], kv_heads),
            "residual_peak": _clean(values["residual_peak"][:, b], 4),
            "residual_peak_position": [int(p) if math.isfinite(p) else None
                                       for p in values["peak_position"][:, b].tolist()],
            "correction": {"policy": info.policy, "identity_layers": list(info.identity_layers),
                           "moved_share": _clean(moved)},
            "guard": None if info.guard is None else info.guard[b],
        })
    return records
