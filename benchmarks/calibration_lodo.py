"""Leave-one-domain-out evaluation of `sinkfix calibrate`'s defaults, on the built-in domains.

    python benchmarks/calibration_lodo.py run --model smollm2-135m --bos          # one model, one protocol
    python benchmarks/calibration_lodo.py run --model smollm2-135m --no-bos --analyses
    python benchmarks/calibration_lodo.py report                                  # every run -> one table
    python benchmarks/calibration_lodo.py profile --profile-out smollm2.profile.json  # the default profile
    python benchmarks/calibration_lodo.py pool --model smollm2-135m --no-bos       # a wider candidate pool
    python benchmarks/calibration_lodo.py intervals --eval-windows 16             # how sure each row is
    python benchmarks/calibration_lodo.py analyses --no-bos                       # own fits on every domain

``run`` fits every built-in domain on its own (`sinkfix.analysis.calibration.fit_domains`, the
defaults of `sinkfix calibrate`), then, for each domain, rebuilds the robust profile without it and
scores it on that domain's evaluation text, next to the unpatched model and the best single global
beta (`sinkfix.analysis.lodo`); the profile built from every domain is scored on every domain too.
Protocol of every number: the calibration's window protocol (512-token windows, BOS first or not),
non-overlapping, each token scored once, the first ``--eval-windows`` windows of each domain's
evaluation split (sources disjoint from its calibration split, `sinkfix.texts`).

``--analyses`` adds what the choice of the robust rule rests on (docs/calibration.md):

* every candidate of the pool, rebuilt without each domain, on that domain (no selection: what each
  fixed rule would have done on the unseen domain);
* every domain's own fit on every domain (a domain-aware profile's best case on its own domain,
  and what picking the wrong domain's fit costs on another);
* ``--pooled-baseline``: the previous default (one fit on pydoc + python pooled, 16384 tokens per
  domain, 120 steps) on every domain.

On a busy machine the work can be spread over processes that share the saved scores, and the table
written from whatever they finished (this is how the README's table was made):

    python benchmarks/calibration_lodo.py run --bos                                   # robust-rule rows, in order
    python benchmarks/calibration_lodo.py run --bos --part c --full-chosen "mean x1"  # profile from all five
    python benchmarks/calibration_lodo.py run --bos --part g --fixed "mean x1" --held-out python --held-out readme
    python benchmarks/calibration_lodo.py run --bos --finished-only --watch 150 --fixed "mean x1" --full-chosen "mean x1"
    python benchmarks/calibration_lodo.py table                                       # table-*.json -> Markdown

``--fixed`` scores one candidate rebuilt without each domain, without a selection; ``--full-chosen``
scores the candidate an earlier selection on every domain chose, without repeating it. Every
column of the table says which it is.

``intervals`` scores a run's rows window by window (the same fits, selections and evaluation windows)
and gives every change a 95% interval over resampled windows (`sinkfix.analysis.lodo.change_intervals`:
the best global beta chosen again in each draw), so that a row that misses a target by a few
hundredths of a point can be told from one that misses it for sure. Its token-weighted means are
the table's: it checks them against the run's saved scores where they exist.

Everything is written to ``--out`` (JSON and Markdown), with the wall time, the CPU time and the
load average, and fits and scores are reused from there when the run is repeated (delete the files
to start over). The machine this was developed on is shared: the times are what they were.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import sinkfix
from sinkfix.analysis.calibration import (FIT_PRECISIONS, CalibrationSettings, Calibrator, DomainFits, calibrate,
                                          fit_domains, parameters_key, robust_profile)
from sinkfix.analysis.lodo import (GLOBAL_SWEEP, LodoResult, baseline_jobs, evaluate_parameters, evaluation_windows,
                                  leave_one_domain_out)
from sinkfix.analysis.robust import IDENTITY, Candidate, candidate_parameters, candidates, select
from sinkfix.files import atomic_write_text
from sinkfix.texts import DOMAINS, QUICK_DOMAINS, domain_source, domain_text

DEFAULT_OUT = Path(__file__).parent / "results" / "calibration_lodo"
# Fixed rules scored on unseen domains by --analyses: the default pool's combinations and more.
ANALYSIS_POOL = [c for c in candidates([("consensus", 1.0), ("consensus", 0.5), ("mean", 1.0), ("mean", 0.5)],
                                       global_betas=()) if c.uses_fits]


def _tag(model: str, bos: bool) -> str:
    return f"{model}-{'bos' if bos else 'nobos'}"


class _Clock:
    """Wall and CPU seconds of a stage, and the load average around it."""

    def __init__(self) -> None:
        self.wall, self.cpu, self.load_before = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    def done(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 1), "cpu_s": round(time.process_time() - self.cpu, 1),
                "load_before": round(self.load_before, 2), "load_after": round(os.getloadavg()[0], 2),
                "threads": torch.get_num_threads()}


def _load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _json_ready(value):
    """``value`` with every float that is not finite (a row a run did not reach, a one-window interval's
    bounds) as None: json.dumps wrote them as the literals NaN and Infinity, which are not JSON (sinkfix's
    own readers and strict parsers refuse them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def _save_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(_json_ready(data), indent=1, allow_nan=False) + "\n")


def _missing(x) -> bool:
    """A number not measured: null in the files written since NaN is written as null, NaN in older ones."""
    return x is None or x != x


class _SavedCache(dict):
    """An NLL cache that writes itself (through ``save``) after every new entry: a run stopped half-way
    keeps every forward pass it paid for."""

    def __init__(self, entries: dict, save) -> None:
        super().__init__(entries)
        self._save = save

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._save()


#: Evaluation windows per domain unless ``--eval-windows`` says otherwise; every cache saved before
#: other counts existed holds scores on this many.
DEFAULT_EVAL_WINDOWS = 4


def _eval_name(eval_windows: int) -> str:
    """The cache of scores on the first ``eval_windows`` windows of each evaluation text: "eval" for
    the default count, "eval-Nw" otherwise. Its keys name the parameters and the domain only, so a
    score on 4 windows must never answer for 16."""
    return "eval" if eval_windows == DEFAULT_EVAL_WINDOWS else f"eval-{eval_windows}w"


class _CacheFile(dict):
    """The NLL caches of one file as ``{"val": the selection's, "eval": the evaluation text's at one
    window count}``, saved with "domain|digest" keys. ``save()`` writes every cache the file holds,
    those of other window counts included."""

    def __init__(self, path: Path, eval_windows: int = DEFAULT_EVAL_WINDOWS) -> None:
        self._path = path
        data = _load_json(path) or {}
        self._stored = {name: _SavedCache({tuple(k.split("|", 1)): v for k, v in entries.items()}, self.save)
                        for name, entries in data.items()}
        for name in ("val", _eval_name(eval_windows)):
            self._stored.setdefault(name, _SavedCache({}, self.save))
        super().__init__(val=self._stored["val"], eval=self._stored[_eval_name(eval_windows)])

    def save(self) -> None:
        _save_json(self._path, {name: {"|".join(k): v for k, v in entries.items()}
                                for name, entries in self._stored.items()})


def _cache(path: Path, eval_windows: int = DEFAULT_EVAL_WINDOWS) -> _CacheFile:
    return _CacheFile(path, eval_windows)


def _saved_scores(out: Path, tag: str, eval_windows: int = DEFAULT_EVAL_WINDOWS) -> dict:
    """Every score the cache files of one model and protocol hold (a run's and its parts'), merged
    into plain dicts: {"val": ..., "eval": ...} (evaluation scores at ``eval_windows`` windows)."""
    merged: dict = {"val": {}, "eval": {}}
    for path in sorted(out.glob(f"cache-{tag}*.json")):
        for name, entries in _cache(path, eval_windows).items():
            dict.update(merged[name], entries)
    return merged


class _NotScored(KeyError):
    """A score the stopped run did not reach."""


class _ScoredOnly(dict):
    """A cache that claims every key and raises :class:`_NotScored` for the ones it lacks: the library
    functions then run without a single forward pass, or stop where the run stopped."""

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key):
        if not dict.__contains__(self, key):
            raise _NotScored(key)
        return dict.__getitem__(self, key)


def _rows(model, tokenizer, fits: DomainFits, args, val: dict, ev: dict, held_out, full: bool,
          full_chosen: str | None = None) -> LodoResult:
    """The rows of ``held_out`` (and the profile from every domain, if ``full``), computed exactly as
    :func:`leave_one_domain_out` does. With :class:`_ScoredOnly` caches, a row the run did not finish
    is left out, and the profile from every domain reads "not reached" if it was not."""
    windows, sources = evaluation_windows(tokenizer, {d: domain_text(d, "eval") for d in fits.domains}, fits,
                                          args.eval_windows)
    shape, nll, chosen, selections = fits.shape, {}, {}, {}
    for d in held_out:
        try:
            profile = robust_profile(model, fits, [o for o in fits.domains if o != d], cache=val, score_chosen=False)
            jobs = {("stock", d): ((torch.ones(shape), None), d)}
            jobs.update({(b, d): ((torch.full(shape, b), None), d) for b in GLOBAL_SWEEP})
            jobs["without", d] = _profile_parameters(profile), d
            nll.update(evaluate_parameters(model, fits, windows, jobs, cache=ev))
            chosen[d] = profile.calibration["selection"]["chosen"]
            selections[d] = profile.calibration["selection"]
        except _NotScored:
            continue
    done = [d for d in held_out if d in chosen]
    chosen_all, with_all = "not reached", {d: math.nan for d in done}
    if full_chosen:  # the candidate a selection on every domain chose before, scored without repeating it
        try:
            candidate = next(c for c in candidates() if c.name == full_chosen)
            params = candidate_parameters(candidate, [fits.fits[d].parameters for d in fits.domains], shape)
            with Calibrator(model, fits.settings.on_sink_rows) as cal:
                for d in fits.domains:
                    key = parameters_key(params, d)
                    if key not in val:
                        val[key] = cal.nll_with(params, fits.windows[d].val)
            with_all = {}
            for d in fits.domains:  # every domain (a part may compute no row of its own)
                try:
                    with_all[d] = evaluate_parameters(model, fits, windows, {d: (params, d)}, cache=ev)[d]
                except _NotScored:
                    with_all[d] = math.nan
            chosen_all = f"{full_chosen} (chosen by an earlier selection on every domain, same fits)"
            selections["all domains"] = {"chosen": full_chosen, "val_per_domain": {
                d: math.exp(val[parameters_key(params, d)] - fits.fits[d].val_before) - 1 for d in fits.domains}}
        except _NotScored:
            pass
    if full and not full_chosen:
        try:
            profile = robust_profile(model, fits, cache=val)
            with_all = evaluate_parameters(model, fits, windows, {d: (_profile_parameters(profile), d) for d in done},
                                           cache=ev)
            chosen_all = profile.calibration["selection"]["chosen"]
            selections["all domains"] = profile.calibration["selection"]
            selections["all domains"]["val_per_domain"] = profile.calibration["ppl_change"]["val_per_domain"]
        except _NotScored:
            pass
    tokens = {d: sum(int((w.labels[1:] != -100).sum()) for w in windows[d]) for d in done}
    return LodoResult({**fits.settings.protocol(), "eval_windows": args.eval_windows},
                      {d: sources[d] for d in done}, tokens, {d: nll["stock", d] for d in done},
                      {b: {d: nll[b, d] for d in done} for b in GLOBAL_SWEEP}, {d: nll["without", d] for d in done},
                      chosen, with_all, chosen_all, {"selections": selections})


def _fixed_rows(model, tokenizer, fits: DomainFits, args, ev: dict, held_out) -> None:
    """Unseen-domain scores of one fixed candidate (``--fixed``, no selection): for each domain of
    ``held_out``, the candidate built from the other domains' fits, the unpatched model and the global
    betas, on that domain's evaluation windows."""
    windows, _ = evaluation_windows(tokenizer, {d: domain_text(d, "eval") for d in fits.domains}, fits,
                                    args.eval_windows)
    fixed = next(c for c in candidates() if c.name == args.fixed)
    shape = fits.shape
    for d in held_out:
        others = [fits.fits[o].parameters for o in fits.domains if o != d]
        jobs = {("stock", d): ((torch.ones(shape), None), d), ("fixed", d): (candidate_parameters(fixed, others, shape), d)}
        jobs.update({(b, d): ((torch.full(shape, b), None), d) for b in GLOBAL_SWEEP})
        evaluate_parameters(model, fits, windows, jobs, cache=ev)


def _table(model, tokenizer, fits: DomainFits, args, val: dict, ev: dict) -> dict:
    """Every column that the saved scores allow, per domain (NaN where a run did not get that far):
    the unpatched model, the global betas, the robust rule rebuilt without the domain, the fixed
    candidate rebuilt without it, and the profile from every domain (``--full-chosen``)."""
    windows, sources = evaluation_windows(tokenizer, {d: domain_text(d, "eval") for d in fits.domains}, fits,
                                          args.eval_windows)
    shape = fits.shape
    every = [fits.fits[d].parameters for d in fits.domains]

    def score(params, d) -> float:
        try:
            return evaluate_parameters(model, fits, windows, {0: (params, d)}, cache=ev, progress=False)[0]
        except _NotScored:
            return math.nan

    def candidate(name):
        return next(c for c in candidates() if c.name == name)

    rows = []
    for d in fits.domains:
        others = [fits.fits[o].parameters for o in fits.domains if o != d]
        stock = score((torch.ones(shape), None), d)
        change = {}
        for b in GLOBAL_SWEEP:
            change[f"global {b:g}"] = math.exp(score((torch.full(shape, b), None), d) - stock) - 1
        best = min([("1", 0.0)] + [(k.split()[1], v) for k, v in change.items() if v == v], key=lambda kv: kv[1])
        row = {"domain": d, "source": sources[d], "tokens": sum(int((w.labels[1:] != -100).sum()) for w in windows[d]),
               "stock_ppl": math.exp(stock), "best_global_beta": float(best[0]), "best_global_change": best[1],
               "global_changes": change, "robust_chosen": None, "robust_change": math.nan}
        try:
            profile = robust_profile(model, fits, [o for o in fits.domains if o != d], cache=val, progress=False,
                                     score_chosen=False)
            row["robust_chosen"] = profile.calibration["selection"]["chosen"]
            row["robust_selection"] = profile.calibration["selection"]
            row["robust_change"] = math.exp(score(_profile_parameters(profile), d) - stock) - 1
        except _NotScored:
            pass
        if args.fixed:
            row["fixed_change"] = math.exp(score(candidate_parameters(candidate(args.fixed), others, shape), d) - stock) - 1
        if args.full_chosen:
            row["with_change"] = math.exp(score(candidate_parameters(candidate(args.full_chosen), every, shape), d)
                                          - stock) - 1
        rows.append(row)
    return {"model": args.model, "bos": args.bos, "protocol": {**fits.settings.protocol(),
            "eval_windows": args.eval_windows}, "fixed": args.fixed, "full_chosen": args.full_chosen, "rows": rows}


def _table_markdown(data: dict) -> str:
    proto = data["protocol"]
    fixed, full = data["fixed"], data["full_chosen"]
    lines = [f"**{data['model']}, {'BOS' if data['bos'] else 'no BOS'}**, {proto['seq_len']}-token windows, stride "
             f"{proto['stride']}, first {proto['eval_windows']} windows of each domain's evaluation text; perplexity "
             "change vs the unpatched model ('-': not measured)", "",
             "| domain | scored tokens | unpatched ppl | best global beta | unseen: robust rule without it (chosen) "
             f"| unseen: `{fixed}` without it | calibrated: `{full}` from all five |", "|---|---|---|---|---|---|---|"]

    def pct(x) -> str:
        return "-" if _missing(x) else f"{100 * x:+.2f}%"

    for r in data["rows"]:
        robust = pct(r["robust_change"]) + (f" ({r['robust_chosen']})" if r["robust_chosen"] else "")
        if _missing(r["stock_ppl"]):  # the run did not score this domain
            lines.append(f"| {r['domain']} | {r['tokens']} | - | - | - | - | - |")
            continue
        lines.append(f"| {r['domain']} | {r['tokens']} | {r['stock_ppl']:.3f} | {pct(r['best_global_change'])} "
                     f"({r['best_global_beta']:g}) | {robust} | {pct(r.get('fixed_change'))} "
                     f"| {pct(r.get('with_change'))} |")
    return "\n".join(lines)


def _profile_parameters(profile) -> tuple:
    logit = profile.virtual_sink_logit
    return profile.sink_scale.float(), None if logit is None else logit.float()


def _fits(model, tokenizer, args, out: Path, texts: dict) -> tuple[DomainFits, dict]:
    path = out / f"fits-{_tag(args.model, args.bos)}.json"
    saved = _load_json(path)
    if saved is not None:
        print(f"reusing {path}")
        return DomainFits.from_dict(saved, tokenizer, texts), saved["timing"]
    settings = CalibrationSettings(seq_len=args.seq_len, bos=args.bos, **({"steps": args.steps} if args.steps else {}),
                                   **({"max_tokens": args.max_tokens} if args.max_tokens else {}),
                                   **({"reg": args.reg} if args.reg is not None else {}),
                                   precision=args.precision)
    clock = _Clock()
    fits = fit_domains(model, tokenizer, texts, settings, log=print)
    timing = clock.done()
    _save_json(path, {**fits.to_dict(), "timing": timing})
    return fits, timing


def _evaluation_windows(tokenizer, fits: DomainFits, args) -> dict:
    texts = {d: domain_text(d, "eval") for d in fits.domains}
    return evaluation_windows(tokenizer, texts, fits, args.eval_windows)[0]


def _select(model, fits: DomainFits, cache: dict, path: Path) -> dict:
    """The robust selection on every domain, timed on its own: with the fits, it is what `sinkfix
    calibrate` runs (its scores then seed the leave-one-domain-out cache)."""
    saved = _load_json(path)
    if saved is not None:  # timed before; leave_one_domain_out repeats the selection if the cache lacks it
        return saved
    clock, known = _Clock(), len(cache)
    robust_profile(model, fits, cache=cache, log=print)
    # a run that starts from another run's saved scores (a changed pool on the same fits) times only
    # the scores it had to add, and says so
    timing = {**clock.done(), "new_scores": len(cache) - known, "reused_scores": known}
    _save_json(path, timing)
    return timing


def _analyses(model, fits: DomainFits, windows: dict, eval_cache: dict) -> dict:
    """Fixed candidates on unseen domains, and every domain's own fit on every domain."""
    shape = fits.shape
    jobs = {}
    for held_out in fits.domains:
        others = [fits.fits[d].parameters for d in fits.domains if d != held_out]
        for c in ANALYSIS_POOL:
            jobs[f"without:{c.name}", held_out] = candidate_parameters(c, others, shape), held_out
        for d in fits.domains:
            jobs[f"fit:{d}", held_out] = fits.fits[d].parameters, held_out
    nll = evaluate_parameters(model, fits, windows, jobs, cache=eval_cache)
    table: dict = {}
    for (name, domain), value in nll.items():
        table.setdefault(name, {})[domain] = value
    table["recogniser"] = _domain_aware(fits, windows, model.get_input_embeddings().num_embeddings)
    return table


# -- a domain-aware profile, sketched: recognise the prompt's domain, apply that domain's own fit --------
def _unigram(windows: list, vocab: int, alpha: float = 0.1) -> torch.Tensor:
    counts = torch.bincount(torch.cat(windows), minlength=vocab).double() + alpha
    return (counts / counts.sum()).log()


def _recognise(models: dict, thresholds: dict, ids: torch.Tensor) -> str:
    """The domain whose unigram model explains ``ids`` best, or "unknown" when even that one explains it
    worse than every validation window of its own domain (less a margin of 1 nat per token)."""
    scores = {d: float(lp[ids].mean()) for d, lp in models.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] >= thresholds[best] else "unknown"


def _domain_aware(fits: DomainFits, windows: dict, vocab: int) -> dict:
    """For each domain left out: what a unigram recogniser trained on the others calls each of its
    evaluation windows (a known domain means that domain's own fit would be applied)."""
    out = {}
    for held_out in fits.domains:
        known = [d for d in fits.domains if d != held_out]
        models = {d: _unigram(fits.windows[d].calib, vocab) for d in known}
        thresholds = {d: min(float(models[d][w].mean()) for w in fits.windows[d].val) - 1.0 for d in known}
        calls = [_recognise(models, thresholds, w.input_ids) for w in windows[held_out]]
        out[held_out] = {name: calls.count(name) / len(calls) for name in sorted(set(calls))}
    models = {d: _unigram(fits.windows[d].calib, vocab) for d in fits.domains}
    thresholds = {d: min(float(models[d][w].mean()) for w in fits.windows[d].val) - 1.0 for d in fits.domains}
    known = {}
    for d in fits.domains:
        calls = [_recognise(models, thresholds, w.input_ids) for w in windows[d]]
        known[d] = {name: calls.count(name) / len(calls) for name in sorted(set(calls))}
    return {"unseen": out, "known": known}


def _pooled_baseline(model, tokenizer, args, fits: DomainFits, eval_cache: dict, out: Path) -> dict:
    """The previous default: pooled fit on the two Python domains, 16384 tokens each, 120 steps."""
    path = out / f"pooled-{_tag(args.model, args.bos)}.json"
    saved = _load_json(path)
    if saved is None:
        clock = _Clock()
        profile = calibrate(model, tokenizer, {d: domain_text(d, "calib") for d in QUICK_DOMAINS}, rule="pooled",
                            seq_len=args.seq_len, bos=args.bos, max_tokens=16384, steps=120, log=print)
        saved = {"profile": profile.to_dict(), "timing": clock.done()}
        _save_json(path, saved)
    profile = sinkfix.Profile.from_dict(saved["profile"])
    windows = _evaluation_windows(tokenizer, fits, args)
    logit = profile.virtual_sink_logit
    params = profile.sink_scale.float(), None if logit is None else logit.float()
    nll = evaluate_parameters(model, fits, windows, {d: (params, d) for d in fits.domains}, cache=eval_cache)
    return {"nll": nll, "timing": saved["timing"], "calibrated_on": list(QUICK_DOMAINS)}


def run(args) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = _tag(args.model, args.bos)
    model, tokenizer = sinkfix.load_model(args.model)
    domains = args.domain or list(DOMAINS)
    fits, fit_timing = _fits(model, tokenizer, args, out, {d: domain_text(d, "calib") for d in domains})
    cache_path = out / f"cache-{tag}.json"
    caches = _cache(cache_path, args.eval_windows)
    if args.part:  # one share of the rows, in a process of its own with a cache file of its own
        part_path = out / f"cache-{tag}-part-{args.part}.json"
        part = _cache(part_path, args.eval_windows)
        for name, entries in _saved_scores(out, tag, args.eval_windows).items():  # start from what every file knows
            dict.update(part[name], entries)
        if args.fixed:
            _fixed_rows(model, tokenizer, fits, args, part["eval"], args.held_out or [])
        else:
            _rows(model, tokenizer, fits, args, part["val"], part["eval"], args.held_out or [], args.full,
                  args.full_chosen)
        part.save()
        return 0
    while args.finished_only:
        merged = _saved_scores(out, tag, args.eval_windows)
        data = _table(model, tokenizer, fits, args, _ScoredOnly(merged["val"]), _ScoredOnly(merged["eval"]))
        data["fit_timing"], data["select_timing"] = fit_timing, _load_json(out / f"select-{tag}.json")
        data["sources"] = {d: {s: domain_source(d, s) for s in ("calib", "eval")} for d in domains}
        data["fits"] = {d: fits.fits[d].record() for d in domains}
        _save_json(out / f"table-{tag}.json", data)
        atomic_write_text(out / f"table-{tag}.md", _table_markdown(data) + "\n")
        print(_table_markdown(data), flush=True)
        complete = all(r["robust_chosen"] and r.get("with_change", 0) == r.get("with_change", 0) for r in data["rows"])
        if not args.watch or complete:
            return 0
        time.sleep(args.watch)  # the other processes are still adding scores
    try:
        select_timing = _select(model, fits, caches["val"], out / f"select-{tag}.json")
        clock = _Clock()
        result = leave_one_domain_out(model, tokenizer, fits, {d: domain_text(d, "eval") for d in domains},
                                      eval_windows=args.eval_windows, cache=caches["val"], eval_cache=caches["eval"])
        extra = {"fit_timing": fit_timing, "select_timing": select_timing, "lodo_timing": clock.done(),
                 "sources": {d: {s: domain_source(d, s) for s in ("calib", "eval")} for d in domains},
                 "fits": {d: fits.fits[d].record() for d in domains}, "fit_precision": fits.fit_precision}
        if args.analyses:
            extra["analyses"] = _analyses(model, fits, _evaluation_windows(tokenizer, fits, args), caches["eval"])
        if args.pooled_baseline:
            extra["pooled_baseline"] = _pooled_baseline(model, tokenizer, args, fits, caches["eval"], out)
    finally:
        caches.save()
    result.extra = extra
    data = {"model": args.model, "bos": args.bos, **result.to_dict()}
    _save_json(out / f"lodo-{tag}.json", data)
    atomic_write_text(out / f"lodo-{tag}.md", _cell_markdown(data) + "\n")
    print(_cell_markdown(data))
    return 0


def _saved_run(args):
    """(out, tag, model, tokenizer, fits) of the fits a ``run`` saved under ``--out``, or None (said on
    stderr) when there are none."""
    torch.set_num_threads(args.threads)
    out, tag = Path(args.out), _tag(args.model, args.bos)
    saved = _load_json(out / f"fits-{tag}.json")
    if saved is None:
        print(f"no fits-{tag}.json under {out}: run `calibration_lodo.py run` first", file=sys.stderr)
        return None
    model, tokenizer = sinkfix.load_model(args.model)
    return out, tag, model, tokenizer, DomainFits.from_dict(saved, tokenizer)


def profile(args) -> int:
    """The profile `sinkfix calibrate` would write with its defaults, rebuilt from the fits a ``run``
    saved (the robust selection over every domain; validation scores come from the saved caches
    where they exist, so this costs at most the selection's forward passes)."""
    loaded = _saved_run(args)
    if loaded is None:
        return 1
    out, tag, model, tokenizer, fits = loaded
    chosen = robust_profile(model, fits, cache=_saved_scores(out, tag)["val"], log=print)
    chosen.save(args.profile_out)
    print(f"wrote {args.profile_out}")
    return 0


# -- analyses from saved fits ----------------------------------------------------------------------
def analyses(args) -> int:
    """``run --analyses`` without a run: from the fits a ``run`` saved, every domain's own fit and every
    fixed candidate (rebuilt without each domain) on every domain's evaluation text, next to the
    unpatched model and the global betas, and what the unigram recogniser calls each window. Scores
    are taken from and added to the run's cache file; nothing of the run's own files is rewritten."""
    loaded = _saved_run(args)
    if loaded is None:
        return 1
    out, tag, model, tokenizer, fits = loaded
    caches = _cache(out / f"cache-{tag}.json", args.eval_windows)
    for name, entries in _saved_scores(out, tag, args.eval_windows).items():  # what the run's parts scored too
        dict.update(caches[name], entries)
    clock = _Clock()
    try:
        windows = _evaluation_windows(tokenizer, fits, args)
        jobs = {key: job for d in fits.domains for key, job in baseline_jobs(fits.shape, d).items()}
        baseline = evaluate_parameters(model, fits, windows, jobs, cache=caches["eval"])
        table = _analyses(model, fits, windows, caches["eval"])
    finally:
        caches.save()
    data = {"model": args.model, "bos": args.bos, "eval_windows": args.eval_windows,
            "stock": {d: baseline["stock", d] for d in fits.domains},
            "global_beta": {f"{b:g}": {d: baseline[f"global {b:g}", d] for d in fits.domains} for b in GLOBAL_SWEEP},
            "analyses": table, "timing": clock.done(),
            "sources": {d: {s: domain_source(d, s) for s in ("calib", "eval")} for d in fits.domains}}
    _save_json(out / f"analyses-{tag}-{args.eval_windows}w.json", data)
    atomic_write_text(out / f"analyses-{tag}-{args.eval_windows}w.md", _analyses_markdown(data) + "\n")
    print(_analyses_markdown(data))
    return 0


def _analyses_markdown(data: dict) -> str:
    """Perplexity change against the unpatched model of each own fit on each domain (rows: the text),
    the best global beta of 1 and ``GLOBAL_SWEEP`` beside them, and the recogniser's calls."""
    stock, table = data["stock"], data["analyses"]
    domains = list(stock)
    change = lambda nll, d: f"{100 * (math.exp(nll - stock[d]) - 1):+.2f}%"  # noqa: E731
    lines = [f"Own fits on every domain: {data['model']}, {'BOS' if data['bos'] else 'no BOS'}, "
             f"{data['eval_windows']} evaluation windows per domain (perplexity change vs unpatched)", "",
             "| evaluation text | unpatched ppl | best global beta | " + " | ".join(f"fit: {d}" for d in domains)
             + " | recogniser (all five known) | recogniser (domain left out) |",
             "|---" * (len(domains) + 5) + "|"]
    calls = lambda shares: ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: (-kv[1], kv[0])))  # noqa: E731
    for d in domains:
        # beta 1 (unpatched) is one of the global choices, as in the leave-one-domain-out tables
        beta, nll = min([("1", stock[d])] + [(b, v[d]) for b, v in data["global_beta"].items()], key=lambda bv: bv[1])
        lines.append(f"| {d} | {math.exp(stock[d]):.3f} | {change(nll, d)} ({beta}) | "
                     + " | ".join(change(table[f"fit:{f}"][d], d) for f in domains)
                     + f" | {calls(table['recogniser']['known'][d])} | {calls(table['recogniser']['unseen'][d])} |")
    return "\n".join(lines)


# -- intervals ----------------------------------------------------------------------------------
def intervals(args) -> int:
    """Every row of a run, window by window, with intervals (module docstring)."""
    loaded = _saved_run(args)
    if loaded is None:
        return 1
    out, tag, model, tokenizer, fits = loaded
    saved = _saved_scores(out, tag, args.eval_windows)
    path = out / f"windows-{tag}-{args.eval_windows}w.json"
    stored = {tuple(k.split("|", 1)): [tuple(p) for p in v] for k, v in (_load_json(path) or {}).items()}
    per_window = _SavedCache(stored, lambda: _save_json(path, {"|".join(k): v for k, v in per_window.items()}))
    # the selections' validation scores come from the run: a selection it made costs nothing
    result = leave_one_domain_out(model, tokenizer, fits, {d: domain_text(d, "eval") for d in fits.domains},
                                  eval_windows=args.eval_windows, cache=saved["val"], eval_cache=per_window,
                                  per_window=True)
    # the run's own means, where it saved them (the same parameters and domain: the same key)
    mismatch = max((abs(sum(x for x, _ in pairs) / sum(n for _, n in pairs) - saved["eval"][key])
                    for key, pairs in per_window.items() if key in saved["eval"]), default=0.0)
    found = result.intervals()
    rows = []
    for r in result.rows():
        d = r["domain"]
        parts = {"best baseline": found[d]["best baseline"], "unseen": found[d]["without"],
                 "calibrated": found[d]["with"]}
        rows.append({"domain": d, "source": r["source"], "windows": len(result.windows[d]["stock"]),
                     "tokens": r["tokens"], "stock_ppl": r["stock_ppl"], "unseen_chosen": r["without_chosen"],
                     "calibrated_chosen": result.chosen_all,
                     **{name: {k: v.to_dict() for k, v in part.items()} for name, part in parts.items()}})
    data = {"model": args.model, "bos": args.bos, "eval_windows": args.eval_windows, "confidence": 0.95,
            "iterations": 2000, "max_mean_nll_difference_to_saved_scores": mismatch, "rows": rows}
    _save_json(out / f"intervals-{tag}-{args.eval_windows}w.json", data)
    atomic_write_text(out / f"intervals-{tag}-{args.eval_windows}w.md", _intervals_markdown(data) + "\n")
    print(_intervals_markdown(data))
    return 0


def _bounds(part: dict) -> str:
    """"[low, high]" in points, or "[n/a: one window]" where a domain had one scored window (null bounds)."""
    if _missing(part["low"]) or _missing(part["high"]):
        return "[n/a: one window]"
    return f"[{100 * part['low']:+.2f}, {100 * part['high']:+.2f}]"


def _with_interval(part: dict) -> str:
    return f"{100 * part['value']:+.2f}% {_bounds(part)}"


def _intervals_markdown(data: dict) -> str:
    lines = [f"{data['model']}, {'BOS' if data['bos'] else 'no BOS'}, {data['eval_windows']} windows per domain; "
             f"95% percentile intervals over {data['iterations']} resamples of the windows (the best global beta "
             "chosen again in each); points = percentage points",
             "", "| domain | stock ppl | best global beta | unseen (chosen) | unseen − best global beta (points) "
             "| calibrated |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        gap = r["unseen"]["minus_best_baseline"]
        lines.append(f"| {r['domain']} | {r['stock_ppl']:.3f} | {_with_interval(r['best baseline']['change'])} "
                     f"| {_with_interval(r['unseen']['change'])} ({r['unseen_chosen']}) "
                     f"| {100 * gap['value']:+.2f} {_bounds(gap)} "
                     f"| {_with_interval(r['calibrated']['change'])} |")
    lines.append("")
    lines.append(f"Token-weighted means against the run's saved scores: largest difference "
                 f"{data['max_mean_nll_difference_to_saved_scores']:.2e} nats.")
    return "\n".join(lines)


# -- report -------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if _missing(x) else f"{100 * x:+.2f}%"


def _cell_markdown(data: dict) -> str:
    proto = data["protocol"]
    head = (f"**{data['model']}, {'BOS' if data['bos'] else 'no BOS'}**, {proto['seq_len']}-token windows, stride "
            f"{proto['stride']}, first {proto['eval_windows']} windows of each domain's evaluation text; "
            f"profile from all domains: `{data['chosen_all']}`")
    lines = [head, "", "| domain | scored tokens | stock ppl | best global beta | unseen: profile without it (chosen) "
             "| calibrated: profile with it |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['domain']} | {r['tokens']} | {r['stock_ppl']:.3f} | {_pct(r['best_global_change'])} "
                     f"({r['best_global_beta']:g}) | {_pct(r['without_change'])} ({r['without_chosen']}) "
                     f"| {_pct(r['with_change'])} |")
    if data["extra"].get("not_finished"):
        lines.append(f"| {', '.join(data['extra']['not_finished'])} | not finished (the run was stopped) | | | | |")
    precision = data["extra"].get("fit_precision", "float32")
    lines += ["", f"Fitting steps' matrix products: {precision} (validation and selection in float32)."]
    for stage, label in (("fit_timing", "Per-domain fits"), ("select_timing", "Selection on all domains")):
        timing = data["extra"].get(stage)
        if timing:
            reused = (f" It started from {timing['reused_scores']} saved validation scores and added "
                      f"{timing['new_scores']}." if timing.get("reused_scores") else "")
            lines += ["", f"{label}: {timing['wall_s']} s wall, {timing['cpu_s']} s CPU, {timing['threads']} "
                          f"thread(s), load average {timing['load_before']} -> {timing['load_after']}.{reused}"]
    return "\n".join(lines)


def _targets(data: dict) -> list[str]:
    """Which targets a cell meets: unseen <= +0.1% and <= the best global beta; calibrated <= -3%."""
    misses = []
    for r in data["rows"]:
        if _missing(r["without_change"]) or _missing(r["with_change"]) or _missing(r["best_global_change"]):
            misses.append(f"{r['domain']}: not measured")
            continue
        if r["without_change"] > 0.001:
            misses.append(f"{r['domain']}: unseen {_pct(r['without_change'])} > +0.10%")
        if r["without_change"] > r["best_global_change"]:
            misses.append(f"{r['domain']}: unseen {_pct(r['without_change'])} worse than best global "
                          f"{_pct(r['best_global_change'])}")
        if r["with_change"] > -0.03:
            misses.append(f"{r['domain']}: calibrated {_pct(r['with_change'])} > -3%")
    return misses


def report(args) -> int:
    out = Path(args.out)
    cells = [json.loads(p.read_text()) for p in sorted(out.glob("lodo-*.json"))]
    if not cells:
        print(f"no lodo-*.json under {out}", file=sys.stderr)
        return 1
    parts = []
    for data in cells:
        parts.append(_cell_markdown(data))
        misses = _targets(data)
        parts.append("Targets: " + ("all met." if not misses else "missed: " + "; ".join(misses) + "."))
    text = "\n\n".join(parts) + "\n"
    atomic_write_text(out / "REPORT.md", text)
    print(text)
    return 0


def table(args) -> int:
    """Markdown of every table-*.json under --out (no model, no forward pass)."""
    out = Path(args.out)
    paths = sorted(out.glob("table-*.json"))
    for path in paths:
        text = _table_markdown(json.loads(path.read_text()))
        atomic_write_text(path.with_suffix(".md"), text + "\n")
        print(text + "\n")
    return 0 if paths else 1


# The wider pool `pool` compares (docs/calibration.md, "Why `mean x0.5` is in the pool").
WIDE_POOL = candidates([("consensus", 1.0), ("consensus", 0.5), ("mean", 1.0), ("mean", 0.75), ("mean", 0.5)],
                       global_betas=(0.98, 0.97, 0.95, 0.93, 0.9, 0.85))


# The mean combination amplified (shrink above 1: each head gives away 1.5 or 2 times the fits' mean
# share, at most all of it), tried for the no-BOS calibrated domains that stay short of -3%.
# Built by hand: `candidates` accepts only shrinks in (0, 1], which is all `sinkfix calibrate` offers.
AMPLIFIED_POOL = [IDENTITY] + [Candidate(f"mean x{s:g}", rule="mean", shrink=s) for s in (1.0, 1.5, 2.0)]
POOLS = {"wide": WIDE_POOL, "default": candidates(), "amplified": AMPLIFIED_POOL}


def pool(args) -> int:
    """Every selection of a ``run`` (without each domain, and over all of them) repeated with the
    wider pool (``--pool wide``), the default one (``--pool default``) or the amplified means
    (``--pool amplified``), whole tables (no pruning),
    and every candidate of it rebuilt without each domain on that domain's evaluation text and from
    every domain on every domain's: what each candidate would have done, chosen or not, so that
    selection rules can be compared without another forward pass. Reuses the run's fits and saved
    scores; writes ``pool-TAG.json`` (wide) or ``pool-POOL-TAG.json``."""
    loaded = _saved_run(args)
    if loaded is None:
        return 1
    out, tag, model, tokenizer, fits = loaded
    domains = fits.domains
    caches = _cache(out / f"cache-{tag}.json", args.eval_windows)
    chosen_pool = POOLS[args.pool]
    shape, result = fits.shape, {"pool": [c.name for c in chosen_pool], "selections": {}, "unseen": {},
                                 "calibrated": {}}
    try:
        with Calibrator(model, fits.settings.on_sink_rows) as cal:
            def change(params, d) -> float:
                key = parameters_key(params, d)
                if key not in caches["val"]:
                    caches["val"][key] = cal.nll_with(params, fits.windows[d].val)
                return math.exp(caches["val"][key] - fits.fits[d].val_before) - 1

            for held_out in [None, *domains]:
                inner = {d: fits.fits[d].parameters for d in domains if d != held_out}
                selection = select(chosen_pool, inner, shape, change, prune=False)
                result["selections"][held_out or "all domains"] = selection.to_dict()
                print(f"{'all domains' if held_out is None else 'without ' + held_out}: {selection.chosen.name}",
                      flush=True)
        windows = _evaluation_windows(tokenizer, fits, args)
        every = [fits.fits[d].parameters for d in domains]
        jobs = {key: job for d in domains for key, job in baseline_jobs(shape, d, global_betas=()).items()}
        for c in chosen_pool[1:]:
            for d in domains:
                without = [fits.fits[o].parameters for o in domains if o != d]
                jobs["unseen", c.name, d] = candidate_parameters(c, without, shape), d
                jobs["calibrated", c.name, d] = candidate_parameters(c, every, shape), d
        nll = evaluate_parameters(model, fits, windows, jobs, cache=caches["eval"])
        for (kind, *rest), value in nll.items():
            if kind != "stock":
                name, d = rest
                result[kind].setdefault(name, {})[d] = math.exp(value - nll["stock", d]) - 1
    finally:
        caches.save()
    _save_json(out / (f"pool-{tag}.json" if args.pool == "wide" else f"pool-{args.pool}-{tag}.json"), result)
    for kind in ("unseen", "calibrated"):
        print(f"{kind} (evaluation text):")
        for name, per in result[kind].items():
            print(f"  {name:14s} " + " ".join(f"{d} {_pct(v)}" for d, v in per.items()))
    return 0


def _saved_run_parser(sub, name: str, help: str, fn, eval_windows: bool = True):
    """A subcommand that works on the fits a ``run`` saved: which model, protocol and folder."""
    parser = sub.add_parser(name, help=help)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=1)
    if eval_windows:
        parser.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL_WINDOWS,
                            help=f"windows per domain's evaluation text (default {DEFAULT_EVAL_WINDOWS})")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.set_defaults(fn=fn)
    return parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="fit, rebuild without each domain, evaluate")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--domain", action="append", choices=DOMAINS, help="built-in domains (default: all)")
    r.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL_WINDOWS,
                   help=f"windows per domain's evaluation text (default {DEFAULT_EVAL_WINDOWS})")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--seq-len", type=int, default=512, help="window length (default 512, as calibrate)")
    r.add_argument("--steps", type=int, default=None, help="override the calibration default")
    r.add_argument("--max-tokens", type=int, default=None, help="override the calibration default")
    r.add_argument("--reg", type=float, default=None, help="override the calibration default pull toward beta = 1")
    r.add_argument("--precision", choices=FIT_PRECISIONS, default="auto",
                   help="the fitting steps' matrix products, as `sinkfix calibrate --precision` (default auto)")
    r.add_argument("--part", help="compute only the rows of --held-out (and with --full the profile from every "
                   "domain), with a cache file of this name; runs several processes side by side")
    r.add_argument("--held-out", action="append", choices=DOMAINS, help="with --part: a row to compute")
    r.add_argument("--full", action="store_true", help="with --part: the profile from every domain too")
    r.add_argument("--full-chosen", help="score this candidate built from every domain's fit as the profile from all "
                   "domains, without repeating the selection that chose it (it is recorded as such)")
    r.add_argument("--finished-only", action="store_true",
                   help="no forward passes: the table of what a stopped run finished (its saved scores)")
    r.add_argument("--fixed", help="with --part: score this candidate rebuilt without each --held-out domain (no "
                   "selection); with --finished-only: show its column")
    r.add_argument("--watch", type=float, default=0, help="with --finished-only: rewrite the table every WATCH "
                   "seconds until every row is finished")
    r.add_argument("--analyses", action="store_true", help="score every candidate and every own fit too")
    r.add_argument("--pooled-baseline", action="store_true", help="also fit and score the previous default")
    r.add_argument("--out", default=str(DEFAULT_OUT))
    r.set_defaults(fn=run)
    p = sub.add_parser("report", help="every run under --out -> REPORT.md")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.set_defaults(fn=report)
    f = _saved_run_parser(sub, "profile", "the default (all-domain) profile from the saved fits -> a profile file",
                          profile, eval_windows=False)
    f.add_argument("--profile-out", required=True, help="the profile file to write")
    w = _saved_run_parser(sub, "pool", "every selection of a run repeated with a candidate pool, whole tables", pool)
    w.add_argument("--pool", choices=sorted(POOLS), default="wide", help="the candidates (default: wide)")
    _saved_run_parser(sub, "intervals", "a run's rows window by window, each change with a 95%% interval", intervals)
    _saved_run_parser(sub, "analyses", "every domain's own fit and fixed candidate on every domain, from saved fits",
                      analyses)
    t = sub.add_parser("table", help="every table-*.json (written by run --finished-only) -> Markdown")
    t.add_argument("--out", default=str(DEFAULT_OUT))
    t.set_defaults(fn=table)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
