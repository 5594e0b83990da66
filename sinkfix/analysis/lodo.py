"""Leave-one-domain-out evaluation: how a calibration procedure does on kinds of text it never saw.

For each domain D of a calibration (:class:`~sinkfix.analysis.calibration.DomainFits`), the profile
is rebuilt without D (:func:`~sinkfix.analysis.calibration.robust_profile` on the other domains'
fits: neither their fits nor the selection saw any of D's text) and scored on D's evaluation text:
that is the number a user with text of a new kind should expect. The profile built from every
domain is scored on each domain's evaluation text too (text of a calibrated domain, from sources
the calibration did not read). Every number sits next to the unpatched model and the best single
global beta for that domain (one beta for every head, the best of a small sweep on that same
evaluation text: a baseline that is given its best case).

Evaluation text: a built-in domain's evaluation split (:func:`sinkfix.texts.domain_text`), windows
of the calibration's protocol (``seq_len``, BOS or not), non-overlapping, each token scored once,
the first ``eval_windows`` windows. A domain without an evaluation split (the user's own files) is
scored on its validation windows instead (all of them, or the first ``validation_windows``), which
the rebuilt profile never saw but the profile built from every domain used for early stopping and
selection; the result says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from sinkfix.analysis.calibration import (CalibrationError, Calibrator, DomainFits, Progress, parameters_key,
                                          robust_profile)
from sinkfix.analysis.robust import DEFAULT_SELECTION_RULE, Candidate
from sinkfix.errors import is_integer
from sinkfix.evaluate import Window, bos_token_id, make_windows, tokenize, windows_nll

__all__ = ["LodoResult", "leave_one_domain_out", "evaluate_parameters", "evaluation_windows", "require_three_domains",
           "GLOBAL_SWEEP", "baseline_jobs", "ChangeInterval", "WindowScores", "window_scores", "change_intervals"]

# One beta for every head: the sweep the "best single global beta" baseline is the best of.
GLOBAL_SWEEP = (0.95, 0.9, 0.85)


@dataclass
class LodoResult:
    """Per domain: NLLs of the unpatched model, of each global beta, of the profile rebuilt without
    the domain and of the profile built from every domain, all on the same evaluation windows."""

    protocol: dict
    sources: dict[str, str]  # domain -> what its evaluation windows are
    tokens: dict[str, int]  # scored tokens per domain
    stock: dict[str, float]  # token-mean NLL
    global_beta: dict[float, dict[str, float]]
    without: dict[str, float]  # profile rebuilt without the domain
    chosen_without: dict[str, str]  # the candidate chosen for that profile
    with_all: dict[str, float]  # profile from every domain
    chosen_all: str
    extra: dict = field(default_factory=dict)
    # domain -> configuration ("stock", "global B", "without", "with") -> (summed NLL, tokens) per
    # window, when the evaluation was scored window by window (``per_window=True``): what intervals() resamples
    windows: dict[str, dict[str, list[tuple[float, int]]]] = field(default_factory=dict)

    def change(self, nll: float, domain: str) -> float:
        return math.exp(nll - self.stock[domain]) - 1

    def best_global(self, domain: str) -> tuple[float, float]:
        """(beta, change) of the best global beta on ``domain``; beta 1.0 (the identity) is in the sweep."""
        options = [(1.0, 0.0)] + [(b, self.change(nlls[domain], domain)) for b, nlls in self.global_beta.items()]
        return min(options, key=lambda item: item[1])

    def rows(self) -> list[dict]:
        out = []
        for d in self.stock:
            beta, change = self.best_global(d)
            out.append({"domain": d, "source": self.sources[d], "tokens": self.tokens[d],
                        "stock_ppl": math.exp(self.stock[d]), "best_global_beta": beta, "best_global_change": change,
                        "without_change": self.change(self.without[d], d), "without_chosen": self.chosen_without[d],
                        "with_change": self.change(self.with_all[d], d)})
        return out

    def intervals(self, **kwargs) -> dict[str, dict]:
        """Per domain scored window by window, :func:`change_intervals` of the two profiles
        (``"without"``, ``"with"``) against the unpatched model and the best global beta; empty when
        the evaluation kept no per-window scores."""
        return {d: change_intervals(WindowScores.from_pairs(scores), reference="stock",
                                    baselines=[_global_name(b) for b in self.global_beta],
                                    compared=["without", "with"], **kwargs)
                for d, scores in self.windows.items()}

    def to_dict(self) -> dict:
        out = {"protocol": self.protocol, "rows": self.rows(), "chosen_all": self.chosen_all,
               "nll": {"stock": self.stock, "global_beta": {str(b): v for b, v in self.global_beta.items()},
                       "without": self.without, "with_all": self.with_all}, "extra": self.extra}
        if self.windows:
            out["intervals"] = {d: {name: {k: v.to_dict() for k, v in parts.items()} for name, parts in found.items()}
                                for d, found in self.intervals().items()}
        return out

    def markdown(self) -> str:
        """One table: unseen-domain and calibrated-domain perplexity change next to the baselines."""
        lines = ["| domain | scored tokens | stock ppl | best global beta | profile, domain left out (chosen) "
                 "| profile from all domains |", "|---|---|---|---|---|---|"]
        for r in self.rows():
            lines.append(f"| {r['domain']} | {r['tokens']} | {r['stock_ppl']:.3f} "
                         f"| {100 * r['best_global_change']:+.2f}% ({r['best_global_beta']:g}) "
                         f"| {100 * r['without_change']:+.2f}% ({r['without_chosen']}) | {100 * r['with_change']:+.2f}% |")
        return "\n".join(lines)


def require_three_domains(names: Sequence[str]) -> None:
    """Leaving one domain out must leave two to choose with (:func:`robust_profile` needs two)."""
    if len(names) < 3:
        raise CalibrationError(
            f"leave-one-domain-out evaluation rebuilds the profile without each domain, and the robust rule needs two "
            f"domains to choose with, so it needs at least three domains; got {len(names)} "
            f"({', '.join(map(repr, names))})")


def check_eval_windows(eval_windows) -> None:
    """Evaluation windows per domain: an integer >= 1 (0 would still score one window, as make_windows stops
    only after its first)."""
    if not is_integer(eval_windows) or eval_windows < 1:
        raise CalibrationError(f"eval_windows must be an integer >= 1, got {eval_windows!r}")


def evaluation_windows(tokenizer, texts: Mapping[str, str | None], fits: DomainFits, eval_windows: int,
                       validation_windows: int | None = None) -> tuple[dict[str, list[Window]], dict[str, str]]:
    """Each domain's evaluation windows and their source: the first ``eval_windows`` of its evaluation
    text, or its validation windows, the first ``validation_windows`` of them (None: all)."""
    check_eval_windows(eval_windows)
    if validation_windows is not None:
        check_eval_windows(validation_windows)
    settings = fits.settings
    bos = settings.bos is True
    windows, sources = {}, {}
    for d in fits.domains:
        text = texts.get(d)
        if text is not None:
            bos_id = bos_token_id(tokenizer) if bos else None
            windows[d] = make_windows(tokenize(tokenizer, text), settings.seq_len, None, bos_id, eval_windows)
            sources[d] = "evaluation text"
        else:
            windows[d] = [Window(w, w.clone()) for w in fits.windows[d].val[:validation_windows]]
            sources[d] = "validation windows"
    return windows, sources


def _score_jobs(model: nn.Module, fits: DomainFits, windows: Mapping[str, list[Window]], jobs: Mapping[object, tuple],
                cache: dict, progress: bool, score: Callable[[nn.Module, list[Window], Callable], object]) -> dict:
    """``score(model, domain windows, on_batch)`` for each job ``key -> ((beta, logit), domain)``
    whose parameters and domain ``cache`` lacks, stored in ``cache``; then every job's from it."""
    todo = {parameters_key(params, d): (params, d) for params, d in jobs.values()}
    todo = {k: v for k, v in todo.items() if k not in cache}
    bar = Progress(sum(len(windows[d]) for _, d in todo.values()), progress, "evaluate")
    try:
        with Calibrator(model, fits.settings.on_sink_rows, bar) as cal:
            for key, (params, d) in todo.items():
                cal.set(*params)
                cache[key] = score(cal.model, windows[d], bar.tick)
    finally:
        bar.close()
    return {key: cache[parameters_key(params, d)] for key, (params, d) in jobs.items()}


def evaluate_parameters(model: nn.Module, fits: DomainFits, windows: Mapping[str, list[Window]],
                        jobs: Mapping[object, tuple], *, cache: dict | None = None,
                        progress: bool = True) -> dict[object, float]:
    """Token-mean NLL for each job ``key -> ((beta, logit), domain)`` on that domain's ``windows``.

    A parameter set is scored once per domain: ``cache`` (keyed by parameters and domain) carries
    the results over between calls."""
    def mean_nll(scored_model, domain_windows, on_batch) -> float:
        total, count = windows_nll(scored_model, domain_windows, on_batch=on_batch)
        return total / max(count, 1)

    return _score_jobs(model, fits, windows, jobs, {} if cache is None else cache, progress, mean_nll)


def window_scores(model: nn.Module, fits: DomainFits, windows: Mapping[str, list[Window]],
                  jobs: Mapping[object, tuple], *, cache: dict | None = None,
                  progress: bool = True) -> dict[object, list[tuple[float, int]]]:
    """Like :func:`evaluate_parameters`, window by window: for each job, ``(summed NLL, scored
    tokens)`` of each of its domain's windows, in order (what :func:`change_intervals` resamples).
    Summed over the windows they give :func:`evaluate_parameters`'s mean exactly: both add the same
    per-window float64 sums in the same order."""
    def per_window(scored_model, domain_windows, on_batch) -> list[tuple[float, int]]:
        return [windows_nll(scored_model, [w], on_batch=on_batch) for w in domain_windows]

    return _score_jobs(model, fits, windows, jobs, {} if cache is None else cache, progress, per_window)


@dataclass(frozen=True)
class ChangeInterval:
    """A perplexity change (a fraction: -0.03 is -3%) or a difference of two, in points of a
    fraction, with a percentile interval over resampled windows."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready: a bound that is not a number (one scored window: no interval) is None, null in
        JSON; passed on as NaN, json.dumps wrote the literal ``NaN``, which is not JSON."""
        return {key: value if math.isfinite(value) else None for key, value in self.__dict__.items()}


@dataclass(frozen=True)
class WindowScores:
    """Per-window scores of several configurations on the same windows of one text: ``nll[name]``
    the summed NLL of each window, ``tokens`` each window's scored tokens (the same for every
    configuration: one text, one window protocol)."""

    nll: Mapping[str, Sequence[float]]
    tokens: Sequence[int]

    @classmethod
    def from_pairs(cls, scores: Mapping[str, Sequence[tuple[float, int]]]) -> "WindowScores":
        """From :func:`window_scores`' ``(nll, tokens)`` pairs; every configuration must have scored
        the same windows (the same token counts)."""
        counts = {name: [int(n) for _, n in pairs] for name, pairs in scores.items()}
        first = next(iter(counts.values()), None)
        if not first or any(c != first for c in counts.values()):
            raise ValueError("window scores of configurations that did not score the same windows: "
                             + ", ".join(f"{name}: {len(c)} windows, {sum(c)} tokens" for name, c in counts.items()))
        return cls({name: [float(x) for x, _ in pairs] for name, pairs in scores.items()}, first)


def change_intervals(scores: WindowScores, *, reference: str, baselines: Sequence[str], compared: Sequence[str],
                     confidence: float = 0.95, iterations: int = 2000, seed: int = 0) -> dict[str, dict]:
    """How sure the perplexity changes of a leave-one-domain-out row are, from its windows.

    The windows are drawn with replacement (every configuration's score of a window together:
    paired), and in each draw every change is recomputed token-weighted,
    ``exp((sum nll_c - sum nll_ref) / sum tokens) - 1``, as is the **best baseline**: the smallest
    change among ``baselines`` and the reference itself (change 0), chosen again in every draw, as
    the table chooses its best global beta on the same text. Returned, each a :class:`ChangeInterval`
    (point estimate on all windows, percentile interval over the draws):

    * ``"best baseline"``: ``{"change": ...}``;
    * per name of ``compared``: ``{"change": ..., "minus_best_baseline": ...}``, the second a
      difference of two changes (negative: ahead of the best baseline).

    With few windows (4 to 16 here) the interval is rough and, if anything, too narrow; windows
    next to each other in one text are not independent draws, so read it as a lower bound on the
    uncertainty.
    """
    import numpy as np

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    missing = [n for n in (reference, *baselines, *compared) if n not in scores.nll]
    if missing:
        raise ValueError(f"no window scores for {', '.join(map(repr, missing))}")
    tokens = np.asarray(scores.tokens, dtype=np.float64)
    if tokens.size == 0 or (tokens <= 0).any():
        raise ValueError("change intervals need at least one window, each with scored tokens")
    nll = {name: np.asarray(v, dtype=np.float64) for name, v in scores.nll.items()}
    if any(v.shape != tokens.shape or not np.isfinite(v).all() for v in nll.values()):
        raise ValueError("every configuration needs one finite NLL per window")
    n = tokens.size
    # each draw as per-window multiplicities: a sum over a draw is a dot product with them
    draws = np.random.default_rng(seed).integers(0, n, size=(iterations, n))
    weights = np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)
    weights = np.vstack([np.ones(n), weights])  # row 0: the windows as they are (the point estimate)
    total_tokens = weights @ tokens

    def change(name: str) -> np.ndarray:
        return np.expm1((weights @ (nll[name] - nll[reference])) / total_tokens)

    best = np.minimum.reduce([np.zeros(len(weights))] + [change(b) for b in baselines])
    bounds = ((1 - confidence) / 2, (1 + confidence) / 2)

    def interval(values: np.ndarray) -> ChangeInterval:
        if n < 2:  # every draw of one window is that window: a zero-width "interval" says nothing (NaN: null in JSON)
            return ChangeInterval(float(values[0]), math.nan, math.nan)
        low, high = np.quantile(values[1:], bounds)
        return ChangeInterval(float(values[0]), float(low), float(high))

    out: dict[str, dict] = {"best baseline": {"change": interval(best)}}
    for name in compared:
        c = change(name)
        out[name] = {"change": interval(c), "minus_best_baseline": interval(c - best)}
    return out


def leave_one_domain_out(model: nn.Module, tokenizer, fits: DomainFits, eval_texts: Mapping[str, str | None], *,
                         eval_windows: int = 8, global_betas: Sequence[float] = GLOBAL_SWEEP,
                         pool: Sequence[Candidate] | None = None, cache: dict | None = None,
                         eval_cache: dict | None = None, progress: bool = True, per_window: bool = False,
                         log: Callable[[str], None] | None = None,
                         selection_rule: str = DEFAULT_SELECTION_RULE,
                         validation_windows: int | None = None) -> LodoResult:
    """Score the robust calibration of ``fits`` with each domain left out in turn (module docstring).

    ``eval_texts`` maps a domain to its evaluation text, or to None to score its validation windows.
    ``cache`` (validation NLLs of the selection) and ``eval_cache`` (evaluation NLLs) are dicts the
    caller may keep between calls with the same fits. ``per_window``: score the evaluation window by
    window (the same forward passes and means) and keep the scores in the result, for
    :meth:`LodoResult.intervals`; ``eval_cache`` then holds per-window scores, so a cache must not be
    shared between the two settings. ``selection_rule``: how every selection chooses
    (:func:`sinkfix.analysis.robust.select`). ``validation_windows``: how many of a domain's
    validation windows are scored where it has no evaluation text (None: all; ``sinkfix calibrate
    --evaluate`` passes its ``--eval-windows``, so the option holds for every domain).
    """
    say = log or (lambda message: None)
    require_three_domains(fits.domains)
    windows, sources = evaluation_windows(tokenizer, eval_texts, fits, eval_windows, validation_windows)
    cache = {} if cache is None else cache
    score = window_scores if per_window else evaluate_parameters
    shape = fits.shape
    scored: dict = {}
    profiles = {}
    # Domain by domain, so that a run stopped half-way (with the caches kept) has whole rows.
    for d in fits.domains:
        profiles[d] = robust_profile(model, fits, [o for o in fits.domains if o != d], pool, progress=progress,
                                     cache=cache, score_chosen=False, selection_rule=selection_rule)
        jobs = baseline_jobs(shape, d, global_betas)
        jobs["without", d] = _parameters(profiles[d]), d
        scored.update(score(model, fits, windows, jobs, cache=eval_cache, progress=progress))
    full = robust_profile(model, fits, None, pool, progress=progress, cache=cache, selection_rule=selection_rule)
    scored.update(score(model, fits, windows, {("with", d): (_parameters(full), d) for d in fits.domains},
                        cache=eval_cache, progress=progress))
    nll = {key: sum(x for x, _ in value) / max(sum(n for _, n in value), 1) if per_window else value
           for key, value in scored.items()}
    tokens = {d: sum(int((w.labels[1:] != -100).sum()) for w in windows[d]) for d in fits.domains}
    result = LodoResult(
        {**fits.settings.protocol(), "eval_windows": eval_windows}, sources, tokens,
        {d: nll["stock", d] for d in fits.domains},
        {b: {d: nll[_global_name(b), d] for d in fits.domains} for b in global_betas},
        {d: nll["without", d] for d in fits.domains},
        {d: p.calibration["selection"]["chosen"] for d, p in profiles.items()},
        {d: nll["with", d] for d in fits.domains}, full.calibration["selection"]["chosen"],
        windows={d: {name: list(scored[name, d]) for name in
                     ("stock", *map(_global_name, global_betas), "without", "with")} for d in fits.domains}
        if per_window else {})
    say(result.markdown())
    return result


def baseline_jobs(shape: tuple[int, int], domain: str,
                  global_betas: Sequence[float] = GLOBAL_SWEEP) -> dict[tuple[str, str], tuple]:
    """The jobs every table scores ``domain`` against, for :func:`evaluate_parameters`: the unpatched
    model as ``("stock", domain)`` and each global beta as ``("global B", domain)``."""
    jobs = {("stock", domain): ((torch.ones(shape), None), domain)}
    jobs.update({(_global_name(b), domain): ((torch.full(shape, b), None), domain) for b in global_betas})
    return jobs


def _global_name(beta: float) -> str:
    return f"global {beta:g}"


def _parameters(profile) -> tuple[torch.Tensor, torch.Tensor | None]:
    logit = profile.virtual_sink_logit
    return profile.sink_scale.float(), None if logit is None else logit.float()
