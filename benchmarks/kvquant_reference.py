"""An independent reference for `sinkfix kvquant`: the documented protocol rebuilt from scratch.

The quantized caches are simulated here without sinkfix's cache code: min/max quantization of
``--group``-channel groups per token and head (``2**bits - 1`` levels, round to nearest), the
residual window's flush rule (a chunk that fills the full-precision residual re-quantizes every
stored token), the first ``--n-sink`` tokens overlaid in full precision for the protected variant;
the stored states reach the model through a plain ``DynamicCache`` per chunk. Beside it run
transformers' own ``QuantizedCache`` and sinkfix's ``measure_kvquant`` on the same token ids, so the
printed table compares all three in one run. ``--quantizer-dtype`` chooses the arithmetic of the
simulated quantizer: float32 (quanto's) or float64 (the formula computed exactly), which is what
docs/caches.md ("How exact the columns are") measures.

    python benchmarks/kvquant_reference.py --quantizer-dtype float32 --out r32.json
    python benchmarks/kvquant_reference.py --quantizer-dtype float64 --out r64.json
    python benchmarks/kvquant_reference.py --count-codes     # how many codes the two arithmetics round apart
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch


def quantize_codes(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype):
    """Codes, step and low end of (B, H, T, D) quantized per token and head in groups of ``group`` channels."""
    b, h, t, d = x.shape
    g = group if d % group == 0 else d
    y = x.to(dtype).reshape(b, h, t, d // g, g)
    low, high = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
    levels = 2 ** bits - 1
    step = (high - low) / levels
    codes = torch.nan_to_num(torch.clamp(torch.round((y - low) / step), 0, levels), nan=0.0)  # constant groups
    return codes, step, low


def fake_quantize(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Quantize and dequantize (B, H, T, D) per token and head in groups of ``group`` channels."""
    codes, step, low = quantize_codes(x, bits, group, dtype)
    return (codes * step + low).reshape(x.shape).to(x.dtype)


class SimulatedCache:
    """Per layer: the quantized part (already dequantized), the full-precision residual, and the
    exact states of every token (for the protected sinks)."""

    def __init__(self, layers: int, n_sink: int, bits: int, group: int, residual: int, dtype: torch.dtype) -> None:
        self.n_sink, self.bits, self.group, self.residual, self.dtype = n_sink, bits, group, residual, dtype
        self.quantized: list = [None] * layers
        self.recent: list = [None] * layers
        self.exact: list = [None] * layers

    def stored(self, layer: int):
        if self.quantized[layer] is None:
            return None
        keys, values = (torch.cat([q, r], -2) for q, r in zip(self.quantized[layer], self.recent[layer]))
        if self.n_sink:
            n = self.n_sink
            keys, values = keys.clone(), values.clone()
            keys[..., :n, :], values[..., :n, :] = (s[..., :n, :] for s in self.exact[layer])
        return keys, values

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        quantize = lambda x: fake_quantize(x, self.bits, self.group, self.dtype)  # noqa: E731
        if self.exact[layer] is None:  # the first chunk is quantized at once
            self.exact[layer] = (keys, values)
            self.quantized[layer] = (quantize(keys), quantize(values))
            self.recent[layer] = (keys[..., :0, :], values[..., :0, :])
            return
        self.exact[layer] = tuple(torch.cat([e, n], -2) for e, n in zip(self.exact[layer], (keys, values)))
        recent = self.recent[layer]
        if recent[0].shape[-2] + keys.shape[-2] >= self.residual:  # flush: re-quantize everything stored
            self.quantized[layer] = tuple(quantize(torch.cat([q, r, n], -2)) for q, r, n in
                                          zip(self.quantized[layer], recent, (keys, values)))
            self.recent[layer] = (keys[..., :0, :], values[..., :0, :])
        else:
            self.recent[layer] = tuple(torch.cat([r, n], -2) for r, n in zip(recent, (keys, values)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--residual-length", type=int, default=128)
    parser.add_argument("--n-sink", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--quantizer-dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--count-codes", action="store_true",
                        help="only count the codes that float32 and float64 arithmetic round apart, on the first "
                             "sequence's keys and values quantized once")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import DynamicCache, QuantizedCache

    import sinkfix
    from sinkfix.analysis.kvquant import measure_kvquant
    from sinkfix.bench.provenance import provenance
    from sinkfix.caches.chunked import cache_keyword
    from sinkfix.commands.kvquant import _sequences, default_texts
    from sinkfix.commands.stream import tokenizer_adds_bos
    from sinkfix.evaluate import bos_token_id

    model, tokenizer = sinkfix.load_model(args.model)
    bos_id = bos_token_id(tokenizer) if tokenizer_adds_bos(tokenizer) else None
    sequences = _sequences(tokenizer, default_texts(None), args.seq_len, 1, bos_id)
    layers = model.config.get_text_config().num_hidden_layers
    dtype = getattr(torch, args.quantizer_dtype)
    keyword = cache_keyword(model)  # `cache` from transformers 5.24 on
    if args.count_codes:
        with torch.no_grad():
            full = DynamicCache(config=model.config)
            model(sequences[0][None], **{keyword: full}, use_cache=True)
        states = [s for layer in full.layers for s in (layer.keys, layer.values)]
        apart = sum(int((quantize_codes(s, args.bits, args.group, torch.float32)[0]
                         != quantize_codes(s, args.bits, args.group, torch.float64)[0]).sum()) for s in states)
        print(f"{apart} of {sum(s.numel() for s in states)} {args.bits}-bit codes round apart between float32 and "
              f"float64 arithmetic ({sequences[0].numel()} tokens, {len(full.layers)} layers, keys and values)")
        return 0

    @torch.no_grad()
    def log_probs(piece, cache):
        return model(piece[None], **{keyword: cache}, use_cache=True).logits[0].double().log_softmax(-1)

    @torch.no_grad()
    def simulated(sim: SimulatedCache, piece):
        cache = DynamicCache(config=model.config)
        for layer in range(layers):
            states = sim.stored(layer)
            if states is not None:
                cache.update(*states, layer)
        out = log_probs(piece, cache)
        for layer in range(layers):
            sim.append(layer, cache.layers[layer].keys[..., -piece.numel():, :],
                       cache.layers[layer].values[..., -piece.numel():, :])
        return out

    nll: dict[str, float] = {}
    kl: dict[str, float] = {}
    count = 0
    for ids in sequences:
        caches = {"full": DynamicCache(config=model.config),
                  "transformers_quantized": QuantizedCache("quanto", model.config, nbits=args.bits, axis_key=0,
                                                           axis_value=0, q_group_size=args.group,
                                                           residual_length=args.residual_length)}
        sims = {name: SimulatedCache(layers, n, args.bits, args.group, args.residual_length, dtype)
                for name, n in (("reference_quantized", 0), ("reference_protected", args.n_sink))}
        for start in range(0, ids.numel() - 1, args.chunk):
            piece = ids[start:start + args.chunk]
            targets = ids[start + 1:start + 1 + piece.numel()]
            n = targets.numel()
            outs = {name: log_probs(piece, cache)[:n] for name, cache in caches.items()}
            outs.update({name: simulated(sim, piece)[:n] for name, sim in sims.items()})
            full = outs["full"]
            for name, out in outs.items():
                nll[name] = nll.get(name, 0.0) + float(-out.gather(-1, targets[:, None]).sum())
                kl[name] = kl.get(name, 0.0) + float((full.exp() * (full - out)).sum())
            count += n
    rows = measure_kvquant(model, sequences, bits=(args.bits,), backend="quanto", n_sink=args.n_sink,
                           chunk=args.chunk, residual_length=args.residual_length)
    ours = rows[0]
    result = {
        "perplexity": {name: math.exp(v / count) for name, v in nll.items()},
        "kl": {name: v / count for name, v in kl.items()},
        "sinkfix": {variant: {"perplexity": ours.ppl(variant), "kl": ours.kl(variant)}
                    for variant in ("full", "quantized", "sink_protected")},
        "tokens": count, "arguments": vars(args),
        "provenance": provenance(torch.device("cpu"), extra_distributions=("optimum-quanto",)),
    }
    if ours.tokens != count:
        raise SystemExit(f"sinkfix scored {ours.tokens} tokens, the reference {count}: not the same protocol")
    print(f"{count} scored tokens; quantizer arithmetic of the reference: {args.quantizer_dtype}")
    for name in result["perplexity"]:
        print(f"  {name:24s} ppl {result['perplexity'][name]:.6f}  KL {result['kl'][name]:.7f}")
    for variant, numbers in result["sinkfix"].items():
        print(f"  sinkfix {variant:16s} ppl {numbers['perplexity']:.6f}  KL {numbers['kl']:.7f}")
    if args.out:
        from sinkfix.files import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
