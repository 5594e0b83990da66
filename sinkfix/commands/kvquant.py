"""``sinkfix kvquant``: perplexity of a full, a quantized and a sink-protected quantized KV cache.

    sinkfix kvquant --model smollm2-135m                      # 2- and 4-bit, built-in held-out prose + code
    sinkfix kvquant --model gemma3-270m --bits 2 --json
    sinkfix kvquant --text notes.txt --sequences 4 --backend hqq
    sinkfix kvquant --backend fp8                              # float8 e4m3, one scale per tensor (bits 8)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from sinkfix.commands import SUMMARIES, set_threads
from sinkfix.errors import UsageError
from sinkfix.files import atomic_write_text, strict_json

__all__ = ["add_parser", "run", "parse_bits", "default_texts"]

DEFAULT_RESIDUAL = 128  # transformers' QuantizedCache default


def add_parser(subparsers) -> argparse.ArgumentParser:
    from sinkfix.caches import BACKENDS
    from sinkfix.models import DEFAULT_MODEL

    parser = subparsers.add_parser(
        "kvquant", help=SUMMARIES["kvquant"],
        description="Feed held-out sequences through a full-precision cache, transformers' quantized cache and "
                    "a SinkCache that keeps the sink tokens in full precision, at each bit width; report "
                    "perplexity and the share of the quantization loss that protecting the sinks recovers.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"offline model name, folder or hub id (default {DEFAULT_MODEL})")
    parser.add_argument("--text", action="append", metavar="FILE", default=None,
                        help="UTF-8 text, one domain per file; repeatable (default: the built-in held-out prose and code)")
    parser.add_argument("--bits", default=None,
                        help="comma-separated bit widths: 2 and/or 4 for quanto and hqq (default 2,4), 8 for fp8 (default)")
    parser.add_argument("--backend", default="quanto", choices=BACKENDS,
                        help="quantization backend (default quanto; fp8 = transformers' per-tensor float8 e4m3)")
    parser.add_argument("--n-sink", type=int, default=4, help="sink tokens kept in full precision (default 4)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence, BOS included (default 2048)")
    parser.add_argument("--sequences", type=int, default=1, help="sequences per domain (default 1)")
    # None = not given: fp8 has no residual window and refuses an explicit value, which it would ignore
    parser.add_argument("--residual-length", type=int, default=None,
                        help=f"recent tokens kept in full precision before quantization (default {DEFAULT_RESIDUAL}, "
                             "as transformers; the residual is flushed when it and a call's new tokens reach this "
                             "length, so it acts in whole --chunk steps: every value up to --chunk "
                             "gives the same numbers; not with --backend fp8, which has no residual window)")
    parser.add_argument("--chunk", type=int, default=128, help="tokens per forward (default 128)")
    parser.add_argument("--hidden-sinks", action="store_true",
                        help="also run a cache that keeps the hidden sinks attention finds in full precision "
                             "(ACT's criterion, as sinkfix inspect; runs the model through sinkfix's attention)")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help="start every sequence with BOS (default: if the tokenizer adds one)")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON result to FILE")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout, nothing else")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(run=run)
    return parser


def parse_bits(spec: str | None, backend: str = "quanto") -> list[int]:
    from sinkfix.caches.quantize import BITS_BY_BACKEND

    allowed = BITS_BY_BACKEND.get(backend, ())
    if spec is None:
        return list(allowed)
    try:
        widths = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--bits must be comma-separated integers, got {spec!r}") from None
    bad = [w for w in widths if w not in allowed]
    if not widths or bad:
        raise UsageError(f"--bits with --backend {backend} takes {' and '.join(map(str, allowed))}, got {spec!r}")
    return sorted(set(widths))


def _check(args) -> list[int]:
    """The bit widths; resolves ``args.residual_length`` (None when not given) to its default."""
    widths = parse_bits(args.bits, args.backend)
    if args.backend == "fp8" and args.residual_length is not None:
        # accepted before and dropped without a word (the protocol recorded residual_length null)
        raise UsageError(f"--residual-length with --backend fp8: fp8 casts every token and has no residual window, "
                         f"got --residual-length {args.residual_length}")
    if args.residual_length is None:
        args.residual_length = DEFAULT_RESIDUAL
    for label, value, low in (("--n-sink", args.n_sink, 0), ("--seq-len", args.seq_len, 2),
                              ("--sequences", args.sequences, 1), ("--residual-length", args.residual_length, 1),
                              ("--chunk", args.chunk, 1)):
        if value < low:
            raise UsageError(f"{label} must be >= {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    from sinkfix.analysis.kvquant import check_measurable

    check_measurable([args.seq_len], chunk=args.chunk, n_sink=args.n_sink)  # before the model loads
    return widths


def _sequences(tokenizer, texts, seq_len: int, count: int, bos_id: int | None):
    """The first ``count`` consecutive ``seq_len``-token sequences of each text."""
    import torch

    from sinkfix.commands.stream import stream_text

    out = []
    body = seq_len - (bos_id is not None)
    besides = " besides their BOS" if bos_id is not None else ""
    for name, source in texts.items():
        ids = stream_text(tokenizer, source.text, body * count, None, what=f"the text {name} ({source.source})",
                          asked=f"the {body * count} that --seq-len {seq_len} x --sequences {count} take{besides}")
        for i in range(count):
            piece = ids[i * body : (i + 1) * body]
            out.append(piece if bos_id is None else torch.cat([torch.tensor([bos_id], dtype=piece.dtype), piece]))
    return out


def default_texts(files):
    """The texts to measure: ``files``, or the two quick built-in domains (prose: Python's language
    reference; code: standard-library source), 2 x 2,048 tokens, which keeps the default run within
    a few minutes on a CPU."""
    from sinkfix.texts import QUICK_DOMAINS, load_texts

    return load_texts(files or (), None, "eval", None if files else QUICK_DOMAINS)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import sinkfix
    from sinkfix.analysis.kvquant import measure_kvquant
    from sinkfix.caches import KVQuantizer
    from sinkfix.commands.stream import tokenizer_adds_bos
    from sinkfix.evaluate import bos_token_id

    widths = _check(args)
    if args.out:
        from sinkfix.files import check_out_is_no_input, check_writable

        check_writable(args.out)  # before the measurements, not after them
        # `--text t.txt --out t.txt` replaced the text it had just measured with the result, exit status 0
        check_out_is_no_input(args.out, [(f"the text {text} (--text)", text) for text in args.text or ()],
                              "the result")
    KVQuantizer(args.backend, widths[0])  # a missing backend package fails here, before the model loads
    texts = default_texts(args.text)
    set_threads(args.threads)
    from sinkfix.bench.provenance import load_average

    start_load = load_average()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    log("texts: " + "; ".join(f"{n} ({t.source})" for n, t in texts.items()) + f"; loading {args.model} ...")
    model, tokenizer = sinkfix.load_model(args.model)
    bos = tokenizer_adds_bos(tokenizer) if args.bos is None else args.bos
    bos_id = bos_token_id(tokenizer) if bos else None
    sequences = _sequences(tokenizer, texts, args.seq_len, args.sequences, bos_id)
    total = sum(len(s) for s in sequences) * (1 + (2 + args.hidden_sinks) * len(widths))  # forwards x tokens
    with tqdm(total=total, unit="tok", desc="kvquant", file=sys.stderr, leave=False) as bar:
        rows = measure_kvquant(model, sequences, bits=widths, backend=args.backend, n_sink=args.n_sink,
                               residual_length=None if args.backend == "fp8" else args.residual_length, chunk=args.chunk,
                               hidden_sinks=args.hidden_sinks, on_tokens=bar.update)
    result = {str(row.bits): row.as_json() for row in rows}
    result["protocol"] = {
        "model": args.model, "texts": {n: t.source for n, t in texts.items()}, "seq_len": args.seq_len,
        "sequences_per_text": args.sequences, "bos": bos, "backend": args.backend, "n_sink": args.n_sink,
        "residual_length": None if args.backend == "fp8" else args.residual_length, "chunk": args.chunk, "hidden_sinks": args.hidden_sinks,
        "groups": ("one scale per tensor (keys, values), calibrated on the first block stored" if args.backend == "fp8"
                   else "per token and kv head, 64 channels (or the head) each"),
        "group_size": None if args.backend == "fp8" else _group_size(model),
        # which text was measured, not only where it came from: a --text file can change under its name
        "text_sha256": {n: hashlib.sha256(t.text.encode("utf-8")).hexdigest() for n, t in texts.items()},
    }
    # the numbers move with the CPU's rounding and the libraries' versions (4 bits, SmolLM2: 9.550 with
    # the stack of 2026-11-30, 9.574 with transformers 5.25 on 2026-12-07): record both
    result["provenance"] = _provenance(model, start_load)
    if args.out:
        atomic_write_text(Path(args.out), strict_json(result, indent=2) + "\n")
    if args.json:
        print(strict_json(result))  # a share with nothing to recover is NaN: null in JSON
    else:
        _print_table(result)
    return 0


def _group_size(model) -> int:
    """Channels per quantization group as the caches measured choose them by default (asked of one)."""
    from sinkfix.caches import SinkCache

    return SinkCache(model.config, n_sink=0, window=None).q_group_size


def _provenance(model, load_average_start) -> dict:
    """Device, threads, versions (the quantization backends' too) and load, as the benchmarks record them."""
    from sinkfix.bench.provenance import load_average, provenance

    record = provenance(next(model.parameters()).device, extra_distributions=("optimum-quanto", "hqq"))
    record["load_average_start"], record["load_average_end"] = load_average_start, load_average()
    return record


# below this relative perplexity change of the quantized cache, the table shows no perplexity share
SMALL_PPL_LOSS = 1e-3


def _print_table(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from sinkfix.commands.inspect import wide_console

    p = result["protocol"]
    residual = "no residual window" if p["residual_length"] is None else f"residual {p['residual_length']}"  # fp8
    title = (f"{p['model']}: {', '.join(p['texts'])}, {p['sequences_per_text']} x {p['seq_len']} tokens each, "
             f"{'BOS' if p['bos'] else 'no BOS'}, {p['backend']}, {residual}, "
             f"{p['n_sink']} sinks protected")
    table = Table(title=escape(title), title_justify="left")  # the model's and the texts' names as written
    hidden = p.get("hidden_sinks")
    names = ["quantized", "sink_protected"] + (["hidden_protected"] if hidden else [])
    columns = ["bits", "full ppl"] + [f"{n} ppl" for n in names] + [f"KL {n}" for n in names]
    columns += ["recovered ppl", "recovered KL"] + (["recovered ppl / KL (hidden)"] if hidden else [])
    for column in columns + ["tokens", "quantized cache"]:
        table.add_column(column.replace("_", " "), justify="left" if column == "quantized cache" else "right")
    small_rows = lower_rows = 0
    clipped_captions = []
    for bits, row in result.items():
        if not bits.isdigit():  # "protocol", "provenance": the run's record, not a bit width's row
            continue
        if row.get("fp8_saturated"):  # the frozen scale clipped later tokens: docs/caches.md, "fp8"
            clipped = ", ".join(f"{name.replace('_', ' ')} {count:,}" for name, count in row["fp8_saturated"].items())
            clipped_captions.append(f"fp8 elements clipped at the frozen scale's range: {clipped}")
        cells = [bits, f"{row['full']:.3f}"]
        cells += [f"{row[n]:.3f} ({100 * (row[n] / row['full'] - 1):+.1f}%)" for n in names]
        cells += [f"{row['kl'][n]:.4f}" for n in names]
        # a share of a loss this small is a ratio of two small differences of the same size, noise
        # (fp8 on SmolLM2, 320 tokens: quantized 14.004 against 14.001, the share printed 2135.5%):
        # shown as n/a, kept in JSON
        small = abs(row["quantized_vs_full"]) < SMALL_PPL_LOSS
        # a quantized perplexity below full leaves no loss to recover: the share is undefined (null in
        # JSON) and printed "nan%" (tiny Llama at 2 bits: quantized 0.2% below full)
        lower = not small and row["quantized_vs_full"] <= 0
        small_rows += small
        lower_rows += lower
        mark = "n/a*" if small else "n/a**" if lower else None
        ppl_share = mark or _share(row["recovered"])
        cells += [ppl_share, _share(row["recovered_kl"])]
        if hidden:
            hidden_share = mark or _share(row["recovered_hidden"])
            cells.append(f"{hidden_share} / {_share(row['recovered_kl_hidden'])}")
        table.add_row(*cells, str(row["tokens"]), row["quantized_cache"])
    captions = []
    if small_rows:
        captions.append(f"* quantization moved the perplexity by less than {100 * SMALL_PPL_LOSS:g}%: a share of so "
                        "small a loss says nothing (see the KL columns; the value is kept in the JSON)")
    if lower_rows:
        captions.append("** quantization did not raise the perplexity: there is no loss to recover, so no share "
                        "(see the KL columns; null in the JSON)")
    captions += clipped_captions
    if captions:
        table.caption = "\n".join(captions)
        table.caption_justify = "left"
    wide_console().print(table)


def _share(value) -> str:
    """A recovered share as a percentage; ``n/a`` when it is undefined (NaN in Python, null in JSON:
    no loss to recover, e.g. a KL of exactly 0)."""
    if value is None or value != value:
        return "n/a"
    return f"{100 * value:.1f}%"
