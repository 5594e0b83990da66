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
scored on its validation windows instead, which the rebuilt profile never saw but the profile
built from every domain used for early stopping and selection; the result says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from sinkfix.analysis.calibration import (CalibrationError, Calibrator, DomainFits, Progress, parameters_key,
                                          robust_profile)
from sinkfix.analysis.robust import Candidate
from sinkfix.evaluate import Window, bos_token_id, make_windows, tokenize, windows_nll

__all__ = ["LodoResult", "leave_one_domain_out", "evaluate_parameters", "evaluation_windows", "require_three_domains",
           "GLOBAL_SWEEP"]

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

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "rows": self.rows(), "chosen_all": self.chosen_all,
                "nll": {"stock": self.stock, "global_beta": {str(b): v for b, v in self.global_beta.items()},
                        "without": self.without, "with_all": self.with_all}, "extra": self.extra}

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


def evaluation_windows(tokenizer, texts: Mapping[str, str | None], fits: DomainFits,
                       eval_windows: int) -> tuple[dict[str, list[Window]], dict[str, str]]:
    """Each domain's evaluation windows (its evaluation text, or its validation windows) and their source."""
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
            windows[d] = [Window(w, w.clone()) for w in fits.windows[d].val]
            sources[d] = "validation windows"
    return windows, sources


def evaluate_parameters(model: nn.Module, fits: DomainFits, windows: Mapping[str, list[Window]],
                        jobs: Mapping[object, tuple], *, cache: dict | None = None,
                        progress: bool = True) -> dict[object, float]:
    """Token-mean NLL for each job ``key -> ((beta, logit), domain)`` on that domain's ``windows``.

    A parameter set is scored once per domain: ``cache`` (keyed by parameters and domain) carries
    the results over between calls."""
    cache = {} if cache is None else cache
    todo = {parameters_key(params, d): (params, d) for params, d in jobs.values()}
    todo = {k: v for k, v in todo.items() if k not in cache}
    bar = Progress(sum(len(windows[d]) for _, d in todo.values()), progress, "evaluate")
    try:
        with Calibrator(model, fits.settings.on_sink_rows, bar) as cal:
            for key, (params, d) in todo.items():
                cal.set(*params)
                total, count = windows_nll(cal.model, windows[d], on_batch=bar.tick)
                cache[key] = total / max(count, 1)
    finally:
        bar.close()
    return {key: cache[parameters_key(params, d)] for key, (params, d) in jobs.items()}


def leave_one_domain_out(model: nn.Module, tokenizer, fits: DomainFits, eval_texts: Mapping[str, str | None], *,
                         eval_windows: int = 8, global_betas: Sequence[float] = GLOBAL_SWEEP,
                         pool: Sequence[Candidate] | None = None, cache: dict | None = None,
                         eval_cache: dict | None = None, progress: bool = True,
                         log: Callable[[str], None] | None = None) -> LodoResult:
    """Score the robust calibration of ``fits`` with each domain left out in turn (module docstring).

    ``eval_texts`` maps a domain to its evaluation text, or to None to score its validation windows.
    ``cache`` (validation NLLs of the selection) and ``eval_cache`` (evaluation NLLs) are dicts the
    caller may keep between calls with the same fits.
    """
    say = log or (lambda message: None)
    require_three_domains(fits.domains)
    windows, sources = evaluation_windows(tokenizer, eval_texts, fits, eval_windows)
    cache = {} if cache is None else cache
    shape = fits.shape
    nll: dict = {}
    profiles = {}
    # Domain by domain, so that a run stopped half-way (with the caches kept) has whole rows.
    for d in fits.domains:
        profiles[d] = robust_profile(model, fits, [o for o in fits.domains if o != d], pool, progress=progress,
                                     cache=cache, score_chosen=False)
        jobs = {("stock", d): ((torch.ones(shape), None), d)}
        jobs.update({(b, d): ((torch.full(shape, b), None), d) for b in global_betas})
        jobs["without", d] = _parameters(profiles[d]), d
        nll.update(evaluate_parameters(model, fits, windows, jobs, cache=eval_cache, progress=progress))
    full = robust_profile(model, fits, None, pool, progress=progress, cache=cache)
    nll.update(evaluate_parameters(model, fits, windows, {("with", d): (_parameters(full), d) for d in fits.domains},
                                   cache=eval_cache, progress=progress))
    tokens = {d: sum(int((w.labels[1:] != -100).sum()) for w in windows[d]) for d in fits.domains}
    result = LodoResult(
        {**fits.settings.protocol(), "eval_windows": eval_windows}, sources, tokens,
        {d: nll["stock", d] for d in fits.domains}, {b: {d: nll[b, d] for d in fits.domains} for b in global_betas},
        {d: nll["without", d] for d in fits.domains},
        {d: p.calibration["selection"]["chosen"] for d, p in profiles.items()},
        {d: nll["with", d] for d in fits.domains}, full.calibration["selection"]["chosen"])
    say(result.markdown())
    return result


def _parameters(profile) -> tuple[torch.Tensor, torch.Tensor | None]:
    logit = profile.virtual_sink_logit
    return profile.sink_scale.float(), None if logit is None else logit.float()
