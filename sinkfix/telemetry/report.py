"""Reading a telemetry log back: per-domain summaries, heads that flip between domains, figures.

``sinkfix monitor report LOG.jsonl`` pools each domain's requests the way ``sinkfix inspect`` pools
its windows: per layer and head, sink share and dormancy are means over all the domain's counted
rows (each request weighted by its rows where its value is defined: a null is no row, not a 0), so
a head's state on a domain does not depend on how the traffic was cut into requests. Heads whose
dormancy is above the threshold on one domain and below it on another (by ``margin`` on each side)
are the active-dormant heads of docs/formulas.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sinkfix.analysis.inspection import MAX_FLIP_MARGIN, check_flip_margin, dormancy_flips
from sinkfix.analysis.metrics import DORMANT_THRESHOLD
from sinkfix.errors import MonitorError
from sinkfix.files import json_error, json_lines, utf8_problem
from sinkfix.telemetry.outputs import NO_DOMAIN, guard_tripped, served_without_correction
from sinkfix.telemetry.requests import check_domain_label
from sinkfix.telemetry.records import SCHEMA, VERSION

__all__ = ["MonitorReport", "DomainSummary", "read_log", "summarise", "write_figure", "check_margin", "MAX_MARGIN"]

#: The largest flip margin there is (:data:`sinkfix.analysis.inspection.MAX_FLIP_MARGIN`), excluded.
MAX_MARGIN = MAX_FLIP_MARGIN

_REQUIRED = ("domain", "tokens", "rows", "sink_share", "dormancy", "dormant_heads", "residual_peak", "hidden_sinks")


def _check_record(record, number: int, where: str, non_finite: bool = False) -> dict:
    """``record`` (line ``number`` of ``where``) checked; ``non_finite``: its line spelt a number JSON
    does not have (``Infinity``, ``NaN``), which json.loads reads as a float."""
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise MonitorError(f"{where}, line {number}: not a sinkfix telemetry record (expected \"schema\": \"{SCHEMA}\")")
    version = record.get("version")
    # every version ever written is an int from 1 up: a missing field, a string, a float or a bool is
    # no version at all, and a newer sinkfix would not read it either
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        shown = "no \"version\"" if "version" not in record else f"\"version\": {json.dumps(version)}"
        raise MonitorError(f"{where}, line {number}: not a sinkfix telemetry record of a known version ({shown}; "
                           f"expected an integer >= 1; this sinkfix reads up to {VERSION})")
    if version > VERSION:
        raise MonitorError(f"{where}, line {number}: telemetry schema version {version} is newer than this sinkfix "
                           f"reads (up to {VERSION}); upgrade sinkfix")
    # (none found: a duplicate key's later value replaced it, and json.loads keeps the last)
    key = next((key for key, value in record.items() if _holds_non_finite(value)), None) if non_finite else None
    if key is not None:
        raise MonitorError(f"{where}, line {number}: \"{key}\" holds a number that is not finite (Infinity or NaN), "
                           "which is not JSON; sinkfix writes null where a value does not exist")
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise MonitorError(f"{where}, line {number}: record lacks {missing[0]!r}")
    problem = _field_problem(record)
    if problem:
        raise MonitorError(f"{where}, line {number}: {problem}")
    return record


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value, *, nullable: bool = True) -> bool:
    """A finite number (a bool is not one), or null where ``nullable``: a number too large for a double
    (``1e400``) reads as inf, and would pass as one."""
    return (value is None and nullable) or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                            and math.isfinite(value))


#: Dormancy is a fraction of attention, at most 1; monitors before 2026-12-06 logged the estimate of a
#: long prompt unclamped (the sink part over every row plus a hidden part extrapolated from sampled rows,
#: each at most 1): 1.0034 measured where every row is exactly 1. Such values are read as 1.
MAX_LOGGED_DORMANCY = 2.0


def _is_share(value) -> bool:
    """A sink share: a number in [0, 1], or null (a head that saw no counted row)."""
    return value is None or (_is_number(value) and 0 <= value <= 1)


def _holds_non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_holds_non_finite(x) for x in value)
    if isinstance(value, dict):
        return any(_holds_non_finite(x) for x in value.values())
    return False


def _field_problem(record: dict) -> str | None:
    """What is wrong with the fields a report reads (types and per-layer shapes), None when nothing:
    a record that passes the schema line but not this would fail later in the arithmetic with a
    traceback that names no line."""
    domain = record["domain"]
    if domain is not None and not isinstance(domain, str):
        return f"\"domain\" must be a string or null, got {domain!r}"
    try:  # a label the monitor refuses ("", "none", " code") was reported as a domain of its own
        check_domain_label(domain)
    except MonitorError as exc:
        return f"\"domain\": {exc}"
    for key in ("tokens", "dormant_heads"):
        if not _is_count(record[key]):
            return f"\"{key}\" must be an integer >= 0, got {record[key]!r}"
    share = record["sink_share"]
    if not isinstance(share, list) or not share or not all(
            isinstance(heads, list) and all(_is_number(x) for x in heads) for heads in share):
        return "\"sink_share\" must be a non-empty list of per-layer lists of numbers (or null)"
    outside = next(((layer, head, x) for layer, heads in enumerate(share) for head, x in enumerate(heads)
                    if not _is_share(x)), None)
    if outside is not None:  # a share is a fraction of the attention mass
        layer, head, value = outside
        return f"\"sink_share\" must lie in [0, 1] (or be null), got {value!r} at layer {layer}, head {head}"
    layers, widths = len(share), [len(heads) for heads in share]
    dormancy, hidden = record["dormancy"], record["hidden_sinks"]
    if not isinstance(dormancy, list) or [len(h) if isinstance(h, list) else -1 for h in dormancy] != widths \
            or not all(_is_number(x) for h in dormancy for x in h):
        return f"\"dormancy\" must hold one number (or null) per head of \"sink_share\" ({layers} layers)"
    outside = next(((layer, head, x) for layer, heads in enumerate(dormancy) for head, x in enumerate(heads)
                    if x is not None and not 0 <= x <= MAX_LOGGED_DORMANCY), None)
    if outside is not None:  # a dormancy of -3 or 5 is no estimate any monitor writes
        layer, head, value = outside
        return (f"\"dormancy\" must lie in [0, 1] (or be null; an estimate up to {MAX_LOGGED_DORMANCY:g} is read "
                f"as 1), got {value!r} at layer {layer}, head {head}")
    if not isinstance(hidden, list) or [len(h) if isinstance(h, list) else -1 for h in hidden] != widths \
            or not all(_is_count(x) for h in hidden for x in h):
        return f"\"hidden_sinks\" must hold one integer >= 0 per head of \"sink_share\" ({layers} layers)"
    for key in ("rows", "residual_peak"):
        values = record[key]
        ok = isinstance(values, list) and len(values) == layers and all(
            _is_count(x) if key == "rows" else _is_number(x) and (x is None or x >= 0) for x in values)
        if not ok:  # a peak is a ratio of two norms: a negative one was averaged into the report as it was
            kind = "integer >= 0" if key == "rows" else "number >= 0 (or null)"
            return f"\"{key}\" must be a list of one {kind} per layer ({layers} layers, as \"sink_share\")"
    guard = record.get("guard")
    if guard is not None and not (isinstance(guard, dict) and isinstance(guard.get("tripped", False), bool)):
        return f"\"guard\" must be null or an object whose \"tripped\" is true or false, got {guard!r}"
    correction = record.get("correction")
    if correction is not None and not (isinstance(correction, dict) and isinstance(
            correction.get("identity_layers", []), list)):
        return f"\"correction\" must be null or an object whose \"identity_layers\" is a list, got {correction!r}"
    return None


def _shape(record: dict) -> tuple[int, ...]:
    """Heads per layer: what the records of one model share."""
    return tuple(len(heads) for heads in record["sink_share"])


def read_log(path: str | Path) -> list[dict]:
    """The records of a JSON-lines telemetry log; every problem is a :class:`MonitorError` naming the line."""
    p = Path(path)
    try:
        lines = json_lines(p.read_text(encoding="utf-8-sig"))  # at "\n" only, as request files (json_lines says why)
    except FileNotFoundError:
        raise MonitorError(f"telemetry log not found: {p}") from None
    except UnicodeDecodeError:  # Python's message gave a byte offset within the block being decoded
        raise MonitorError(f"telemetry log {p} is not UTF-8 text: {utf8_problem(p)}") from None
    except OSError as exc:
        raise MonitorError(f"cannot read telemetry log {p}: {exc}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        constants = []  # Infinity, -Infinity, NaN: json.loads reads them; the writer never writes them
        try:
            record = json.loads(line, parse_constant=lambda name: constants.append(name) or float(name))
        except json.JSONDecodeError as exc:
            raise MonitorError(f"{p}, line {number}: not JSON ({json_error(exc)})") from None
        except RecursionError:  # arrays nested thousands deep: json's decoder recurses once per level
            raise MonitorError(f"{p}, line {number}: not a telemetry record (JSON nested too deeply to read)") \
                from None
        records.append(_check_record(record, number, str(p), non_finite=bool(constants)))
    if not records:
        raise MonitorError(f"telemetry log {p} holds no record")
    return records


def _matrix(rows: list[list]) -> torch.Tensor:
    """Ragged per-layer lists (None = NaN) as an [L, max width] fp64 tensor, NaN-padded."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([[math.nan if x is None else x for x in r] + [math.nan] * (width - len(r)) for r in rows],
                        dtype=torch.float64)


@dataclass
class DomainSummary:
    """One domain's requests pooled (per layer and head: row-weighted means)."""

    name: str
    requests: int
    tokens: int
    sink_share: torch.Tensor  # [L, H]
    dormancy: torch.Tensor  # [L, H]
    dormant_heads: float  # mean per request with a defined dormancy (NaN: none has one)
    residual_peak: torch.Tensor  # [L] mean per request with a defined peak
    hidden_sinks: torch.Tensor  # [L] mean per request (all heads)
    guard_trips: int  # requests whose prompt left the guard's ranges (guard.tripped)
    served_without_correction: int  # requests served with the correction off in a layer (correction.identity_layers)
    share_samples: list[list[float]] = field(default_factory=list)  # [L] every head of every request

    def to_dict(self) -> dict:
        def clean(t: torch.Tensor):
            return [clean(x) for x in t] if t.ndim else (None if math.isnan(float(t)) else round(float(t), 6))

        return {"requests": self.requests, "tokens": self.tokens, "sink_share": clean(self.sink_share),
                "dormancy": clean(self.dormancy),
                "dormant_heads_mean": None if math.isnan(self.dormant_heads) else round(self.dormant_heads, 3),
                "residual_peak_mean": clean(self.residual_peak), "hidden_sinks_mean": clean(self.hidden_sinks),
                "guard_trips": self.guard_trips, "served_without_correction": self.served_without_correction}


def _pool(name: str, records: list[dict]) -> DomainSummary:
    """One domain's records pooled. Each per-head quantity is weighted by its own mask: a request's
    rows count for the sink share where its share is defined and for the dormancy where its dormancy
    is (the two are null in different places: a prompt that held no sink key has a null dormancy and
    a defined share, a sink set that named no key a null share and possibly a defined dormancy).
    Weighted by the share's mask, a null dormancy was read as 0 (a head dormant at 0.8 in the only
    request that defined it was pooled to 0.4, active, and listed as a flip) and a defined dormancy
    with a null share was dropped. Residual peaks are means over the requests that define them, and
    the dormant-head count a mean over the requests with at least one defined dormancy (a request
    without any has no count of dormant heads, not 0 of them)."""
    share_sum = dorm_sum = share_weight = dorm_weight = None
    peaks, hidden, samples, dormant_counts = [], [], None, []
    for record in records:
        rows = torch.tensor(record["rows"], dtype=torch.float64)[:, None]  # [L, 1]
        share, dormancy = _matrix(record["sink_share"]), _matrix(record["dormancy"]).clamp(max=1.0)
        weight = torch.where(share.isnan(), 0.0, rows.expand_as(share))
        share_sum = share.nan_to_num(0) * weight + (0 if share_sum is None else share_sum)
        share_weight = weight + (0 if share_weight is None else share_weight)
        weight = torch.where(dormancy.isnan(), 0.0, rows.expand_as(dormancy))
        dorm_sum = dormancy.nan_to_num(0) * weight + (0 if dorm_sum is None else dorm_sum)
        dorm_weight = weight + (0 if dorm_weight is None else dorm_weight)
        if not dormancy.isnan().all():
            dormant_counts.append(record["dormant_heads"])
        peaks.append(_matrix([record["residual_peak"]])[0])
        hidden.append(torch.tensor([sum(h) for h in record["hidden_sinks"]], dtype=torch.float64))
        samples = samples or [[] for _ in record["sink_share"]]
        for layer, heads in enumerate(record["sink_share"]):
            samples[layer].extend(x for x in heads if x is not None)
    def mean(total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.where(weight > 0, total / weight.clamp(min=1), math.nan)

    # the two differ (outputs.guard_tripped says how): both are reported, as Prometheus counts both
    trips = sum(1 for r in records if guard_tripped(r))
    fallbacks = sum(1 for r in records if served_without_correction(r))
    dormant = sum(dormant_counts) / len(dormant_counts) if dormant_counts else math.nan
    return DomainSummary(name, len(records), sum(int(r["tokens"]) for r in records), mean(share_sum, share_weight),
                         mean(dorm_sum, dorm_weight), dormant, torch.stack(peaks).nanmean(0),
                         torch.stack(hidden).mean(0), trips, fallbacks, samples)


@dataclass
class MonitorReport:
    domains: dict[str, DomainSummary]
    flips: list[dict]
    models: list[str]
    margin: float
    #: the corrections the records were served with (their ``policy``): more than one pools them per domain
    policies: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": "sinkfix-monitor-report", "version": 1, "models": self.models, "policies": self.policies,
                "dormant_threshold": DORMANT_THRESHOLD, "flip_margin": self.margin,
                "domains": {name: d.to_dict() for name, d in self.domains.items()}, "flips": self.flips}


def check_margin(margin, name: str = "margin") -> float:
    """The flip margin, checked as :func:`sinkfix.analysis.inspection.check_flip_margin` does; anything
    outside [0, :data:`MAX_MARGIN`) is a :class:`MonitorError`."""
    return check_flip_margin(margin, name, MonitorError)


def summarise(records: list[dict], *, margin: float = 0.05) -> MonitorReport:
    """Group ``records`` by domain (requests without one under "none") and find the flipping heads
    (``margin``: :func:`check_margin`)."""
    margin = check_margin(margin)
    by_domain: dict[str, list[dict]] = {}
    for record in records:
        by_domain.setdefault(record["domain"] if record["domain"] is not None else NO_DOMAIN, []).append(record)
    widths = {len(r["sink_share"]) for r in records}
    if len(widths) > 1:
        raise MonitorError(f"the log mixes models with {sorted(widths)} layers; report one model at a time")
    shapes = {_shape(r) for r in records}
    if len(shapes) > 1:
        described = sorted({"/".join(map(str, sorted(set(shape)))) for shape in shapes})
        raise MonitorError(f"the log mixes models with different head counts ({', '.join(described)} heads per "
                           "layer); report one model at a time")
    domains = {name: _pool(name, group) for name, group in sorted(by_domain.items())}
    flips = dormancy_flips({name: d.dormancy for name, d in domains.items()}, margin)
    models = sorted({str(r.get("model")) for r in records})
    policies = sorted({str(r["policy"]) for r in records if r.get("policy") is not None})
    return MonitorReport(domains, flips, models, margin, policies)


def _literal(text: str) -> str:
    """``text`` as matplotlib shows it literally: a ``$`` starts its math mode, so a domain
    ``price $\\x$`` failed the whole report ("Unknown symbol") and ``$5 and $6`` showed as "5and6";
    and a legend leaves out a label that starts with ``_`` (a domain ``_internal`` had a box and no
    entry), so such a label is shown after a space."""
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


#: characters of a domain label the figure's legend shows (report.json and the tables keep it whole):
#: a 150-character label made the PNG 8910 px wide
LEGEND_LABEL_CHARS = 40


def _legend_label(name: str) -> str:
    return name if len(name) <= LEGEND_LABEL_CHARS else name[: LEGEND_LABEL_CHARS - 1] + "\u2026"


def write_figure(report: MonitorReport, path: str | Path) -> Path:
    """Per-layer sink-share distributions by domain (box plots: every head of every request), and
    the mean residual-peak ratio per layer, one PNG."""
    from sinkfix.analysis.plots import pyplot
    from sinkfix.files import save_figure

    plt = pyplot()
    names = list(report.domains)
    layers = len(next(iter(report.domains.values())).share_samples)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 0.45 * layers * max(1, len(names))), 7.5),
                                      height_ratios=[3, 2], constrained_layout=True)
    width = 0.8 / max(1, len(names))
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        summary = report.domains[name]
        positions = [layer - 0.4 + width * (i + 0.5) for layer in range(layers)]
        data = [s if s else [math.nan] for s in summary.share_samples]
        # the points beyond the whiskers drawn too: the figure shows every head's value (without them a
        # head at 0.20 under a whisker ending at 0.37 was not on it)
        boxes = top.boxplot(data, positions=positions, widths=width * 0.9, showfliers=True, patch_artist=True,
                            manage_ticks=False, flierprops=dict(marker=".", markersize=3, alpha=0.6,
                                                                markerfacecolor=colours(i), markeredgecolor="none"))
        for box in boxes["boxes"]:
            box.set(facecolor=colours(i), alpha=0.6)
        counted = f"{summary.requests} request{'' if summary.requests == 1 else 's'}"
        top.plot([], [], color=colours(i), linewidth=8, alpha=0.6, label=_literal(f"{_legend_label(name)} ({counted})"))
        bottom.plot(range(layers), summary.residual_peak.tolist(), marker="o", color=colours(i),
                    label=_literal(_legend_label(name)))
    top.set(xticks=range(layers), xlabel="layer", ylabel="sink share (per head, per request)", ylim=(0, 1),
            title=_literal(f"Sink share by layer and domain: {', '.join(report.models)}"))
    # beside the axes, not over them: inside, it covered the boxes of the last layers (Gemma3: 15-17)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    peaks = torch.stack([summary.residual_peak for summary in report.domains.values()])
    # a log scale needs one positive peak to draw: a log whose peaks are all null (no residual was
    # observed) raised matplotlib's "cannot be log-scaled" instead of writing the figure
    logarithmic = bool((peaks.nan_to_num(0.0) > 0).any())
    bottom.set(xticks=range(layers), xlabel="layer", ylabel="residual peak (max / median)",
               yscale="log" if logarithmic else "linear")
    if not logarithmic:
        bottom.text(0.5, 0.5, "no residual peak recorded", transform=bottom.transAxes, ha="center", va="center")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return save_figure(fig, path)
