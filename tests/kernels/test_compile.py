"""Ahead-of-time compile of every kernel and every config for sm_80 and sm_90, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole pipeline
(TTIR, TTGIR, LLVM, PTX, ptxas -> cubin), which catches what the interpreter cannot: unsupported
ops or layouts, dtype errors in tl.dot, shared memory beyond the device limit. The signatures
mimic what the JIT specialises at launch (strides equal to 1 become constants, pointers and
multiple-of-16 strides get the divisibility hint), so the shared memory reported here is the
one the launched kernels use, pipelining included. Run ``pytest -k compile -s`` for the table.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402

from triton.backends.compiler import GPUTarget  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block: A100 (sm_80), H100 (sm_90)
ARCHS = (80, 90)
_FILES = ("attention_prefill", "attention_decode", "residual_clip")
_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _kernel_modules():
    """The kernel modules, which must be compiler-decorated: only called in the worker processes,
    which start without TRITON_INTERPRET. (Under TRITON_INTERPRET=1 even triton's own
    ``tl.standard`` helpers are interpreter functions, so nothing can be compiled in that process.)"""
    from sinkfix.kernels import attention_common, attention_decode, attention_prefill, residual_clip

    assert isinstance(attention_prefill._sink_attn_fwd, triton.runtime.jit.JITFunction)
    return dict(attention_prefill=attention_prefill, attention_decode=attention_decode, residual_clip=residual_clip,
                attention_common=attention_common)


def _signature(kernel, pointers, constexprs, ones, floats):
    """ASTSource signature/constexprs/attrs the way the JIT specialises a launch."""
    sig, const, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in pointers:
            if pointers[name] is None:  # optional tensor not given: the launcher passes None
                sig[name], const[name] = "constexpr", None
            else:
                sig[name] = pointers[name]
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ones:
            sig[name], const[name] = "constexpr", 1
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def _case_args(mods, kind, dtype, head_dim, full):
    """(kernel, signature, constexprs, attrs, num_warps, num_stages, config label) of one case."""
    ap, ad, rc = mods["attention_prefill"], mods["attention_decode"], mods["residual_clip"]
    ac = mods["attention_common"]
    t = _PTR[dtype]
    opt = lambda p: p if full else None  # noqa: E731
    if kind == "prefill":
        bm, bn, nw, ns = ap.prefill_config(head_dim, _TORCH_DTYPE[dtype])
        const = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=ac.padded_head_dim(head_dim), NS=4 if full else 0,
                     NS_P2=4, SB=16, E_P2=2, HAS_MASK=full, IS_CAUSAL=True, HAS_WINDOW=full, HAS_SOFTCAP=full,
                     HAS_BETA=full, HAS_EXTRA=full, UPCAST_DOT=False)
        ptrs = dict(Q=t, K=t, V=t, Out=t, Lse="*fp32", Mask=opt("*u8"), SinkCols=opt("*i32"), Beta=opt("*fp32"),
                    ExtraLogits=opt("*fp32"))
        ones = {"stride_qk", "stride_kk", "stride_vk", "stride_ok", "stride_mn", "stride_lm", "stride_sn", "stride_ee"}
        kernel, label = ap._sink_attn_fwd, f"BLOCK_M={bm} BLOCK_N={bn} warps={nw} stages={ns}"
        floats = {"qk_scale", "softcap_log2"}
    elif kind == "decode":
        bn, nw, ns = ad.decode_config(head_dim, _TORCH_DTYPE[dtype])
        bm = ad.max_rows_per_tile(ac.padded_head_dim(head_dim)) if full else 16
        const = dict(HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=ac.padded_head_dim(head_dim), NS=4 if full else 0,
                     NS_P2=4, SB=16, HAS_MASK=full, IS_CAUSAL=True, HAS_WINDOW=full, HAS_SOFTCAP=full,
                     UPCAST_DOT=False)
        ptrs = dict(Q=t, K=t, V=t, Mask=opt("*u8"), SinkCols=opt("*i32"), PartM="*fp32", PartL="*fp32",
                    PartAcc="*fp32")
        ones = {"stride_qk", "stride_kk", "stride_vk", "stride_mn", "stride_sn"}
        kernel, label = ad._sink_attn_decode_split, f"BLOCK_M={bm} BLOCK_N={bn} warps={nw} stages={ns}"
        floats = {"qk_scale", "softcap_log2"}
    elif kind == "reduce":
        nw, ns = 4, 1
        const = dict(HEAD_DIM=head_dim, BLOCK_R=ad._REDUCE_ROWS, BLOCK_D=ac.padded_head_dim(head_dim), E_P2=2,
                     HAS_SINKS=full, HAS_BETA=full, HAS_EXTRA=full)
        ptrs = dict(PartM="*fp32", PartL="*fp32", PartAcc="*fp32", Out=t, Lse="*fp32", Beta=opt("*fp32"),
                    ExtraLogits=opt("*fp32"))
        ones = {"stride_ok", "stride_lm", "stride_ee"}
        kernel, label = ad._sink_attn_decode_reduce, f"BLOCK_R={ad._REDUCE_ROWS} warps=4 stages=1"
        floats = set()
    else:  # clip; head_dim is the hidden size here
        br, bd, nw = rc.clip_config(head_dim)
        ns = 1
        const = dict(BLOCK_R=br, BLOCK_D=bd, THR_TENSOR=full, HAS_SINKS=full, SINK_CLAMP=full, INPLACE=not full)
        ptrs = dict(X=t, Y=t, Thr=opt("*fp32"), IsSink=opt("*u8"))
        ones = {"stride_xd", "stride_yd", "stride_tz", "stride_ps"}
        kernel, label = rc._residual_clip_kernel, f"BLOCK_R={br} BLOCK_D={bd} warps={nw}"
        floats = {"threshold", "sink_norm"}
    sig, const, attrs = _signature(kernel, ptrs, const, ones, floats)
    return kernel, sig, const, attrs, nw, ns, label


# (kind, dtype, head dim or hidden size, all optional features on). By default: every 16-bit entry
# of PREFILL_CONFIGS and DECODE_CONFIGS on both archs, fp16 and bf16 at hd 64 and 128 (and the
# padded hd 80), the hot path (causal, no extras) everywhere and the everything-on path (mask,
# 4 sinks, window, softcap, beta, extra logits) once per kernel, and the fp32 path once: about
# 90 s on 2 busy cores. fp32 cases cost 2-5x a 16-bit one (the ieee fp32 dot unrolls into FMA
# loops), so the other fp32 configs and feature variants run only with SINKFIX_AOT_ALL=1
# (benchmarks/gpu_check.sh sets it; every number is in benchmarks/RESULTS.md).
CASES = [
    ("prefill", "fp16", 64, False), ("prefill", "bf16", 64, False), ("prefill", "fp16", 128, False),
    ("prefill", "bf16", 128, True), ("prefill", "bf16", 256, False), ("prefill", "fp16", 80, False),
    ("prefill", "fp32", 64, False),
    ("decode", "fp16", 64, False), ("decode", "bf16", 64, False), ("decode", "fp16", 128, False),
    ("decode", "bf16", 128, True), ("decode", "bf16", 256, False),
    ("reduce", "bf16", 128, True), ("reduce", "fp16", 256, False),
    ("clip", "bf16", 1000, True), ("clip", "fp16", 16384, False),
]
EXTRA_CASES = [
    ("prefill", "fp16", 64, True), ("prefill", "bf16", 256, True), ("prefill", "fp32", 128, True),
    ("prefill", "fp32", 256, False), ("decode", "fp16", 64, True), ("decode", "bf16", 256, True),
    ("decode", "fp32", 64, False), ("decode", "fp32", 128, True), ("decode", "fp32", 256, False),
    ("clip", "fp32", 65536, True),
]
if os.environ.get("SINKFIX_AOT_ALL") == "1":
    CASES += EXTRA_CASES


def _compile_one(key):
    """Compile one (arch, case); runs in a worker process. Returns a small result dict."""
    arch, (kind, dtype, dim, full) = key
    kernel, sig, const, attrs, nw, ns, label = _case_args(_kernel_modules(), kind, dtype, dim, full)
    t0 = time.perf_counter()
    try:
        ck = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=nw, num_stages=ns, enable_fp_fusion=True))
    except Exception as exc:  # reported by the test, with the case
        return dict(error=f"{type(exc).__name__}: {exc}"[:4000], label=label)
    return dict(shared=ck.metadata.shared, seconds=time.perf_counter() - t0, label=label,
                cubin=len(ck.asm.get("cubin", b"")), ptx_lines=ck.asm["ptx"].count("\n"))


@pytest.fixture(scope="module")
def compiled(request):
    """Every selected (arch, case) compiled up front in parallel worker processes (ptxas and the
    MLIR passes are CPU-bound: on 2 cores this about halves the wall time of the file)."""
    keys = [(item.callspec.params["arch"], item.callspec.params["case"]) for item in request.session.items
            if getattr(item, "originalname", None) == "test_compile" and hasattr(item, "callspec")]
    workers = max(1, min(len(keys), os.cpu_count() or 1))
    t0 = time.perf_counter()
    # spawned workers start without TRITON_INTERPRET (the variable is read when triton is imported)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = dict(zip(keys, pool.map(_compile_one, keys)))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    print(f"\nAOT compiled {len(keys)} kernels in {time.perf_counter() - t0:.1f} s on {workers} processes")
    print("| arch | kernel | dtype | dim | features | config | shared memory (KB) | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for (arch, (kind, dtype, dim, full)), r in results.items():
        shared = f"{r['shared'] / 1024:.1f}" if "shared" in r else "FAILED"
        print(f"| sm_{arch} | {kind} | {dtype} | {dim} | {'all' if full else 'hot path'} | {r['label']} | "
              f"{shared} | {r.get('seconds', 0):.1f} |")
    return results


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{'all' if c[3] else 'hot'}")
def test_compile(compiled, arch, case):
    r = compiled[(arch, case)]
    assert "error" not in r, f"{case} failed to compile for sm_{arch} ({r['label']}): {r.get('error')}"
    assert r["cubin"] > 0
    assert r["shared"] <= SMEM_LIMIT[arch], f"{r['shared']} B shared memory > sm_{arch} limit {SMEM_LIMIT[arch]} B"


def test_compile_cases_cover_every_config():
    from sinkfix.kernels import attention_decode as ad
    from sinkfix.kernels import attention_prefill as ap

    every = CASES + [c for c in EXTRA_CASES if c not in CASES]
    used = {ap.prefill_config(d, _TORCH_DTYPE[t]) for k, t, d, _ in every if k == "prefill"}
    assert used == set(ap.PREFILL_CONFIGS.values())
    used = {ad.decode_config(d, _TORCH_DTYPE[t]) for k, t, d, _ in every if k == "decode"}
    assert used == set(ad.DECODE_CONFIGS.values())
    default_16bit = {c for c in CASES if c[1] != "fp32"}
    assert {ap.prefill_config(d, _TORCH_DTYPE[t]) for k, t, d, _ in default_16bit if k == "prefill"} == {
        v for (bd, is16), v in ap.PREFILL_CONFIGS.items() if is16}
    for kind in ("prefill", "decode"):
        for dtype in ("fp16", "bf16"):
            assert {d for k, t, d, _ in CASES if k == kind and t == dtype} >= {64, 128}
