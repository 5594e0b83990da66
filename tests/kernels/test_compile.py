"""Ahead-of-time compile of every kernel for sm_80 and sm_90 without a GPU, and the efficiency budgets.

The attention kernels are compiled through ``benchmarks/kernel_audit.py``: each case calls the real
launcher, records the kernel launch instead of running it and compiles exactly that (constexprs,
tile config, the JIT's specialisations: unit strides as constants, 16-divisible pointers and
integers) with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` through
PTX and ptxas to a cubin. That catches what the interpreter cannot (unsupported ops or layouts,
dtype errors in tl.dot, shared memory beyond the device limit) and gives ptxas's register and spill
report and the SASS the budgets are read from. The compiling tests are marked slow (part of ``make
test``): by default the set below (each kernel on both archs, every variant at hd 128, the
yardstick the hot path is held to, the fp32 configs nearest to spilling, Hopper's pointer fallback
at hd 64 and 256, the statistics variants, the content-dependent-sink kernels: 50 compilations), with
``SINKFIX_AOT_ALL=1`` every default configuration (``kernel_audit.default_cases``: 282). The
residual clip kernel has no launch to record without a GPU and is compiled from its signature.
Run ``pytest -k compile -s`` for the table.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="the AOT compile tests need triton, which is not installed")
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kernel_audit  # noqa: E402
from kernel_audit import Case  # noqa: E402

SMEM_LIMIT = kernel_audit.SMEM_PER_CTA_MAX  # bytes per block: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB
ARCHS = kernel_audit.ARCHS


def _default_set(arch: int) -> list[Case]:
    tma = arch >= 90
    cases = [Case("prefill", v, "bf16", 128, tma) for v in ("hot", "policy", "padded", "stats", "all")]
    cases += [Case("flash", "yardstick", "bf16", 128, tma), Case("prefill", "hot", "fp16", 64, tma),
              Case("prefill", "hot", "bf16", 256, tma), Case("prefill", "hot", "fp32", 64)]
    cases += [Case("decode", v, "bf16", 128) for v in ("hot", "all")]
    cases += [Case("decode", "hot", "fp16", 64)] + [Case("reduce", v, "bf16", 128) for v in ("stats", "all")]
    # content-dependent sinks: the stock row-lse pass, the column-mass kernel and the hidden-sink
    # variant (its own tiles; fp32 at hd 64 came closest to spilling when they were chosen)
    cases += [Case("prefill", v, "bf16", 128, tma) for v in ("lse", "hidden")]
    cases += [Case("column", v, "bf16", 128) for v in ("hot", "padded")] + [Case("prefill", "hidden", "fp32", 64)]
    # fp32 where its small tiles came closest to spilling (sm_80: the sink-aware variants at hd 256,
    # sm_90: the hot path at hd 128), with the yardstick the hot path is held to
    cases += [Case("prefill", "policy", "fp32", 256), Case("prefill", "padded", "fp32", 256),
              Case("prefill", "hot", "fp32", 128), Case("flash", "yardstick", "fp32", 128)]
    if tma:  # Hopper's pointer fallback, with its own config at hd 64, at hd 256, and the yardsticks
        cases += [Case("prefill", "hot", "bf16", 64), Case("flash", "yardstick", "bf16", 64),
                  Case("prefill", "hot", "bf16", 256), Case("flash", "yardstick", "bf16", 256)]
    return cases


ATTENTION_CASES = [(c, a) for a in ARCHS for c in _default_set(a)]
if os.environ.get("SINKFIX_AOT_ALL") == "1":
    ATTENTION_CASES = [(c, a) for a in ARCHS for c in kernel_audit.default_cases(a)]
# (dtype, hidden size, every option on) of the residual clip kernel
CLIP_CASES = [("bf16", 1000, True), ("fp16", 16384, False), ("fp32", 65536, True)]
_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


@pytest.fixture(scope="module")
def audited():
    """Every attention case compiled and read up front, 2 worker processes (ptxas and the MLIR
    passes are CPU-bound)."""
    t0 = time.perf_counter()
    records = kernel_audit.run_audit(cases=ATTENTION_CASES, jobs=2)
    print(f"\nAOT compiled and audited {len(records)} attention kernels in {time.perf_counter() - t0:.1f} s")
    for arch in ARCHS:
        print(kernel_audit.markdown_table([r for r in records if r["arch"] == arch]))
    return {(r["case"], r["arch"]): r for r in records}


@pytest.mark.slow
@pytest.mark.parametrize("case,arch", ATTENTION_CASES, ids=lambda x: x.name if isinstance(x, Case) else f"sm{x}")
def test_compile(audited, case, arch):
    r = audited[(case.name, arch)]
    assert "na" not in r and "error" not in r, f"{case.name} on sm_{arch}: {r.get('error') or r.get('na')}"
    assert r["shared"] <= SMEM_LIMIT[arch], f"{r['shared']} B shared memory > sm_{arch} limit {SMEM_LIMIT[arch]} B"


@pytest.mark.slow
def test_budgets(audited):
    """Zero spills, one exp2 per score, no dense mask in the common cases, the hot path within 5% of
    the yardstick, bulk copies on sm_90, two decode programs per SM: on the compiled set."""
    missed = [b for b in kernel_audit.budget_report(list(audited.values())) if not b["ok"]]
    assert not missed, "\n".join(f"{b['budget']}: {b['case']} sm_{b['arch']}: {b['detail']}" for b in missed)


def _compile_clip(key):
    """Compile the residual clip kernel from its signature; runs in a worker process."""
    arch, (dtype, hidden, full) = key
    from sinkfix.kernels import residual_clip as rc

    br, bd, nw = rc.clip_config(hidden)
    fn = rc._residual_clip_kernel
    constexprs = dict(BLOCK_R=br, BLOCK_D=bd, THR_TENSOR=full, HAS_SINKS=full, SINK_CLAMP=full, INPLACE=not full)
    pointers = dict(X=_PTR[dtype], Y=_PTR[dtype], Thr="*fp32" if full else None, IsSink="*u8" if full else None)
    ones = {"stride_xd", "stride_yd", "stride_tz", "stride_ps"}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            if pointers[name] is None:
                signature[name], constexprs[name] = "constexpr", None
            else:
                signature[name], attrs[(i,)] = pointers[name], [["tt.divisibility", 16]]
        elif name in ones:
            signature[name], constexprs[name] = "constexpr", 1
        elif name in ("threshold", "sink_norm"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    try:
        ck = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options=dict(num_warps=nw, num_stages=1))
    except Exception as exc:  # reported by the test, with the case
        return dict(error=f"{type(exc).__name__}: {exc}"[:3000])
    return dict(shared=ck.metadata.shared, cubin=len(ck.asm.get("cubin", b"")))


@pytest.fixture(scope="module")
def clips():
    keys = [(arch, case) for arch in ARCHS for case in CLIP_CASES]
    saved = os.environ.pop("TRITON_INTERPRET", None)  # workers must compile, not interpret
    try:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            return dict(zip(keys, pool.map(_compile_clip, keys)))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("case", CLIP_CASES, ids=lambda c: f"clip-{c[0]}-{c[1]}-{'all' if c[2] else 'hot'}")
def test_compile_residual_clip(clips, arch, case):
    r = clips[(arch, case)]
    assert "error" not in r, r.get("error")
    assert r["cubin"] > 0 and r["shared"] <= SMEM_LIMIT[arch]


def test_default_set_covers_every_kernel():
    kinds = {(c.kernel, c.variant, c.tma) for c, _ in ATTENTION_CASES}
    assert {k for k, _, _ in kinds} == {"prefill", "decode", "reduce", "flash", "column"}
    assert ("prefill", "hidden", True) in kinds and ("prefill", "lse", True) in kinds
    assert ("prefill", "hot", True) in kinds and ("prefill", "hot", False) in kinds
