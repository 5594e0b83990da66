"""The paired table and the JSON text of a ``sinkfix eval`` report (layout: ``sinkfix/lmeval/schema.md``)."""

from __future__ import annotations

import math
from typing import Any

from sinkfix.files import strict_json

__all__ = ["render", "dumps", "table_rows", "protocol_lines", "confidence_label"]

_DIRECTION = {True: " ↑", False: " ↓", None: ""}


#: from here on a number is printed in scientific notation: a word perplexity of text without spaces
#: reaches 1e38, whose 42 fixed-point characters the table cropped to "22588639603395789…" (read as 2e16)
_SCIENTIFIC_FROM = 1e6


def _number(x: float, signed: bool = False) -> str:
    if not math.isfinite(x):
        return str(x)
    sign = "+" if signed else ""
    if abs(x) >= _SCIENTIFIC_FROM:
        return f"{x:{sign}.4e}"
    digits = 4 if abs(x) < 100 else 2
    return f"{x:{sign}.{digits}f}"


def _test(m: dict[str, Any]) -> str:
    p = f"{m['p_value']:.3g}"
    if m["test"] == "mcnemar-exact":
        return f"{p} McNemar ({m['stock_only']} lost, {m['corrected_only']} gained)"
    if m["test"] == "sign-flip-exact":  # every swap pattern counted: the p-value itself
        return f"{p} sign-flip"
    # drawn patterns (or, in reports written before 2026-12-05, bootstrap draws): at its floor the
    # p-value is only known to be at most that
    random = m["test"] == "sign-flip-random"
    floor = (1 if random else 2) / (m["iterations"] + 1)
    name = "sign-flip" if random else "bootstrap"
    return f"<={floor:.2g} {name}" if m["p_value"] <= floor * (1 + 1e-9) else f"{p} {name}"


def _bound(value: float | None) -> str:
    return "unbounded" if value is None or not math.isfinite(value) else _number(value, True)


def _interval(m: dict[str, Any]) -> str:
    """The interval cell; null bounds (NaN before the JSON) said as what they are (a "[nan, nan]" cell
    was read as a markup tag and printed empty)."""
    if m["items"] < 2:
        return "n/a: one item"
    undefined = m.get("undefined_draws") or 0
    cell = f"[{_bound(m['ci_low'])}, {_bound(m['ci_high'])}]"
    return cell if not undefined else f"{cell}, {undefined} of {m['iterations']} draws undefined"


def confidence_label(confidence: float) -> str:
    """``95%``, ``99.9%``: as given, never rounded to a whole percent (0.999 printed as "100%")."""
    return f"{100 * confidence:.10g}%"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per task and metric: task, metric, items, stock, corrected, delta, interval, p-value."""
    rows = []
    for task, entry in report["tasks"].items():
        for metric, m in entry["metrics"].items():
            rows.append([task, metric + _DIRECTION[m["higher_is_better"]], str(m["items"]), _number(m["stock"]),
                         _number(m["corrected"]), _number(m["delta"], signed=True), _interval(m), _test(m)])
    return rows


def protocol_lines(report: dict[str, Any]) -> list[str]:
    settings, protocol = report["settings"], report["protocol"]
    level = confidence_label(settings["confidence"])
    some = next((m for e in report["tasks"].values() for m in e["metrics"].values()), None)
    draws = some["iterations"] if some else settings["iterations"]
    return [
        (f"{report['model']['name']} stock vs {report['correction']['description']}: the same items, one model "
         f"load; lm-eval {report['versions']['lm_eval']}, {protocol['device']}, batch {protocol['batch_size']}, "
         f"{report['threads']} thread(s)"),
        (f"delta = corrected - stock; {level} paired-bootstrap percentile interval over items ({draws} draws, "
         f"seed {settings['seed']}; none with one item); p: McNemar's exact test for 0/1 metrics, else the paired "
         f"sign-flip test (exact up to 12 items)"),
        # said only where a rolling task ran (a multiple-choice run printed it too, as if scored that way);
        # a report without output types keeps the line
        *([f"rolling log-likelihood: each document scored once from its start after prefix token "
           f"{protocol['prefix_token_id']}, windows of {protocol['max_length']} tokens"]
          if any(e.get("output_type", "loglikelihood_rolling") == "loglikelihood_rolling"
                 for e in report["tasks"].values()) else []),
        "↑/↓: higher/lower is better",
    ]


def render(report: dict[str, Any], console: Any) -> None:
    """Print the paired table and its protocol lines on a rich console."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="sinkfix eval: stock vs corrected", title_justify="left")
    for header in ("task", "metric", "items", "stock", "corrected", "delta"):
        table.add_column(header, justify="left" if header in ("task", "metric") else "right")
    table.add_column(f"{confidence_label(report['settings']['confidence'])} CI of delta", justify="right")
    table.add_column("p", justify="left")
    for row in table_rows(report):
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    for line in protocol_lines(report):
        console.print(line, markup=False, highlight=False)
    timing = report["timing_s"]
    console.print(f"time: {timing.get('total', float('nan')):.0f} s in all (" +
                  ", ".join(f"{k} {v:.0f} s" for k, v in timing.items() if k != "total") + ")",
                  markup=False, highlight=False)


def dumps(report: dict[str, Any]) -> str:
    """The report as JSON text; non-finite numbers (a metric that overflowed) become null."""
    return strict_json(report, indent=1)


