"""``sinkfix stream``: streaming perplexity of a sink cache vs a window-only cache vs recomputation.

    sinkfix stream --model smollm2-135m                                  # 4096 tokens, 2.7 min of CPU time
    sinkfix stream --model smollm2-135m --tokens 20738 --segment 4096    # past the 8192 trained positions
    sinkfix stream --profile smollm2.profile.json --json                 # also with the correction patched in
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from sinkfix.commands import StoreOnce, SUMMARIES, set_threads
from sinkfix.errors import UsageError

__all__ = ["add_parser", "run", "stream_text", "tokenizer_adds_bos"]

DEFAULT_CHUNK = 32  # tokens per forward of the cache variants
DEFAULT_RECOMPUTE_EVERY = 64  # a recomputation scores every 64th token


def add_parser(subparsers) -> argparse.ArgumentParser:
    from sinkfix.models import DEFAULT_MODEL

    parser = subparsers.add_parser(
        "stream", help=SUMMARIES["stream"],
        description="Stream one long text through a SinkCache (sinks + recent window), a window-only cache of "
                    "the same size and a sliding window recomputed afresh (subsampled); report perplexity over "
                    "the whole stream and per segment, time per token and peak memory per segment, and draw "
                    "running perplexity against position (stream.png in --out).",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"offline model name, folder or hub id (default {DEFAULT_MODEL})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", metavar="FILE", default=None, help="UTF-8 text to stream (default: --builtin pydoc)")
    source.add_argument("--builtin", metavar="NAME", default="pydoc",
                        help="a built-in domain's held-out text (pydoc: Python's language reference, the default; "
                             "python, readme, legal, cpp), or 'mixed': the paragraphs of all five in one fixed "
                             "random order, a text of the same kind everywhere along its length")
    parser.add_argument("--tokens", type=int, default=4096, help="stream length in tokens, BOS included (default 4096)")
    parser.add_argument("--period", type=int, default=None, metavar="N",
                        help="repeat the text's first N tokens to the stream length: a control whose content is the "
                             "same in every stretch of N tokens, so that drift between segments is the cache's "
                             "(N larger than the cache, so no repetition is ever in view)")
    parser.add_argument("--n-sink", type=int, default=4, help="sink tokens kept (default 4)")
    parser.add_argument("--window", type=int, default=252,
                        help="recent tokens kept besides the sinks (default 252: a 256-token cache)")
    # --chunk and --recompute-every default to None (= not given), so that one given for variants
    # that do not use it is refused while the defaults, recorded in stream.json, keep working
    parser.add_argument("--chunk", type=int, default=None,
                        help=f"tokens per forward of the cache variants, decode visibility kept (default {DEFAULT_CHUNK}; "
                             "not with only recomputing variants, which feed fresh windows)")
    parser.add_argument("--segment", type=int, default=1024, help="tokens per reported segment (default 1024)")
    parser.add_argument("--recompute-every", type=int, default=None,
                        help=f"score every N-th token with a recomputed window (default {DEFAULT_RECOMPUTE_EVERY}; "
                             "only with a recompute or recompute_profile variant)")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help="start the stream (and each recomputed window) with BOS (default: as the --profile was "
                             "calibrated, else if the tokenizer adds one)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of sink, window_only, recompute and, with --profile, "
                             "sink_profile, recompute_profile (default: the first three, plus the last two "
                             "with --profile)")
    parser.add_argument("--profile", action=StoreOnce, default=None,
                        help="also run the sink cache and the recomputation with this calibrated profile patched in")
    parser.add_argument("--out", default="sinkfix-stream", help="folder for stream.json, stream_tokens.pt (every variant's per-token NLL) and "
                             "stream.png (default ./sinkfix-stream)")
    # --no-figures as every other command spells it (and as the missing-matplotlib error says);
    # --no-figure, this command's first spelling, still works
    parser.add_argument("--no-figures", "--no-figure", dest="no_figures", action="store_true",
                        help="skip stream.png")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout, nothing else")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(run=run)
    return parser


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with its BOS token (Gemma3 does, SmolLM2 does not)."""
    import torch

    bos = getattr(tokenizer, "bos_token_id", None)
    first = torch.as_tensor(tokenizer("a", add_special_tokens=True).input_ids).flatten()[:1].tolist()
    return bos is not None and first == [bos]


def stream_text(tokenizer, text: str, tokens: int, bos_id: int | None, period: int | None = None, *,
                what: str = "the text", asked: str | None = None):
    """The first ``tokens`` ids of ``text`` (BOS first when ``bos_id``); :class:`UsageError` if too short.
    ``period``: the text's first ``period`` ids over and over instead (a stream whose content repeats
    exactly, so that a difference between its segments is the cache's, not the text's). ``what`` and
    ``asked`` name the text and what asked for the tokens in that error (default ``--tokens N``)."""
    import torch

    from sinkfix.evaluate import token_ids  # not tokenize(): its own 2-token floor hid what was asked

    body = tokens - (bos_id is not None)
    if period is not None:
        # a text shorter than the period is what fails then: the error named "--tokens <period>", a
        # value the user never gave
        repeated = f"the {period} that --period {period} repeats" if period < body else None
        once = stream_text(tokenizer, text, min(period, body), None, what=what,
                           asked=repeated or asked or f"--tokens {tokens}")
        ids = once.repeat(-(-body // once.numel()))[:body]
        return ids if bos_id is None else torch.cat([torch.tensor([bos_id], dtype=ids.dtype), ids])
    # ~4 characters per token on this text; tokenize a generous prefix, then all of it if needed
    ids = token_ids(tokenizer, text[: body * 8])
    if ids.numel() < body:
        ids = token_ids(tokenizer, text)
    if ids.numel() < body:
        count = f"{ids.numel()} token{'' if ids.numel() == 1 else 's'}"
        raise UsageError(f"{what} has {count}, fewer than {asked or f'--tokens {tokens}'}")
    ids = ids[:body]
    return ids if bos_id is None else torch.cat([torch.tensor([bos_id], dtype=ids.dtype), ids])


STREAM_VARIANTS = ("sink", "window_only", "recompute")
PROFILE_VARIANTS = ("sink_profile", "recompute_profile")


def parse_variants(spec: str | None, profile: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(unpatched variants, patched variants without their suffix)."""
    known = STREAM_VARIANTS + (PROFILE_VARIANTS if profile else ())
    if spec is None:
        return STREAM_VARIANTS, (("sink", "recompute") if profile else ())
    chosen = tuple(part.strip() for part in spec.split(",") if part.strip())
    unknown = [v for v in chosen if v not in known]
    if not chosen or unknown:
        hint = "" if profile else " (the *_profile variants need --profile)"
        raise UsageError(f"--variants takes a comma-separated subset of {', '.join(known)}{hint}, got {spec!r}")
    repeated = sorted({v for v in chosen if chosen.count(v) > 1}, key=chosen.index)
    if repeated:
        # a repeated name ran that variant again (twice the time) and kept only its last run
        raise UsageError(f"--variants names {', '.join(repeated)} more than once, got {spec!r}: each variant may be "
                         "given once")
    if profile and not any(v in PROFILE_VARIANTS for v in chosen):
        # the profile would be used by no variant: ignored without a word (and not even checked
        # against the model), while stream.json still recorded it
        raise UsageError(f"--profile is used only by the {' and '.join(PROFILE_VARIANTS)} variants, and --variants "
                         f"{spec!r} names neither: add one of them or leave out --profile")
    return (tuple(v for v in chosen if v in STREAM_VARIANTS),
            tuple(v.removesuffix("_profile") for v in chosen if v in PROFILE_VARIANTS))


def _check_used_options(args, variants: tuple[str, ...], patched: tuple[str, ...]) -> None:
    """Refuse ``--recompute-every`` and ``--chunk`` given for variants that do not use them, then set
    the ones left out to their defaults. Each was accepted and recorded in stream.json (and the title)
    as part of the protocol while no variant used it, and a recomputing run given its own --chunk
    looked like a different stream to benchmarks/merge_stream_runs.py."""
    kinds = set(variants) | set(patched)
    spec = "the default variants" if args.variants is None else f"--variants {args.variants!r}"
    if args.recompute_every is not None and "recompute" not in kinds:
        raise UsageError(f"--recompute-every is used only by the recompute and recompute_profile variants, and {spec} "
                         "runs neither: add one of them or leave out --recompute-every")
    if args.chunk is not None and not kinds - {"recompute"}:
        raise UsageError(f"--chunk is used only by the cache variants (sink, window_only, sink_profile), and {spec} "
                         "runs only recomputations, which score fresh windows: leave out --chunk")
    if args.chunk is None:
        args.chunk = DEFAULT_CHUNK
    if args.recompute_every is None:
        args.recompute_every = DEFAULT_RECOMPUTE_EVERY


def _check(args) -> None:
    from sinkfix.analysis.streaming import check_stream_arguments
    from sinkfix.caches import check_sink_window

    from sinkfix.texts import MIXED, resolve_domain

    _check_used_options(args, *parse_variants(args.variants, args.profile is not None))
    if args.text is not None and not str(args.text).strip():
        # an unset shell variable (--text "$FILE") streamed the built-in text, unsaid
        raise UsageError("--text is empty: name a text file, or leave the option out for the built-in text")
    if args.text is None and args.builtin != MIXED:
        resolve_domain(args.builtin)  # an unknown name fails here, before the model loads
    check_sink_window(args.n_sink, args.window)
    check_stream_arguments(args.tokens, args.n_sink, args.window, args.chunk, args.segment, args.recompute_every)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if not args.no_figures:  # the figure is drawn after every variant has run
        from sinkfix.analysis.plots import check_matplotlib

        check_matplotlib()
    if args.period is not None and args.period <= args.n_sink + args.window:
        raise UsageError(f"--period must be larger than the cache ({args.n_sink + args.window} tokens), got "
                         f"{args.period}: a repetition in view could be copied")
    if args.period is not None and args.period >= args.tokens:
        # nothing repeats: the stream was the plain text, recorded as the periodic control
        raise UsageError(f"--period {args.period} is not shorter than the stream (--tokens {args.tokens}): nothing "
                         "would repeat; give a period below --tokens or leave out --period")


def _load_text(args) -> tuple[str, str]:
    from sinkfix.texts import MIXED, domain_source, domain_text, mixed_text, read_text_file, resolve_domain

    if args.text:
        return read_text_file(args.text), str(args.text)
    if args.builtin == MIXED:
        mixed = mixed_text("eval")
        return mixed.text, mixed.source
    name = resolve_domain(args.builtin)
    return domain_text(name, "eval"), domain_source(name, "eval")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import sinkfix
    from sinkfix.analysis.streaming import measure_streaming
    from sinkfix.caches import SinkCache
    from sinkfix.evaluate import bos_token_id

    _check(args)  # before anything slow
    from sinkfix.files import check_writable

    out = check_writable(args.out, folder=True)
    # the files it will hold too: a folder in a file's place was found only after every variant had
    # run, and one of them written beside the failure
    for name in ("stream.json", "stream_tokens.pt") + (() if args.no_figures else ("stream.png",)):
        check_writable(out / name)
    text, source = _load_text(args)
    profile = sinkfix.Profile.load(args.profile) if args.profile is not None else None
    if profile is not None and profile.content_sinks is not None and not profile.content_sinks.is_identity:
        # a stream always evicts (--tokens exceeds the cache), which content-dependent sinks cannot
        # follow: known from the file, so refused before the model loads, not after the unpatched
        # variants. A content part that corrects no head (calibrate writes one when the identity or the
        # positional rule wins) patches the positional path alone and streams as such.
        raise UsageError(f"--profile {args.profile} is a content-mode profile: content-dependent sinks cannot follow a "
                         "SinkCache that has evicted tokens (docs/content_sinks.md in the source distribution), "
                         "and a stream always evicts; use a positional profile")
    set_threads(args.threads)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    log(f"text: {source}; loading {args.model} ...")
    model, tokenizer = sinkfix.load_model(args.model)
    variants, patched_variants = parse_variants(args.variants, profile is not None)
    # what the model must fit, checked before any variant runs (the documented 20,738-token stream
    # takes tens of minutes per variant):
    # the profile (the patched variants come last), and a cache for it (no RoPE: refused)
    policy = profile.policy_for(model) if profile is not None and patched_variants else None
    sliding = []
    if {"sink", "window_only"} & set(variants) or "sink" in patched_variants:
        cache = SinkCache(model.config, n_sink=args.n_sink, window=args.window)
        sliding = [layer.window for layer in cache.layers if getattr(layer, "is_sliding", False)]
    bos, bos_from, bos_note = _choose_bos(args, profile, tokenizer_adds_bos(tokenizer))
    if bos_note:
        print(f"sinkfix stream: note: {bos_note}", file=sys.stderr)
    bos_id = bos_token_id(tokenizer) if bos else None
    if args.period is not None and bos_id is not None and args.period >= args.tokens - 1:
        # known only now: the BOS takes one of the stream's tokens, and the period must still repeat
        raise UsageError(f"--period {args.period} is not shorter than the stream after its BOS ({args.tokens - 1} "
                         "tokens): nothing would repeat; give a smaller period or leave out --period")
    ids = stream_text(tokenizer, text, args.tokens, bos_id, args.period, what=f"the text ({source})")
    settings = dict(n_sink=args.n_sink, window=args.window, chunk=args.chunk, segment_len=args.segment,
                    recompute_every=args.recompute_every, bos_id=bos_id)
    runs = len(variants) + len(patched_variants)
    with tqdm(total=runs * args.tokens, unit="tok", desc="stream", file=sys.stderr, leave=False) as bar:
        result = measure_streaming(model, ids, **settings, variants=variants, on_tokens=bar.update)
        if patched_variants:
            with sinkfix.patch(model, policy):
                patched = measure_streaming(model, ids, **settings, variants=patched_variants,
                                            suffix="_profile", on_tokens=bar.update)
            result.variants.update(patched.variants)
    result.protocol.update(model=args.model, text=source, profile=args.profile, period=args.period, bos_from=bos_from)
    if sliding:
        # a hybrid model's sliding layers keep their own window in both caches (as transformers' own
        # cache does), while the recomputation sees n_sink + window + 1 tokens in every layer: on
        # Gemma3-270M 15 of 18 layers keep 511 tokens against the recomputation's 257
        result.protocol.update(sliding_layers=len(sliding), sliding_layer_tokens=max(sliding),
                               layers=len(cache.layers))
    summary = result.summary()
    from sinkfix.files import atomic_write, atomic_write_text, strict_json

    # a segment without a recomputed position has no ratio (NaN): null in JSON
    atomic_write_text(out / "stream.json", strict_json(summary, indent=2) + "\n")
    with atomic_write(out / "stream_tokens.pt", "wb") as handle:  # per-token NLL, NaN = not scored
        torch.save(result.token_nll(), handle)
    # the results first, the figure last: a figure that fails must not take the printed results with it
    if args.json:
        print(strict_json(summary), flush=True)
    else:
        _print_table(summary)
    log(f"wrote {out / 'stream.json'} and {out / 'stream_tokens.pt'}")
    # an earlier run's figure beside this run's stream.json would read as this run's: removed when this
    # run draws none, or when its own drawing fails
    from sinkfix.files import remove_unwritten

    if args.no_figures:
        for path in remove_unwritten(out, ["stream.png"], []):
            log(f"removed {path} (an earlier run's figure; this run did not draw it)")
        return 0
    from sinkfix.analysis.plots import running_perplexity_plot

    try:
        log(f"wrote {running_perplexity_plot(result, out / 'stream.png')}")
    except BaseException:
        remove_unwritten(out, ["stream.png"], [])
        raise
    return 0


def _choose_bos(args: argparse.Namespace, profile, tokenizer_default: bool) -> tuple[bool, str, str | None]:
    """Whether the stream starts with BOS, where that came from ("flag", "profile", "tokenizer") and a
    note for stderr. A profile's recorded protocol is the default, as in `sinkfix bench`: SmolLM2's
    tokenizer adds no BOS, and its stored BOS profile (fitted on windows that start with one, its
    virtual logit on the sink rows because of it) was streamed without one, unsaid."""
    from sinkfix.profile import bos_choice

    recorded = None if profile is None else profile.recorded_bos
    name = None if args.profile is None else Path(args.profile).name
    bos, source, note = bos_choice(args.bos, recorded, name, "the profile variants' perplexities")
    if bos is None:
        return tokenizer_default, source, None
    if source == "profile" and recorded != tokenizer_default:
        other = "--no-bos" if recorded else "--bos"
        note = (f"{'BOS first' if recorded else 'no BOS'}, as --profile {name} was calibrated "
                f"(the tokenizer {'adds none' if recorded else 'adds one'}; {other} for the other)")
    return bos, source, note


def _cell(value: float | None) -> str:
    """A table cell: ``-`` where there is no number (no recomputation ran, no whole segment), as in
    the other commands' tables; it printed ``nan``."""
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _print_table(summary: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from sinkfix.analysis.streaming import recompute_positions
    from sinkfix.commands.inspect import wide_console

    p = summary["protocol"]
    console = wide_console()
    names = [name for name in summary if name not in ("paired", "protocol")]
    # the chunk only when a cache variant ran, the interval only when a recomputation did
    chunks = f", chunks of {p['chunk']}" if any(not name.startswith("recompute") for name in names) else ""
    title = (f"{p['model']}: {p['tokens']} tokens of {p['text']}; {'BOS + ' if p['bos'] else 'no BOS, '}"
             f"cache {p['n_sink']} sinks + {p['window']} recent{chunks}, segments of {p['segment_len']}")
    if any(name.startswith("recompute") for name in names):
        title += f", recompute every {p['recompute_every']}"
    if p.get("sliding_layers"):
        context = p["n_sink"] + p["window"] + 1  # what the recomputation feeds, and a decode step sees
        if p["sliding_layer_tokens"] + 1 > context:
            title += (f"; {p['sliding_layers']} of {p['layers']} layers are sliding-window layers that keep their own "
                      f"{p['sliding_layer_tokens']} tokens in both caches, more than the recomputation's {context}")
        else:
            # the model's own window (kept tokens + the query) fits in the recomputation's context: there
            # every variant sees the same tokens (a tiny Gemma3 with window 8 keeps 7, against 25)
            title += (f"; {p['sliding_layers']} of {p['layers']} layers are sliding-window layers whose own window "
                      f"({p['sliding_layer_tokens']} kept tokens + the query) fits in the recomputation's {context}: "
                      "there every variant sees the same tokens")
    table = Table(title=escape(title), title_justify="left")  # the model's and the text's names as written
    for column in ("variant", "ppl", "scored", "first seg", "last seg", "last/first", "ppl on recompute positions",
                   "vs recompute", "ms/tok first/last", "CPU ms/tok first/last", "peak RSS MiB first/last",
                   "cache MiB"):
        table.add_column(column, justify="right" if column != "variant" else "left",
                         no_wrap=column in ("first seg", "last seg"))
    paired = summary.get("paired", {})
    for name, v in summary.items():
        if name in ("paired", "protocol"):
            continue
        seg = v["segments"]
        first, last = (seg[0], seg[-1]) if seg else (None, None)
        first_cell, last_cell = _cell(first), _cell(last)
        # one segment is first and last at once: its "1.000" read as a stream that stayed flat
        drift = f"{last / first:.3f}" if len(seg) > 1 else "-"
        if name.startswith("recompute") and p["segments"]:
            # a recomputation scores every recompute_every-th token: its segment perplexities come from a
            # few positions (4 of a 64-token segment at the default), not from every token as the caches'
            scored = recompute_positions(p["warmup"], p["tokens"], p["recompute_every"])
            counts = [sum(lo <= x < hi for x in scored) for lo, hi in p["segments"]]
            first_cell, last_cell = f"{first_cell} ({counts[0]})", f"{last_cell} ({counts[-1]})"
            table.caption = ("(n): a recomputation's segment perplexity, from the n tokens it scored in that "
                             "segment (one every recompute_every)")
            table.caption_justify = "left"
        if len(seg) == 1:
            last_cell = "-"
        pair = paired.get(name, {})
        ms, cpu, rss = v["ms_per_token"], v.get("cpu_ms_per_token", []), v["peak_rss_mib"]
        table.add_row(
            name, f"{v['ppl']:.3f}", str(v["tokens"]), first_cell, last_cell, drift,
            _cell(pair.get("ppl")), _cell(pair.get("ratio_to_recompute")),
            f"{ms[0]:.1f} / {ms[-1]:.1f}" if ms else "-", f"{cpu[0]:.1f} / {cpu[-1]:.1f}" if cpu else "-",
            f"{rss[0]:.0f} / {rss[-1]:.0f}" if rss else "-",
            f"{v['cache_mib'][-1]:.2f}" if v["cache_mib"] else "-",
        )
    console.print(table)
