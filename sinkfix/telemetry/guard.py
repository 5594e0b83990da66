"""The guard: switch a correction off for requests that do not look like its calibration text.

A calibrated profile can carry :class:`~sinkfix.profile.ProfileStatistics`: per layer and head, the
range of the sink share (before sink scaling, with the profile applied) over the calibration
windows and their prefixes. :func:`calibration_statistics` measures it. While a monitored model
serves a request, the guard compares the prompt's live sink shares (exact, from the fast path)
with those ranges; a head more than ``margin`` outside its range takes its layer out of the
correction (``scope="layers"``), or every layer (``scope="request"``), for the rest of the request.
The prompt's forward is then run again with those layers as the identity, so the whole request is
served by the fallback, and the log says so. What it can and cannot catch: docs/monitoring.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from sinkfix.errors import MonitorError
from sinkfix.ops.reference import sink_key_mask, visibility_mask
from sinkfix.profile import ProfileStatistics
from sinkfix.telemetry.accumulate import read_once

__all__ = ["DEFAULT_MARGIN", "Guard", "GuardDecision", "calibration_statistics"]

#: Absolute margin in sink-share units (shares lie in [0, 1]). From benchmarks/check_guard_margin.py
#: on SmolLM2-135M (ranges from 2 x 8 calibration windows of 512 tokens): held-out prose and code
#: prompts (245-697 tokens) left their ranges by at most 0.126 (with or without BOS), prompts of
#: random token ids by 0.315-0.352. 0.15 keeps every held-out prompt of that run in, every random one out.
DEFAULT_MARGIN = 0.15

#: A share counts as outside its range only beyond this many float32 ulps (relative, of the larger of
#: the share and the range's high end) past the margin. The ranges (calibration_statistics: a float32
#: cumulative sum over the rows) and the live share (the monitor's own per-request sum) add the same
#: float32 masses in another order: on the statistics' own 24 calibration windows (tiny Llama, 64
#: tokens, review 39) they differed by up to 2.5e-9 at a share of 0.0585 (0.36 eps relative), and with
#: margin 0 two of those windows tripped the guard with an excess printed as 0.0.
TOLERANCE_ULPS = 4


@dataclass
class GuardDecision:
    """The guard's verdict on one request batch's prompt."""

    rows: list[dict]  # per batch row: the "guard" entry of its record
    layers: list[int]  # layers to run as the identity for the rest of the request

    def record(self, action: str, *, whole_batch: bool = False) -> None:
        """Write ``action`` into the tripped rows' entries. ``whole_batch``: the action served every
        row of the batch (one forward serves them all, so a rerun as the identity is every row's):
        the rows that did not trip say so instead of "none"."""
        for row in self.rows:
            if row["tripped"]:
                row["action"] = action
            else:
                row["action"] = f"{action}: another row of the batch tripped" if whole_batch else "none"


@dataclass(frozen=True)
class Guard:
    """Compare a request's prompt statistics with a profile's calibration ranges.

    ``margin``: how far (absolute sink share) outside ``[low, high]`` a head must be to trip.
    ``scope``: ``"layers"`` switches off the layers with a head out of range, ``"request"`` all
    layers. ``min_rows``: prompts whose layer saw fewer rows are not judged (default: the
    statistics' own ``min_rows``, the shortest prefix the ranges were measured on).
    """

    statistics: ProfileStatistics
    margin: float = DEFAULT_MARGIN
    scope: Literal["layers", "request"] = "layers"
    min_rows: int | None = None

    def __post_init__(self) -> None:
        if not self.margin >= 0:
            raise MonitorError(f"guard margin must be >= 0, got {self.margin}")
        if self.scope not in ("layers", "request"):
            raise MonitorError(f"guard scope must be 'layers' or 'request', got {self.scope!r}")

    @classmethod
    def from_profile(cls, profile, *, margin: float = DEFAULT_MARGIN, scope: str = "layers",
                     min_rows: int | None = None) -> "Guard":
        if getattr(profile, "statistics", None) is None:
            raise MonitorError(
                "the guard needs a profile that carries calibration statistics, and this one has none "
                "(made before they existed, or with --no-statistics): add them with `sinkfix monitor ranges "
                "--model NAME --profile FILE --out FILE`, or calibrate again")
        return cls(profile.statistics, margin, scope, min_rows)

    @property
    def rows_needed(self) -> int:
        return self.statistics.min_rows if self.min_rows is None else self.min_rows

    def decide(self, stats: torch.Tensor) -> GuardDecision:
        """``stats`` (L, B, H, 2): the prompt's sink statistics. One host read."""
        low = self.statistics.low.to(stats.device)[:, None, :]
        high = self.statistics.high.to(stats.device)[:, None, :]
        rows = stats[..., 1]
        share = stats[..., 0] / rows.clamp(min=1)
        # past the margin by more than the rounding of two summation orders (TOLERANCE_ULPS), so that
        # excess > 0 means out of range, and a window the ranges were measured on is inside them
        tolerance = TOLERANCE_ULPS * torch.finfo(torch.float32).eps * torch.maximum(share.abs(), high)
        excess = torch.maximum(low - self.margin - share, share - high - self.margin) - tolerance
        # a share that is not a number (a model producing NaN) is outside every range; without this
        # the comparison below was False and the record's NaN failed the JSON log
        excess = torch.where(torch.isfinite(share), excess, float("inf"))
        excess = torch.where(rows >= self.rows_needed, excess, float("-inf"))  # (L, B, H)
        worst, where = excess.permute(1, 0, 2).flatten(1).max(dim=1)  # (B,)
        values = read_once({"out": (excess > 0).any(-1), "worst": worst, "where": where, "share": share,
                            "judged": (rows >= self.rows_needed).flatten(start_dim=0)})
        return self._verdict(values, share.shape)

    def _verdict(self, values: dict, shape: torch.Size) -> GuardDecision:
        num_layers, batch, heads = shape
        judged = values["judged"].reshape(num_layers, batch, heads).bool()
        out = values["out"].bool()  # (L, B)
        rows = []
        for b in range(batch):
            layers = [int(x) for x in torch.nonzero(out[:, b]).flatten()]
            entry = {"checked": bool(judged[:, b].any()), "tripped": bool(layers), "layers": layers,
                     "margin": self.margin, "scope": self.scope, "worst": None}
            if entry["checked"]:
                layer, head = divmod(int(values["where"][b]), heads)
                entry["worst"] = {"layer": layer, "head": head,
                                  "share": _finite(values["share"][layer, b, head]),
                                  "low": _finite(self.statistics.low[layer, head]),
                                  "high": _finite(self.statistics.high[layer, head]),
                                  # significant digits: a trip's excess (> 0) never prints as 0.0
                                  "excess": _finite(values["worst"][b], significant=True)}
            rows.append(entry)
        tripped = sorted({layer for row in rows for layer in row["layers"]})
        if tripped and self.scope == "request":
            tripped = list(range(num_layers))
        return GuardDecision(rows, tripped)


def _finite(value: torch.Tensor, *, significant: bool = False) -> float | None:
    """A record's number: rounded to 6 places (``significant``: to 6 significant digits), None (JSON
    null) where it is not finite."""
    number = float(value)
    if not math.isfinite(number):
        return None
    return float(f"{number:.6g}") if significant else round(number, 6)


# -- the statistics a profile carries ---------------------------------------------------------------
def _prefix_ranges(call, min_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hq,) smallest and largest sink share before sink scaling over every prefix of >= ``min_rows``
    counted rows of every sequence of the call (+inf / -inf where no prefix is long enough)."""
    mass = call.result.sink_mass.float()  # (B, Hq, Q)
    batch, _, q_len = mass.shape
    k_len = call.key.shape[2]
    visible = visibility_mask(batch, q_len, k_len, attn_mask=call.attn_mask, causal=call.causal, device=mass.device)
    is_sink = sink_key_mask(call.sink_cols, batch, k_len, mass.device)[:, None, None, :]
    counted = (visible & ~is_sink).any(-1).float()  # (B, 1, Q) rows that see a non-sink key
    rows = counted.cumsum(-1)
    share = (mass * counted).cumsum(-1) / rows.clamp(min=1)
    long_enough = (rows >= min_rows).expand_as(share)
    low = torch.where(long_enough, share, float("inf")).amin(dim=(0, 2))
    high = torch.where(long_enough, share, float("-inf")).amax(dim=(0, 2))
    return low, high


@torch.no_grad()
def calibration_statistics(model: nn.Module, windows: Sequence[torch.Tensor], *, min_rows: int = 32,
                           protocol: dict | None = None,
                           progress: Callable[[int], None] | None = None) -> ProfileStatistics:
    """Sink-share ranges of ``model`` *as it is patched* (patch it with the profile first) over
    ``windows`` (1-D token ids, run one at a time, no padding) and every prefix of at least
    ``min_rows`` rows of each."""
    from sinkfix.evaluate import decoder_stack, model_device
    from sinkfix.patch import PatchHandle

    handle = PatchHandle.of(model)
    if handle is None:
        raise MonitorError("calibration statistics are measured on the patched model: sinkfix.patch(model, profile) first")
    if not windows:
        raise MonitorError("calibration statistics need at least one window")
    num_layers, heads = handle.num_layers, max(handle.num_heads())
    low = torch.full((num_layers, heads), float("inf"), dtype=torch.float64)
    high = torch.full((num_layers, heads), float("-inf"), dtype=torch.float64)

    def observer(call) -> None:
        lo, hi = _prefix_ranges(call, min_rows)
        count = lo.numel()
        low[call.layer, :count] = torch.minimum(low[call.layer, :count], lo.double().cpu())
        high[call.layer, :count] = torch.maximum(high[call.layer, :count], hi.double().cpu())

    device = model_device(model)
    stack = decoder_stack(model)
    with handle.observing(observer):
        for ids in windows:
            stack(input_ids=torch.as_tensor(ids).reshape(1, -1).to(device), use_cache=False)
            if progress is not None:
                progress(1)
    for layer, count in enumerate(handle.num_heads()):  # heads a narrower layer does not have
        low[layer, count:], high[layer, count:] = 0.0, 1.0
    if not torch.isfinite(low).all():
        raise MonitorError(f"no calibration window has {min_rows} rows that see a non-sink key; "
                           "use longer windows or a smaller min_rows")
    return ProfileStatistics(low.clamp(0, 1), high.clamp(0, 1), len(windows), min_rows, dict(protocol or {}))
