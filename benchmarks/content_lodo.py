"""Leave-one-domain-out evaluation of hidden-sink (content-dependent) calibration, next to the
positional calibration of ``calibration_lodo.py`` on the same windows.

    python benchmarks/content_lodo.py run --mode hidden --act      # hidden-sink fits + ACT defaults
    python benchmarks/content_lodo.py run --mode combined          # hidden fits on the positional fits
    python benchmarks/content_lodo.py table                        # every saved run -> one Markdown table
    python benchmarks/content_lodo.py run --mode hidden --act --no-bos   # the no-BOS positional run's fits

``run`` reads the positional per-domain fits and scores that ``calibration_lodo.py run`` saved
(``benchmarks/results/calibration_lodo/``: SmolLM2-135M, 512-token windows, BOS first or, with
``--no-bos``, not), fits the per-head hidden-sink beta on each built-in domain's calibration
windows (`fit_hidden_domains`; ``combined``: on top of that domain's own positional fit, frozen),
then for each domain D rebuilds the content-mode profile from the other domains' fits with the
domain-robust selection (`content_profile`, itself a leave-one-domain-out over the other domains'
validation windows) and scores it on D's evaluation text: the first ``--eval-windows`` 512-token
windows (the positional run's protocol, non-overlapping) of D's evaluation split, the windows of
the positional table. ``--act`` also scores ACT's defaults (beta 0.4, threshold 0.1, every head:
nothing fitted) there.

Results (JSON, Markdown) go to ``benchmarks/results/content_lodo/``; fits and scores are saved as
they are made and reused when the run is repeated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import calibration_lodo as positional_lodo  # noqa: E402  (the positional run's saved files)

import sinkfix  # noqa: E402
from sinkfix.analysis.calibration import DomainFits  # noqa: E402
from sinkfix.analysis.content_calibration import (HiddenFits, HiddenSettings, build_content,  # noqa: E402
                                                  content_candidates, content_key, content_profile,
                                                  fit_hidden_domains)
from sinkfix.analysis.lodo import evaluation_windows  # noqa: E402
from sinkfix.analysis.robust import candidates  # noqa: E402
from sinkfix.evaluate import windows_nll  # noqa: E402
from sinkfix.files import atomic_write_text  # noqa: E402
from sinkfix.texts import domain_text  # noqa: E402

OUT = Path(__file__).parent / "results" / "content_lodo"
POSITIONAL = positional_lodo.DEFAULT_OUT


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _save(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


class _Saved(dict):
    """NLLs keyed (domain, digest), written to ``path`` after every new entry."""

    def __init__(self, path: Path, seed: dict | None = None) -> None:
        super().__init__(seed or {})
        saved = _load(path) or {}
        super().update({tuple(k.split("|", 1)): v for k, v in saved.items()})
        self.path = path

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        _save(self.path, {"|".join(k): v for k, v in self.items()})


def _timing(start_wall: float, start_cpu: float) -> dict:
    return {"wall_s": round(time.perf_counter() - start_wall, 1), "cpu_s": round(time.process_time() - start_cpu, 1),
            "threads": torch.get_num_threads()}


def run(args) -> int:
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    tag = positional_lodo._tag(args.model, args.bos)
    saved_fits = _load(POSITIONAL / f"fits-{tag}.json")
    table = _positional_table(tag)
    if saved_fits is None or table is None:
        print(f"needs fits-{tag}.json and table-{tag}.json or lodo-{tag}.json under {POSITIONAL} "
              "(calibration_lodo.py)", file=sys.stderr)
        return 1
    model, tokenizer = sinkfix.load_model(args.model)
    domains = list(saved_fits["fits"])
    calib = {d: domain_text(d, "calib") for d in domains}
    pfits = DomainFits.from_dict(saved_fits, tokenizer, calib)
    scores = positional_lodo._saved_scores(POSITIONAL, tag)
    combined = args.mode == "combined"
    bases = {d: pfits.fits[d].parameters for d in domains} if combined else None
    fits_path = OUT / f"fits-{args.mode}-{tag}.json"
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if (saved := _load(fits_path)) is not None:
        hfits = HiddenFits.from_dict(saved, tokenizer, calib, bases)
        fit_timing = saved["timing"]
    else:
        hidden = HiddenSettings(steps=args.steps, eval_every=args.eval_every, lr=args.lr)
        hfits = fit_hidden_domains(model, tokenizer, calib, pfits.settings, hidden, bases=bases,
                                   stock={d: pfits.fits[d].val_before for d in domains}, log=print)
        fit_timing = _timing(start_wall, start_cpu)
        _save(fits_path, {**hfits.to_dict(), "timing": fit_timing})
    val = _Saved(OUT / f"cache-val-{args.mode}-{tag}.json", scores["val"])
    ev = _Saved(OUT / f"cache-eval-{args.mode}-{tag}.json", scores["eval"])
    windows, _ = evaluation_windows(tokenizer, {d: domain_text(d, "eval") for d in domains}, pfits, args.eval_windows)
    shape = pfits.shape

    def evaluate(params, d: str) -> float:
        key = content_key(params, d)
        if key not in ev:
            from sinkfix.analysis.content_calibration import _content_policy

            with torch.no_grad(), sinkfix.patch(model, _content_policy(pfits.settings, hfits.hidden.threshold, params),
                                                backend="torch"):
                total, count = windows_nll(model, windows[d])
            ev[key] = total / max(count, 1)
        return ev[key]

    rows = []
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    for d in args.held_out or domains:
        others = [o for o in domains if o != d]
        row = {"domain": d, "tokens": sum(int((w.labels[1:] != -100).sum()) for w in windows[d])}
        unpatched = (torch.ones(shape), None)  # positional identity
        stock = evaluate((unpatched, None), d)
        row["stock_nll"], row["stock_ppl"] = stock, math.exp(stock)
        saved_row = next(r for r in table["rows"] if r["domain"] == d)
        positional = next(c for c in candidates() if c.name == saved_row["robust_chosen"]) if combined else None
        profile = content_profile(model, hfits, pfits if combined else None, positional, others, cache=val,
                                  score_chosen=False, log=print)
        rule = profile.content_sinks
        logit = profile.virtual_sink_logit
        params = ((profile.sink_scale.float(), None if logit is None else logit.float()) if combined else
                  (torch.ones(shape), None),
                  torch.as_tensor(rule.hidden_sink_scale).float())
        if not bool(torch.as_tensor(rule.heads).any()):
            params = (params[0], None)
        nll = evaluate(params, d)
        row.update(chosen=profile.calibration["selection"]["chosen"], change=math.exp(nll - stock) - 1,
                   heads=profile.calibration["heads_chosen"], selection=profile.calibration["selection"])
        if args.act:
            act = evaluate((unpatched, torch.full(shape, 0.4)), d)
            row["act_change"] = math.exp(act - stock) - 1
            # ACT's head selection made on calibration text: the heads the other domains' fits
            # (combined by "mean") want corrected, with ACT's beta 0.4 on them
            mean = next(c for c in content_candidates() if c.name == "hidden mean x1")
            heads = build_content(mean, others, hfits)[1] < 1
            row["act_heads"] = int(heads.sum())
            if row["act_heads"]:
                chosen_act = evaluate((unpatched, torch.where(heads, 0.4, 1.0)), d)
                row["act_chosen_change"] = math.exp(chosen_act - stock) - 1
            else:
                row["act_chosen_change"] = 0.0
        print(json.dumps({k: v for k, v in row.items() if k != "selection"}), flush=True)
        rows.append(row)
        _save(OUT / f"lodo-{args.mode}-{tag}.json", {
            "model": args.model, "mode": args.mode, "protocol": {**pfits.settings.protocol(),
                                                                 "eval_windows": args.eval_windows},
            "hidden": hfits.to_dict()["hidden"], "fit_timing": fit_timing,
            "lodo_timing": _timing(start_wall, start_cpu), "fits": {d: f.record() for d, f in hfits.fits.items()},
            "rows": rows})
    return 0


def _positional_table(tag: str) -> dict | None:
    """The positional leave-one-domain-out rows of ``calibration_lodo.py``: its ``table`` file (the
    parts merged), or else the file one whole ``run`` wrote, whose rows name the same numbers
    ``without_change`` / ``without_chosen``."""
    table = _load(POSITIONAL / f"table-{tag}.json")
    if table is not None:
        return table
    run = _load(POSITIONAL / f"lodo-{tag}.json")
    if run is None:
        return None
    rows = [{**r, "robust_change": r["without_change"], "robust_chosen": r["without_chosen"]} for r in run["rows"]]
    return {**run, "rows": rows}


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:+.2f}%"


def table(args) -> int:
    tag = positional_lodo._tag(args.model, args.bos)
    positional = _positional_table(tag)
    runs = {m: _load(OUT / f"lodo-{m}-{tag}.json") for m in ("hidden", "combined")}
    by = {m: {r["domain"]: r for r in (data or {}).get("rows", [])} for m, data in runs.items()}
    proto = positional["protocol"]
    lines = [f"**{args.model}, {'BOS' if args.bos else 'no BOS'}**, {proto['seq_len']}-token windows, first {proto['eval_windows']} windows of "
             "each domain's evaluation text (built-in splits); perplexity change vs the unpatched model; every "
             "calibrated column is leave-one-domain-out (the domain's text was in no fit and no selection)", "",
             "| domain | scored tokens | unpatched ppl | best global beta | ACT defaults, all heads "
             "| ACT, heads chosen on calibration text (heads) "
             "| hidden-sink profile (chosen) | positional profile (chosen) | combined profile (chosen) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in positional["rows"]:
        d = r["domain"]
        h, c = by["hidden"].get(d, {}), by["combined"].get(d, {})
        lines.append(
            f"| {d} | {r['tokens']} | {r['stock_ppl']:.3f} | {_pct(r['best_global_change'])} ({r['best_global_beta']:g}) "
            f"| {_pct(h.get('act_change'))} | {_pct(h.get('act_chosen_change'))} ({h.get('act_heads', '-')}) "
            f"| {_pct(h.get('change'))} ({h.get('chosen', '-')}) "
            f"| {_pct(r['robust_change'])} ({r['robust_chosen']}) | {_pct(c.get('change'))} ({c.get('chosen', '-')}) |")
    text = "\n".join(lines)
    atomic_write_text(OUT / f"table-{tag}.md", text + "\n")
    print(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="fit hidden sinks per domain, rebuild without each domain, evaluate")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--mode", choices=("hidden", "combined"), required=True)
    r.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True,
                   help="the protocol of the positional run whose fits and windows are used (default: BOS)")
    r.add_argument("--steps", type=int, default=50, help="hidden-sink Adam steps in all, split among the domains")
    r.add_argument("--eval-every", type=int, default=5)
    r.add_argument("--lr", type=float, default=0.2)
    r.add_argument("--eval-windows", type=int, default=4)
    r.add_argument("--held-out", action="append", help="only these rows (default: every domain)")
    r.add_argument("--act", action="store_true", help="also score ACT's defaults on every head")
    r.add_argument("--threads", type=int, default=1)
    r.set_defaults(fn=run)
    t = sub.add_parser("table", help="saved runs -> Markdown")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True)
    t.set_defaults(fn=table)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
