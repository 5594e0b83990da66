"""The efficiency budgets of docs/testing.md ("Kernel efficiency"), read from the compiled kernels.

``benchmarks/kernel_audit.py`` compiles every default configuration for sm_80 and sm_90 without a
GPU and reads ptxas's report, the SASS of the main loop and the TTGIR. The budgets themselves are
checked by ``test_compile.py`` (a representative set, marked slow; every default configuration with
``SINKFIX_AOT_ALL=1``). Here, and fast: the yardstick kernel's numerics, the SASS reading on a
listing written out by hand, the coverage of the config tables and the before/after report.
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
    # Hopper's pointer fallback is audited with its own config where it has one
    fallback = {(a, c.head_dim, True) for a in kernel_audit.ARCHS for c in kernel_audit.default_cases(a)
                if c.kernel == "prefill" and a >= 90 and not c.tma and c.dtype != "fp32"}
    assert set(ap.POINTER_FALLBACK_CONFIGS) <= fallback
    # content-dependent sinks: every column-mass config, and every config of the hidden-sink variant
    from sinkfix.kernels import column_mass as cm

    column = {(a, c.head_dim, c.dtype != "fp32") for a in kernel_audit.ARCHS for c in kernel_audit.default_cases(a)
              if c.kernel == "column"}
    assert column == set(cm.COLUMN_MASS_CONFIGS)
    hidden = {(a, c.head_dim, c.dtype != "fp32") for a in kernel_audit.ARCHS for c in kernel_audit.default_cases(a)
              if c.kernel == "prefill" and c.variant == "hidden"}
    assert set(ap.HIDDEN_CONFIGS) <= hidden


def _record(arch, kernel, variant, regs, tma=False, spill=0):
    return dict(case=f"{kernel}-{variant}", arch=arch, kernel=kernel, variant=variant, dtype="bf16", head_dim=128,
                tma=tma, config="128x64 w8 s3", regs=regs, spill_store=spill, spill_load=spill, shared=131072,
                ctas_per_sm=1, ex2_per_tile=34, ex2_per_elem=1.0, main_loop_sass=370, key_loops=2, ldgsts=8)


def test_before_after_table_and_readme_block(tmp_path):
    before = [_record(90, "prefill", "hot", 255, spill=8), dict(case="prefill-padded", arch=90, kernel="prefill",
                                                                variant="padded", dtype="bf16", head_dim=128,
                                                                tma=False, na="no key ranges in this package")]
    after = [_record(90, "prefill", "hot", 183), _record(90, "prefill", "hot", 156, tma=True),
             _record(90, "prefill", "padded", 190), dict(_record(90, "prefill", "all", 0), dtype="fp16")]
    table = kernel_audit.comparison_table(before, after).splitlines()
    assert len(table) == 2 + 3  # header, rule, the three bf16 hd 128 records (not the fp16 one)
    hot = next(line for line in table if "| hot |" in line)
    assert "255 -> 183" in hot and "8 / 8 -> 0 / 0" in hot
    assert "255 -> 156" in next(line for line in table if "| hot (TMA) |" in line)  # against the pointer path
    padded = next(line for line in table if "| padded |" in line)
    assert "n/a -> 190" in padded and "| 0 / 0 |" in padded
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{kernel_audit.README_BEGIN}\nold\n{kernel_audit.README_END}\nrest\n")
    kernel_audit.update_readme(readme, "new table")
    assert readme.read_text() == f"intro\n{kernel_audit.README_BEGIN}\nnew table\n{kernel_audit.README_END}\nrest\n"
    (tmp_path / "plain.md").write_text("no block\n")
    with pytest.raises(SystemExit, match="no .* block"):
        kernel_audit.update_readme(tmp_path / "plain.md", "x")


def test_ptx_body_ignores_debug_information_only():
    """``--same-code`` compares PTX without source-line records, the file table, DWARF sections and
    comments (which move with any edit of a kernel file); an instruction change stays visible."""
    ptx = ("\t.file\t1 \"attention_prefill.py\"\n.visible .entry k(\n)\n{\n\t.loc\t1 38 0\n"
           "\tadd.s32 \t%r1, %r2, 1;  // note\n\tret;\n}\n\t.section\t.debug_abbrev\n{\n.b8 1\n}\n")
    moved = ptx.replace(".loc\t1 38 0", ".loc\t1 40 7").replace("// note", "// other").replace(".b8 1", ".b8 2")
    changed = ptx.replace("%r2, 1;", "%r2, 2;")
    assert kernel_audit.ptx_body(ptx) == kernel_audit.ptx_body(moved)
    assert kernel_audit.ptx_body(ptx) != kernel_audit.ptx_body(changed)
    assert ".loc" not in kernel_audit.ptx_body(ptx) and "debug" not in kernel_audit.ptx_body(ptx)
