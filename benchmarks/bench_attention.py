"""Benchmark of sinkfix's Triton attention kernels on a CUDA GPU.

Prefill: forward TFLOP/s, bf16, causal, hd 64 and 128, 16k tokens per batch (batch = 16384 / seqlen,
hidden 2048, i.e. 32 or 16 heads), seqlen 1k..16k, FLOPs = 4 * B * H * Sq * avg_Sk * D with causal
avg_Sk = (max(0, Sk - Sq) + Sk) / 2. Side by side: torch SDPA's flash backend (plain softmax), and
FlexAttention (torch.compile'd) with the logit-bias score_mod ``score + log(beta_h)`` on the sink
column, the cheapest way to get *a* sink scaling out of FlexAttention. That is the logit-bias
form, not the ACT rule that sinkfix implements (ACT scales the sink's probability by beta and gives
the freed mass to the other keys; the bias form renormalises everything); it is here as a speed
yardstick only. Each sinkfix policy is also shown relative to sinkfix without sink arguments.

Decode: one new token per sequence against 4k / 32k / 128k cached keys, batch 1 and 16, bf16,
Llama-3-8B heads (32 query, 8 kv, hd 128); achieved bytes per second (K and V read once, plus q,
out and the split workspace) as a share of the device copy bandwidth measured in the same run.

Timing: ``triton.testing.do_bench`` (median, L2 flushed between runs, warm-up included).

    python benchmarks/bench_attention.py --out results.md [--quick] [--sweep]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

SEQLENS = (1024, 2048, 4096, 8192, 16384)
TOKENS = 16384
HIDDEN = 2048
DECODE_KEYS = (4096, 32768, 131072)
DECODE_BATCH = (1, 16)
POLICIES = ("plain", "identity", "scaling", "drop", "virtual", "combined")


def _policy_kwargs(policy: str, heads: int, batch: int, device) -> dict:
    """Sink arguments of each policy: 'plain' has none (softmax with no sink bookkeeping at all),
    'identity' carries a sink column with beta = 1 (the sink machinery at no numerical effect)."""
    g = torch.Generator().manual_seed(0)
    sink0 = torch.zeros(batch, 1, dtype=torch.long, device=device)
    if policy == "plain":
        return {}
    if policy == "identity":
        return dict(sink_cols=sink0, beta=torch.ones(heads, device=device))
    if policy == "scaling":
        return dict(sink_cols=sink0, beta=(0.4 + 0.5 * torch.rand(heads, generator=g)).to(device))
    if policy == "drop":
        return dict(sink_cols=sink0, beta=torch.zeros(heads, device=device))
    if policy == "virtual":
        return dict(sink_cols=sink0, virtual_sink_logit=torch.full((heads,), 1.0, device=device))
    if policy == "combined":
        return dict(sink_cols=torch.tensor([[0, 1, 2, 3]] * batch, device=device),
                    beta=(0.4 + 0.5 * torch.rand(heads, generator=g)).to(device),
                    virtual_sink_logit=torch.randn(heads, generator=g).to(device))
    raise ValueError(policy)


class Report:
    """Markdown written to --out after every section, so a timeout keeps what was measured."""

    def __init__(self, path: Path | None):
        self.path, self.lines = path, []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("\n".join(self.lines) + "\n")


def _bench(fn) -> float:
    """Median milliseconds of fn (do_bench warms up, flushes L2 between runs)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbs() -> float:
    """Device memory bandwidth as seen by a plain 2 GiB device-to-device copy (read + write)."""
    src = torch.empty(2 ** 30, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def bench_prefill(report: Report, seqlens, head_dims, policies, flex_seqlens) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sinkfix.kernels.attention_prefill import prefill_config, sink_attention_prefill

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:  # older torch
        flex, flex_error = None, exc
    report.add("", "## Prefill forward, bf16, causal, 16k tokens per batch (TFLOP/s)", "",
               "FlexAttention column: logit-bias score_mod `score + log(beta_h)` on the sink column, "
               "NOT the ACT rule sinkfix computes; speed yardstick only.", "",
               "| hd | seqlen | batch x heads | sinkfix config | " + " | ".join(f"sinkfix {p}" for p in policies)
               + " | SDPA flash | Flex logit-bias | " + " | ".join(f"{p} / plain" for p in policies if p != "plain")
               + " |",
               "|" + "---|" * (6 + 2 * len(policies) - (1 if "plain" in policies else 0)))
    for hd in head_dims:
        heads = HIDDEN // hd
        for seqlen in seqlens:
            batch = max(1, TOKENS // seqlen)
            q, k, v = (torch.randn(batch, heads, seqlen, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * batch * heads * seqlen * (seqlen / 2) * hd
            tflops = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
            ours = {}
            for policy in policies:
                kw = _policy_kwargs(policy, heads, batch, "cuda")
                ours[policy] = tflops(_bench(lambda: sink_attention_prefill(q, k, v, causal=True, **kw)))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa = tflops(_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)))
            flex_cell = "n/a"
            if flex is not None and seqlen in flex_seqlens:
                log_beta = torch.log(0.4 + 0.5 * torch.rand(heads, device="cuda"))

                def sink_bias(score, b, h, q_idx, kv_idx):
                    return torch.where(kv_idx == 0, score + log_beta[h], score)

                def causal(b, h, q_idx, kv_idx):
                    return q_idx >= kv_idx

                block_mask = create_block_mask(causal, None, None, seqlen, seqlen, device="cuda")
                flex_cell = f"{tflops(_bench(lambda: flex(q, k, v, score_mod=sink_bias, block_mask=block_mask))):.0f}"
            elif flex is None:
                flex_cell = f"unavailable ({type(flex_error).__name__})"
            bm, bn, nw, ns = prefill_config(hd, torch.bfloat16)
            base = ours.get("plain")
            ratios = [f"{ours[p] / base:.2f}" if base else "" for p in policies if p != "plain"]
            report.add(f"| {hd} | {seqlen} | {batch} x {heads} | {bm}x{bn} w{nw} s{ns} | "
                       + " | ".join(f"{ours[p]:.0f}" for p in policies) + f" | {sdpa:.0f} | {flex_cell} | "
                       + " | ".join(ratios) + " |")
            q = k = v = None  # drop the device tensors before empty_cache()
            torch.cuda.empty_cache()


def bench_decode(report: Report, key_lens, batches, copy_gbs: float) -> None:
    from sinkfix.kernels.attention_decode import default_num_splits, sink_attention_decode

    hq, hkv, hd = 32, 8, 128
    report.add("", f"## Decode, bf16, 1 token vs K keys, {hq} q heads / {hkv} kv heads, hd {hd}", "",
               f"Device copy bandwidth measured in this run: {copy_gbs:.0f} GB/s (2 GiB device-to-device copy).", "",
               "| batch | keys | splits | sinkfix plain us | GB/s | % of copy | sinkfix scaling us | GB/s | % of copy "
               "| SDPA (default backend, enable_gqa) us |",
               "|---|---|---|---|---|---|---|---|---|---|")
    for batch in batches:
        for keys in key_lens:
            q = torch.randn(batch, hq, 1, hd, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(batch, hkv, keys, hd, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            splits = default_num_splits(batch, hkv, 1, keys, q.device)
            # K and V once, q and out, and the fp32 workspace (m, l, acc per row and split) written and read
            workspace = batch * hkv * (splits + 1) * (hq // hkv) * (hd + 2) * 4
            moved = (k.numel() + v.numel() + 2 * q.numel()) * 2 + 2 * workspace
            cells = []
            for policy in ("plain", "scaling"):
                kw = _policy_kwargs(policy, hq, batch, "cuda")
                ms = _bench(lambda: sink_attention_decode(q, k, v, causal=True, causal_offset=keys - 1, **kw))
                gbs = moved / (ms * 1e-3) / 1e9
                cells += [f"{ms * 1e3:.1f}", f"{gbs:.0f}", f"{100 * gbs / copy_gbs:.0f}%"]
            try:
                sdpa_ms = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                sdpa_cell = f"{sdpa_ms * 1e3:.1f}"
            except Exception as exc:
                sdpa_cell = f"n/a ({type(exc).__name__})"
            report.add(f"| {batch} | {keys} | {splits} | " + " | ".join(cells) + f" | {sdpa_cell} |")
            q = k = v = None  # drop the device tensors before empty_cache()
            torch.cuda.empty_cache()


def sweep_prefill(report: Report, head_dims, seqlen: int = 4096) -> None:
    """Time candidate tile configs of the prefill hot path (plain causal) against PREFILL_CONFIGS."""
    from sinkfix.kernels.attention_prefill import prefill_config, sink_attention_prefill

    report.add("", f"## Prefill config sweep, bf16 causal, seqlen {seqlen} (TFLOP/s; * = current table entry)", "",
               "| hd | BLOCK_M | BLOCK_N | warps | stages | TFLOP/s |", "|---|---|---|---|---|---|")
    for hd in head_dims:
        heads, batch = HIDDEN // hd, max(1, TOKENS // seqlen)
        q, k, v = (torch.randn(batch, heads, seqlen, hd, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * batch * heads * seqlen * (seqlen / 2) * hd
        current = prefill_config(hd, torch.bfloat16)
        for bm in (64, 128):
            for bn in (32, 64, 128):
                for nw in (4, 8):
                    for ns in (2, 3, 4):
                        try:
                            ms = _bench(lambda: sink_attention_prefill(q, k, v, causal=True, block_m=bm, block_n=bn,
                                                                       num_warps=nw, num_stages=ns))
                            cell = f"{flops / (ms * 1e-3) / 1e12:.0f}"
                        except Exception as exc:  # out of shared memory / registers
                            cell = f"failed ({type(exc).__name__})"
                        mark = " *" if (bm, bn, nw, ns) == current else ""
                        report.add(f"| {hd} | {bm} | {bn} | {nw} | {ns} | {cell}{mark} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (what benchmarks/gpu_check.sh runs)")
    parser.add_argument("--sweep", action="store_true", help="also time candidate prefill tile configs")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine. "
              "Nothing was measured (the kernels' CPU checks are `pytest tests/kernels`).", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the benchmark times compiled kernels", file=sys.stderr)
        return 2
    import triton

    props = torch.cuda.get_device_properties(0)
    report = Report(args.out)
    report.add("# sinkfix attention kernels: benchmark", "",
               f"- device: {torch.cuda.get_device_name(0)} ({props.multi_processor_count} SMs, "
               f"{props.total_memory / 2 ** 30:.0f} GiB), capability {props.major}.{props.minor}",
               f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
               f"python {platform.python_version()}",
               f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; timing: triton.testing.do_bench median",
               f"- mode: {'quick' if args.quick else 'full'}")
    t0 = time.time()
    copy_gbs = copy_bandwidth_gbs()
    if not args.skip_prefill:
        if args.quick:
            bench_prefill(report, (1024, 4096, 16384), (64, 128), ("plain", "scaling", "combined"), (4096,))
        else:
            bench_prefill(report, SEQLENS, (64, 128), POLICIES, SEQLENS)
    if not args.skip_decode:
        bench_decode(report, DECODE_KEYS, DECODE_BATCH, copy_gbs)
    if args.sweep:
        sweep_prefill(report, (64, 128))
    report.add("", f"Total benchmark time {time.time() - t0:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
