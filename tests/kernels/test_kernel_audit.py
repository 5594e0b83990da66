"""The efficiency budgets of docs/testing.md ("Kernel efficiency"), read from the compiled kernels.

``benchmarks/kernel_audit.py`` compiles every default configuration for sm_80 and sm_90 without a
GPU and reads ptxas's report, the SASS of the main loop and the TTGIR; the full sweep is marked
slow (about 190 compilations: 15-40 minutes on 2 busy cores, a few minutes once triton's cache is
warm). ``test_compile.py`` checks the same budgets on a representative subset in every run. Also
here: the yardstick kernel's numerics and the SASS reading on a listing written out by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the kernel audit compiles Triton kernels: triton is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kernel_audit  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=lambda d: str(d)[6:])
def test_yardstick_is_a_correct_flash_forward(kt, dtype):
    # fp16 and fp32 only: under triton 3.9's interpreter a bf16 tl.dot multiplies raw bits (the
    # sink-aware kernels upcast there; the yardstick stays minimal)
    import flash_minimal

    q, k, v = kt.make_qkv(2, 4, 2, 45, 45, 64, dtype, layout="bshd")
    out, lse = flash_minimal.flash_attention_minimal(q, k, v, block_m=16, block_n=16, num_warps=4, num_stages=1)
    kt.check_attention(out, lse, q, k, v, label="yardstick", causal=True)


# A cuobjdump -sass listing reduced to what the reader uses: a key loop closed by a backward
# branch, a barrier-wait retry block placed after the function body that branches back into the
# middle of that loop (not a loop of its own), and the final self-branch.
_LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x0 */
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;  /* 0x0 */
        /*0020*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;  /* 0x0 */
        /*0030*/               @P0 BRA 0x90 ;                              /* 0x0 */
        /*0040*/                   MUFU.EX2 R20, R20 ;                     /* 0x0 */
        /*0050*/                   NOP ;                                   /* 0x0 */
        /*0060*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;  /* 0x0 */
        /*0070*/              @!P1 BRA 0x10 ;                              /* 0x0 */
        /*0080*/                   EXIT ;                                  /* 0x0 */
        /*0090*/                   SYNCS.PHASECHK.TRANS64 P0, [UR4], R3 ;  /* 0x0 */
        /*00a0*/                   BRA 0x40 ;                              /* 0x0 */
        /*00b0*/                   BRA 0xb0;                               /* 0x0 */
"""


def test_sass_reading():
    ins = kernel_audit.parse_sass(_LISTING)
    assert [op for _, op, _ in ins][:3] == ["MOV", "LDGSTS.E.BYPASS.128", "HMMA.16816.F32.BF16"]
    loops = kernel_audit.sass_loops(ins)
    assert [(body[0][0], body[-1][0]) for body in loops] == [(0x10, 0x70), (0xb0, 0xb0)]
    key, main = kernel_audit.sass_key_loops(ins)
    assert len(key) == 1 and main is key[0]
    assert kernel_audit._count(main, "HMMA", "HGMMA") == 2
    assert kernel_audit._count(main, "MUFU.EX2") == 1
    assert kernel_audit._count(main, "LDG") == 0 and kernel_audit._count(main, "LDGSTS") == 1


def test_default_cases_cover_every_config_table_entry():
    from sinkfix.kernels import attention_decode as ad
    from sinkfix.kernels import attention_prefill as ap

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for table, config, kind in ((ap.PREFILL_CONFIGS, ap.prefill_config, "prefill"),
                                (ad.DECODE_CONFIGS, ad.decode_config, "decode")):
        reached = {(arch, c.head_dim, c.dtype != "fp32") for arch in kernel_audit.ARCHS
                   for c in kernel_audit.default_cases(arch) if c.kernel == kind}
        assert {(a, max(64, d), is16) for a, d, is16 in reached} == set(table)
        for arch, hd, is16 in reached:
            assert config(hd, dtypes["bf16" if is16 else "fp32"], arch) == table[(arch, hd, is16)]


@pytest.mark.slow
def test_every_default_config_meets_the_budgets():
    records = kernel_audit.run_audit(jobs=2)
    failed = [r for r in records if "error" in r]
    assert not failed, [(r["case"], r["arch"], r["error"][:300]) for r in failed]
    missed = [b for b in kernel_audit.budget_report(records) if not b["ok"]]
    assert not missed, "\n".join(f"{b['budget']}: {b['case']} sm_{b['arch']}: {b['detail']}" for b in missed)
