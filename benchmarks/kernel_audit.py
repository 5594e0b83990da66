"""Static efficiency audit of the attention kernels for sm_80 and sm_90, without a GPU.

    python benchmarks/kernel_audit.py [--arch 80,90] [--json] [--out DIR] [--only TEXT] [--jobs N]
                                      [--kernels DIR] [--markdown FILE]

Every configuration the dispatch can choose is launched through the real launcher with CPU tensors
whose kernel launch is *recorded* instead of run, so the audit compiles exactly the arguments,
constexprs, tile config and JIT specialisations (unit strides as constants, 16-divisible pointers
and integers) that a real launch gets. Each recorded launch is compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; ptxas is run once more on the
PTX with ``-v`` for its register and spill report, and the cubin is disassembled (``cuobjdump
-sass``, shipped with triton) to read the main loop. Per kernel it reports:

- registers per thread and spill store/load bytes (ptxas), shared memory (triton's metadata),
- CTAs per SM that registers, shared memory and the warp limit allow,
- in the main key loop (the key loop with the fewest instructions among those doing the most
  MMA work: the loop over tiles every row sees whole): MMA instructions per tile (HGMMA on sm_90,
  HMMA on sm_80; none on the fp32 path, whose ieee dot runs on FMAs), MUFU.EX2 per thread per tile
  and per score element, SASS instructions per tile,
- the number of key loops, and how the main loop loads: cp.async (LDGSTS), bulk tensor copies
  (UTMALDG, TMA) or plain global loads (LDG),
- from the TTGIR: exp2 operations per score element in every key loop (a duplicate across layouts
  shows up as 2) and whether a dense mask, when read, is copied asynchronously.

The yardstick is ``flash_minimal.py``: a plain causal flash forward compiled with the same tile
configs. ``budget_report`` turns the records into the budgets of docs/testing.md ("Kernel
efficiency"), which ``tests/kernels/test_kernel_audit.py`` enforces. ``--kernels DIR`` audits
another copy of the kernel package (an older commit's ``kernels/`` folder); cases it cannot launch
are reported as not applicable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (64, 128, 256)
# Per-SM resources (CUDA occupancy rules, identical for A100 and H100 except shared memory):
# 64K registers allocated per warp in units of 256, 64 resident warps, 32 resident CTAs, and
# shared memory of 164 KB (sm_80) / 228 KB (sm_90) per SM of which each CTA also reserves 1 KB.
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SMEM_PER_CTA_MAX = {80: 163 * 1024, 90: 227 * 1024}
SMEM_RESERVED_PER_CTA = 1024
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32

# shapes of the recorded launches: Llama-style 32 query / 8 kv heads in transformers' (B, S, H, D)
# memory; an odd prompt length (so no length is 16-divisible by accident), a 32k-key decode cache
PREFILL_LEN = 4093
DECODE_KEYS = 32768
DECODE_SPEC_TOKENS = 16  # speculative decoding: 16 new tokens x GQA group 8 = the largest row tile


@dataclasses.dataclass(frozen=True)
class Case:
    """One audited kernel configuration. ``variant``: ``hot`` (causal, nothing else: the plain
    path), ``policy`` (what a patched model sends: causal, one sink column, beta and a virtual sink
    logit), ``padded`` (policy plus left padding as per-sequence key ranges), ``stats`` (policy plus
    the telemetry statistics output: the HAS_STATS variant of the prefill kernel and of the decode
    reduction, whose split kernel is the policy one), ``all`` (every feature: an arbitrary dense
    mask, 4 sink slots, sliding window, softcap, beta, s_aux and the virtual logit), ``hidden``
    (padded plus a content-dependent hidden-sink mask: the HAS_HIDDEN variant with its own config,
    the correction pass of content-dependent sinks), ``lse`` (the row log-sum-exp alone, causal with
    left padding: the LSE_ONLY variant, the stock pass of content-dependent sinks), ``yardstick``
    (flash_minimal). ``tma``: the
    sm_90 bulk-tensor-copy path (the default there); the pointer path is audited on sm_80 and as
    the sm_90 fallback (``hot`` only). Kernel ``column`` is the column-mass kernel of
    content-dependent sinks (``hot``: causal; ``padded``: causal with left padding as key ranges)."""

    kernel: str  # prefill | decode | reduce | flash | column
    variant: str
    dtype: str
    head_dim: int
    tma: bool = False

    @property
    def name(self) -> str:
        return f"{self.kernel}-{self.variant}-{self.dtype}-hd{self.head_dim}{'-tma' if self.tma else ''}"


def default_cases(arch: int) -> list[Case]:
    """Every default configuration of the dispatch for one arch: each dtype and head dim of the
    config tables, the variants above, the yardstick with the prefill configs, and the decode
    reduction (one config for every dtype; its tile depends on the head dim only)."""
    cases = []
    for dtype in DTYPES:
        tma = arch >= 90 and dtype != "fp32"  # descriptors for 16-bit tiles on Hopper
        for hd in HEAD_DIMS:
            for variant in ("hot", "policy", "padded", "stats", "all", "hidden", "lse"):
                cases.append(Case("prefill", variant, dtype, hd, tma))
            cases += [Case("column", "hot", dtype, hd), Case("column", "padded", dtype, hd)]
            cases.append(Case("flash", "yardstick", dtype, hd, tma))
            if tma:  # the pointer path, Hopper's fallback, against the same yardstick
                cases += [Case("prefill", "hot", dtype, hd, False), Case("flash", "yardstick", dtype, hd, False)]
            for variant in ("hot", "policy", "padded", "all"):
                cases.append(Case("decode", variant, dtype, hd))
    for hd in HEAD_DIMS:
        cases += [Case("reduce", v, "bf16", hd) for v in ("hot", "stats", "all")]
    return cases


# -- recording launches -----------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    fn: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a module-level @triton.jit kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self, fn, sink: list):
        self._fn, self._sink = fn, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._sink.append(Launch(self._fn, grid, args, kwargs))

    def __getattr__(self, name):
        return getattr(self._fn, name)


class _StandInInterpreted:
    """Lets the launchers' device check accept CPU tensors while launches are recorded (the check
    allows CPU tensors for interpreted kernels; nothing is interpreted or run here)."""


InterpretedFunction = type("InterpretedFunction", (_StandInInterpreted,), {})


@contextlib.contextmanager
def recorded_launches(*modules):
    """Within the block every @triton.jit kernel defined in ``modules`` records its launches; the
    launchers still validate and prepare their arguments exactly as for a real launch."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    saved = []
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                saved.append((module, name, value))
                setattr(module, name, _Recorder(value, launches))
        check = vars(module).get("_check_qkv")
        if check is not None:
            saved.append((module, "_check_qkv", check))
            module._check_qkv = lambda q, k, v, kernel, _c=check: _c(q, k, v, InterpretedFunction())
    try:
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def specialise(launch: Launch):
    """(fn, signature, constexprs, attrs, options) the way the JIT builds them for this launch."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = launch.fn
    names = fn.arg_names
    bound = inspect.signature(fn.fn).bind_partial(*launch.args, **{k: v for k, v in launch.kwargs.items()
                                                                      if k in names})
    bound.apply_defaults()
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, param.is_const, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec if spec is not None else value
        elif isinstance(spec, str) and "D" in spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return fn, signature, constexprs, attrs, options


# -- the launches of each case ----------------------------------------------------------------------
def load_kernel_package(kernels_dir: Path | None):
    """The kernel package: ``kernels_dir`` loaded under a private name, or the repository's."""
    if kernels_dir is None:
        kernels_dir = HERE.parent / "kernels"
        if not (kernels_dir / "__init__.py").exists():  # installed layout (gpu_check.sh stages one)
            import sinkfix.kernels

            return sinkfix.kernels
    name = "_audited_kernels"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, kernels_dir / "__init__.py",
                                                  submodule_search_locations=[str(kernels_dir)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def _flash_module():
    spec = importlib.util.spec_from_file_location("_flash_minimal", HERE / "flash_minimal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bshd(batch, heads, seq, dim, dtype, device, fill):
    """(B, H, S, D) view of (B, S, H, D) memory, as transformers hands attention functions; random
    values only where the launch really runs (``fill``), recorded launches need the layout only."""
    import torch

    make = torch.randn if fill else torch.empty
    return make(batch, seq, heads, dim, dtype=dtype, device=device).transpose(1, 2)


class NotApplicable(Exception):
    """The audited kernel package cannot launch this case (an older copy without the feature)."""


def _config(table_fn, case: Case, dtype, arch: int):
    """The launcher's tile config for ``arch`` and the case's load path (older packages have one
    table for every arch and path)."""
    params = inspect.signature(table_fn).parameters
    if case.variant == "hidden":
        if "hidden" not in params:
            raise NotApplicable("no hidden-sink variant in this kernel package")
        return table_fn(case.head_dim, dtype, arch, bulk_copies=case.tma, hidden=True)
    if "bulk_copies" in params:
        return table_fn(case.head_dim, dtype, arch, bulk_copies=case.tma)
    if "arch" in params:
        return table_fn(case.head_dim, dtype, arch)
    return table_fn(case.head_dim, dtype)


@dataclasses.dataclass
class CaseCall:
    """The launcher call a case stands for, and what it computes (for throughput)."""

    modules: tuple  # the modules whose kernels the call launches
    launcher: object
    args: tuple
    kwargs: dict
    flops: float  # useful multiply-adds x 2 of the attention (prefill)
    bytes: float  # bytes of K and V read once (decode)


def case_call(case: Case, arch: int, kernels_dir: Path | None = None, device="cpu", fill=False) -> CaseCall:
    """Build the launcher call of ``case`` with the tile config the launcher chooses on sm_<arch>
    and the bulk-copy choice of the case: Llama-style 32 query / 8 kv heads in (B, S, H, D) memory;
    prefill of PREFILL_LEN tokens, decode of one token (``all``: 16 speculative tokens of a group
    of 8) against DECODE_KEYS keys. ``hot`` is causal and nothing else, ``policy`` what a patched
    model sends (a sink column, beta, a virtual logit), ``padded`` adds left padding as key padding,
    ``stats`` adds the telemetry statistics output to ``policy``, ``all`` has every feature (a random
    dense mask, 4 sink slots, window 1024, softcap 30, s_aux)."""
    import importlib

    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[case.dtype]
    hd = case.head_dim
    package = load_kernel_package(kernels_dir)
    common = importlib.import_module(package.__name__ + ".attention_common")
    prefill = importlib.import_module(package.__name__ + ".attention_prefill")
    decode = importlib.import_module(package.__name__ + ".attention_decode")
    hq, hkv = 32, 8
    tensors = lambda b, h, s: _bshd(b, h, s, hd, dtype, device, fill)  # noqa: E731
    if case.kernel == "flash":
        flash = _flash_module()
        bm, bn, nw, ns = _config(prefill.prefill_config, case, dtype, arch)
        q, k, v = tensors(1, hq, PREFILL_LEN), tensors(1, hkv, PREFILL_LEN), tensors(1, hkv, PREFILL_LEN)
        return CaseCall((flash,), flash.flash_attention_minimal, (q, k, v),
                        dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, use_tma=case.tma),
                        4.0 * hq * PREFILL_LEN * (PREFILL_LEN + 1) / 2 * hd, 0.0)
    if case.kernel == "column":
        try:
            column = importlib.import_module(package.__name__ + ".column_mass")
        except ImportError:
            raise NotApplicable("no column-mass kernel in this kernel package") from None
        batch = 2
        q, k = tensors(batch, hq, PREFILL_LEN), tensors(batch, hkv, PREFILL_LEN)
        kw = dict(causal=True)
        if case.variant == "padded":
            pads = torch.tensor([0, 37], device=device)
            kw["key_padding"] = torch.arange(PREFILL_LEN, device=device)[None, :] >= pads[:, None]
        bm, bn, nw, ns = column.column_mass_config(hd, dtype, arch)
        kw.update(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        lse = torch.zeros(batch, hq, PREFILL_LEN, device=device)
        # one q.k product per visible (row, key) pair, no P.V: half a causal attention forward
        flops = 2.0 * batch * hq * PREFILL_LEN * (PREFILL_LEN + 1) / 2 * hd
        return CaseCall((common, column), column.column_mass, (q, k, lse), kw, flops, 0.0)
    if case.kernel == "prefill":
        q_len, k_len, batch = PREFILL_LEN, PREFILL_LEN, 2
    elif case.variant == "all":
        q_len, k_len, batch, hkv = DECODE_SPEC_TOKENS, DECODE_KEYS, 1, 4
    else:
        q_len, k_len, batch = 1, DECODE_KEYS, 2
    q, k, v = tensors(batch, hq, q_len), tensors(batch, hkv, k_len), tensors(batch, hkv, k_len)
    kw = dict(causal=True, causal_offset=k_len - q_len)
    on = dict(device=device)
    if case.variant in ("policy", "padded", "stats", "hidden"):
        kw.update(sink_cols=torch.zeros(batch, 1, dtype=torch.long, **on), beta=torch.full((hq,), 0.9, **on),
                  virtual_sink_logit=torch.zeros(hq, **on))
    if case.variant == "hidden":
        if "hidden" not in inspect.signature(prefill.sink_attention_prefill).parameters:
            raise NotApplicable("no hidden-sink variant in this kernel package")
        kw.update(hidden=torch.rand(batch, hq, k_len, **on) > 0.99, hidden_beta=torch.full((hq,), 0.4, **on))
    if case.variant == "lse":
        if "lse_only" not in inspect.signature(prefill.sink_attention_prefill).parameters:
            raise NotApplicable("no row-lse-only variant in this kernel package")
        kw["lse_only"] = True
    if case.variant in ("padded", "hidden", "lse"):
        if "key_padding" not in inspect.signature(prefill.sink_attention_prefill).parameters:
            raise NotApplicable("no per-sequence key ranges in this kernel package")
        pads = torch.tensor([0, 37], **on)[:batch]
        if case.variant != "lse":
            kw["sink_cols"] = pads[:, None].clone()
        kw["key_padding"] = torch.arange(k_len, **on)[None, :] >= pads[:, None]
    if case.variant == "stats":
        launcher = prefill.sink_attention_prefill if case.kernel == "prefill" else decode.sink_attention_decode
        if "sink_stats" not in inspect.signature(launcher).parameters:
            raise NotApplicable("no statistics output in this kernel package")
        kw.update(sink_stats=torch.zeros(batch, hq, 2, **on))
    if case.variant == "all":
        kw.update(attn_mask=torch.rand(batch, 1, q_len, k_len, **on) > 0.1,
                  sink_cols=torch.tensor([[0, 3, 9, -1]] * batch, **on), beta=torch.full((hq,), 0.9, **on),
                  extra_logits=torch.zeros(hq, 1, **on), virtual_sink_logit=torch.zeros(hq, **on),
                  sliding_window=1024, softcap=30.0)
    seen = min((max(0, k_len - q_len) + k_len) / 2, kw.get("sliding_window", k_len))  # mean keys per row
    flops = 4.0 * batch * hq * q_len * seen * hd
    kv_bytes = 2.0 * batch * hkv * k_len * hd * q.element_size()
    if case.kernel == "prefill":
        bm, bn, nw, ns = _config(prefill.prefill_config, case, dtype, arch)
        kw.update(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        if "use_tma" in inspect.signature(prefill.sink_attention_prefill).parameters:
            kw["use_tma"] = case.tma
        elif case.tma:
            raise NotApplicable("no bulk-tensor-copy path in this kernel package")
        return CaseCall((common, prefill), prefill.sink_attention_prefill, (q, k, v), kw, flops, kv_bytes)
    bn, nw, ns = _config(decode.decode_config, case, dtype, arch)
    kw.update(block_n=bn, num_warps=nw, num_stages=ns)
    return CaseCall((common, decode), decode.sink_attention_decode, (q, k, v), kw, flops, kv_bytes)


def record_case(case: Case, arch: int, kernels_dir: Path | None = None) -> list[Launch]:
    """Call the launcher of ``case`` with CPU tensors and return the recorded kernel launches."""
    call = case_call(case, arch, kernels_dir)
    with recorded_launches(*call.modules) as launches:
        call.launcher(*call.args, **call.kwargs)
    return launches


def _pick(case: Case, launches: list[Launch]) -> Launch:
    if case.kernel == "reduce":
        return launches[-1]
    return launches[0]


# -- compiling and reading the result ---------------------------------------------------------------
def _nvidia_tool(name: str, arch: int) -> str:
    from triton import knobs

    if name == "ptxas":
        return (knobs.nvidia.ptxas if arch < 90 else knobs.nvidia.ptxas_blackwell).path
    return getattr(knobs.nvidia, name).path


def _ptxas_report(ptx: str, arch: int, workdir: Path) -> tuple[str, bytes]:
    """Run ptxas with triton's own flags plus -v on the PTX: (log, cubin)."""
    src, cubin = workdir / "kernel.ptx", workdir / "kernel.cubin"
    src.write_text(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    done = subprocess.run([_nvidia_tool("ptxas", arch), "-lineinfo", "-v", "--regAllocOptLevel=2",
                           f"--gpu-name={gpu}", str(src), "-o", str(cubin)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr[-2000:]}")
    return done.stderr + done.stdout, cubin.read_bytes()


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction of a ``cuobjdump -sass`` listing."""
    out = []
    for line in text.splitlines():
        m = _SASS_LINE.search(line)
        if not m:
            continue
        ins = re.sub(r"^@!?U?P[T\d]+\s+", "", m.group(2).strip())
        op, _, rest = ins.partition(" ")
        out.append((int(m.group(1), 16), op, rest))
    return out


def sass_loops(ins: list[tuple[int, str, str]]) -> list[list[tuple[int, str, str]]]:
    """Instruction lists of the loops: a backward branch closes one (target .. branch). Branches
    back from out-of-line blocks (ptxas moves the retry of a barrier wait after the function body)
    jump into the middle of a real loop; they are not loops and are dropped."""
    spans = []
    for addr, op, rest in ins:
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", rest)
            if m and int(m.group(1), 16) <= addr:
                spans.append((int(m.group(1), 16), addr))
    natural = [(t, b) for t, b in spans if not any(t2 < t <= b2 < b for t2, b2 in spans)]
    return [[x for x in ins if t <= x[0] <= b] for t, b in natural]


def _count(body, *names) -> int:
    """Instructions whose opcode is one of ``names``: a base opcode (``LDG`` counts LDG.E.128, not
    LDGSTS) or a full one with modifiers (``MUFU.EX2``)."""
    return sum(1 for _, op, _ in body if op.split(".")[0] in names or any(op.startswith(n + ".") or op == n
                                                                         for n in names if "." in n))


def sass_key_loops(ins):
    """The key loops (the loops doing at least half the most MMA or FMA work of any loop) and the
    main one among them (the fewest instructions: no masking work)."""
    loops = sass_loops(ins)
    mma = [_count(b, "HMMA", "HGMMA") for b in loops]
    work = mma if any(mma) else [_count(b, "FFMA") for b in loops]
    if not loops or max(work) == 0:
        return [], None
    key = [b for b, w in zip(loops, work) if w >= max(work) / 2 and w > 0]
    # a loop nested in another one is counted once (the outer body repeats the inner one)
    key = [b for b in key if not any(o is not b and o[0][0] <= b[0][0] and b[-1][0] < o[-1][0] for o in key)]
    return key, min(key, key=len)


def _layouts(ttgir: str) -> dict[str, str]:
    return dict(re.findall(r"^(#\w+) = (#ttg\.[^\n]+)$", ttgir, re.MULTILINE))


def _per_thread(layout: str, rows: int, cols: int) -> tuple[int, int]:
    """(rows, elements) of a (rows, cols) tile that one thread holds in an mma or blocked layout."""
    def ints(key):
        m = re.search(key + r" = \[(\d+), (\d+)\]", layout)
        return (int(m.group(1)), int(m.group(2))) if m else (1, 1)
    wm, wn = ints("warpsPerCTA")
    if "nvidia_mma" in layout:  # each 16 x 8 accumulator fragment: 2 rows x 2 columns per thread
        r = 2 * max(1, math.ceil(rows / (16 * wm)))
        return r, r * 2 * max(1, math.ceil(cols / (8 * wn)))
    sm, sn = ints("sizePerThread")
    tm, tn = ints("threadsPerWarp")
    r = sm * max(1, math.ceil(rows / (sm * tm * wm)))
    return r, r * sn * max(1, math.ceil(cols / (sn * tn * wn)))


def ttgir_key_loops(ttgir: str):
    """(lines of each scf.for that contains a dot, sorted by length) from the TTGIR text."""
    lines = ttgir.splitlines()
    loops = []
    for i, line in enumerate(lines):
        if "scf.for" in line and line.rstrip().endswith("{"):
            indent = len(line) - len(line.lstrip())
            for j in range(i + 1, len(lines)):
                if lines[j].startswith(" " * indent + "}"):
                    body = lines[i:j + 1]
                    if any("tt.dot" in x or "warp_group_dot" in x for x in body):
                        loops.append(body)
                    break
    return sorted(loops, key=len)


def analyse(case: Case, launch: Launch, arch: int, ck, ptxas_log: str, sass: str) -> dict:
    """The audit record of one compiled kernel (see the module docstring)."""
    const = {launch.fn.arg_names[i]: v for (i,), v in specialise(launch)[2].items()}
    nw = launch.kwargs.get("num_warps", 4)
    ns = launch.kwargs.get("num_stages", 3)
    bm = const.get("BLOCK_M", const.get("BLOCK_R"))
    bn = const.get("BLOCK_N")
    regs = int(re.search(r"Used (\d+) registers", ptxas_log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    spill_st, spill_ld = (int(spill.group(1)), int(spill.group(2))) if spill else (0, 0)
    shared = ck.metadata.shared
    warps_by_regs = REGS_PER_SM // (math.ceil(regs * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT)
    ctas_regs = warps_by_regs // nw
    ctas_smem = SMEM_PER_SM[arch] // (shared + SMEM_RESERVED_PER_CTA)
    ctas = min(ctas_regs, ctas_smem, MAX_WARPS_PER_SM // nw, MAX_CTAS_PER_SM)

    ins = parse_sass(sass)
    key, main = sass_key_loops(ins)
    rec = dict(case=case.name, kernel=case.kernel, variant=case.variant, dtype=case.dtype, head_dim=case.head_dim,
               tma=case.tma, arch=arch, config=f"{bm}x{bn} w{nw} s{ns}" if bn else f"{bm} rows w{nw}",
               block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, softcap=bool(const.get("HAS_SOFTCAP")),
               regs=regs, spill_store=spill_st, spill_load=spill_ld, shared=shared,
               ctas_per_sm=ctas, ctas_by_regs=ctas_regs, ctas_by_smem=ctas_smem, key_loops=len(key),
               sass_total=len(ins))
    ptx = ck.asm["ptx"]
    rec.update(ptx_cp_async=len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
               ptx_bulk_tensor=ptx.count("cp.async.bulk.tensor"))
    if main is not None:
        rec.update(main_loop_sass=sum(1 for _, op, _ in main if op != "NOP"),
                   mma_per_tile=_count(main, "HMMA", "HGMMA"), ex2_per_tile=_count(main, "MUFU.EX2"),
                   other_mufu_per_tile=_count(main, "MUFU") - _count(main, "MUFU.EX2"),
                   ldgsts=_count(main, "LDGSTS"), utmaldg=_count(main, "UTMALDG"), ldg=_count(main, "LDG"))
    # -- TTGIR: exp2 per score element in every key loop, layout conversions, async copies --
    ttgir = ck.asm["ttgir"]
    layouts = _layouts(ttgir)
    loops = ttgir_key_loops(ttgir)
    if loops and bn:
        per_loop = []
        for body in loops:
            text = "\n".join(body)
            tile = re.findall(rf"math\.exp2 [^:]*: tensor<{bm}x{bn}xf32, (#\w+)>", text)
            rows = re.findall(rf"math\.exp2 [^:]*: tensor<{bm}xf32,", text)
            per_loop.append((len(tile), len(rows), tile[0] if tile else None))
        rec["exp2_ops_per_elem"] = max(t for t, _, _ in per_loop)
        rec["exp2_row_ops"] = max(r for _, r, _ in per_loop)
        main_tile, main_rows, layout = per_loop[0]
        if layout in layouts and main is not None:
            rows_pt, elems_pt = _per_thread(layouts[layout], bm, bn)
            rec.update(elems_per_thread=elems_pt, rows_per_thread=rows_pt,
                       ex2_expected=main_tile * elems_pt + main_rows * rows_pt,
                       ex2_per_elem=round((rec["ex2_per_tile"] - main_rows * rows_pt) / elems_pt, 2))
        rec["convert_layouts_main"] = "\n".join(loops[0]).count("ttg.convert_layout")
    copies = re.findall(r"ttg\.async_copy_global_to_local [^\n]*tensor<[^>]*!tt\.ptr<(\w+)>", ttgir)
    rec["async_copy_types"] = sorted(set(copies))
    rec["tma_loads"] = len(re.findall(r"ttng\.async_tma_copy_global_to_local", ttgir))
    # the dense mask as the launch passes it: None (no dense mask), a byte per score (*u8/*i8) or
    # bit-packed int32 words (*i32); read asynchronously when its element type is copied async
    mask_type = signature_of(launch).get("Mask", "constexpr")
    rec["mask"] = "none" if mask_type == "constexpr" else "bit-packed" if mask_type == "*i32" else "bytes"
    mask_elem = {"*i32": "i32", "*u8": "i8", "*i8": "i8"}.get(mask_type)
    rec["mask_async"] = mask_elem is not None and mask_elem in copies
    return rec


def signature_of(launch: Launch) -> dict:
    """The JIT signature (argument name -> type) of a recorded launch."""
    return specialise(launch)[1]


def compile_launch(launch: Launch, arch: int):
    """(compiled kernel, ptxas -v log, SASS listing) of one recorded launch for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn, signature, constexprs, attrs, options = specialise(launch)
    ck = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                        target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        log, cubin = _ptxas_report(ck.asm["ptx"], arch, Path(tmp))
        (Path(tmp) / "k.cubin").write_bytes(cubin)
        sass = subprocess.run([_nvidia_tool("cuobjdump", arch), "-sass", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=True).stdout
    return ck, log, sass


def audit_case(case: Case, arch: int, kernels_dir: Path | None = None, out_dir: Path | None = None) -> dict:
    """Record, compile, disassemble and analyse one case; a dict with ``error`` or ``na`` if it fails."""
    base = dict(case=case.name, kernel=case.kernel, variant=case.variant, dtype=case.dtype, head_dim=case.head_dim,
                tma=case.tma, arch=arch)
    try:
        launch = _pick(case, record_case(case, arch, kernels_dir))
    except (NotApplicable, TypeError) as exc:  # TypeError: an older launcher without the keyword
        return base | dict(na=str(exc)[:200])
    t0 = time.perf_counter()
    try:
        ck, log, sass = compile_launch(launch, arch)
    except Exception as exc:  # reported with the case
        return base | dict(error=f"{type(exc).__name__}: {exc}"[:3000])
    rec = analyse(case, launch, arch, ck, log, sass)
    rec["compile_s"] = round(time.perf_counter() - t0, 1)
    if out_dir is not None:
        stem = Path(out_dir) / f"sm{arch}" / case.name
        stem.parent.mkdir(parents=True, exist_ok=True)
        for suffix, text in ((".ptx", ck.asm["ptx"]), (".ptxas.log", log), (".ttgir", ck.asm["ttgir"]),
                             (".sass", sass)):
            stem.with_suffix(suffix).write_text(text)
    return rec


def _has_tma_path(kernels_dir: Path) -> bool:
    """Whether the kernel package in ``kernels_dir`` has the bulk-tensor-copy prefill path."""
    return "use_tma" in (Path(kernels_dir) / "attention_prefill.py").read_text()


def _audit_star(key):
    return audit_case(*key)


def run_audit(archs=ARCHS, only: str | None = None, jobs: int = 2, kernels_dir: Path | None = None,
              out_dir: Path | None = None, cases=None, progress=None) -> list[dict]:
    """Audit the default cases (or ``cases``: (Case, arch) pairs) in ``jobs`` spawned processes
    (compiling needs triton without TRITON_INTERPRET, which is read when triton is imported)."""
    keys = cases if cases is not None else [(c, a) for a in archs for c in default_cases(a)]
    if kernels_dir is not None and not _has_tma_path(kernels_dir):
        # an older package without the bulk-copy path: every case on its pointer path, once
        keys = list(dict.fromkeys((dataclasses.replace(c, tma=False), a) for c, a in keys))
    if only:
        keys = [(c, a) for c, a in keys if all(part in f"{c.name}-sm{a}" for part in only.split(","))]
    # bf16 first (the configurations the budgets and the README table quote), then fp16, fp32
    keys = sorted(keys, key=lambda ca: ("bf16", "fp16", "fp32").index(ca[0].dtype))
    keys = [(c, a, kernels_dir, out_dir) for c, a in keys]
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    results = []
    try:
        with ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            for rec in pool.map(_audit_star, keys):
                results.append(rec)
                if progress:
                    progress(rec)
                if out_dir is not None:  # what is done so far survives an interrupted run
                    with open(Path(out_dir) / "audit.jsonl", "a") as partial:
                        partial.write(json.dumps(rec) + "\n")
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return results


# -- same code: a change that must not touch the existing variants -----------------------------------
def ptx_body(ptx: str) -> str:
    """The PTX of a kernel without its debug information (source line records, file table, DWARF
    sections) and comments: what is left changes only if the generated code does."""
    text = ptx.split("\t.section\t.debug")[0]
    lines = []
    for line in text.splitlines():
        line = re.sub(r"//.*$", "", line.strip()).rstrip()
        if line and not line.startswith((".loc", ".file")):
            lines.append(line)
    return "\n".join(lines)


def _ptx_of(key):
    """(case name, arch, PTX body or an error) of one case compiled from one kernel package."""
    import triton
    from triton.backends.compiler import GPUTarget

    case, arch, kernels_dir = key
    try:
        launch = _pick(case, record_case(case, arch, kernels_dir))
    except (NotApplicable, TypeError) as exc:
        return case.name, arch, None, f"n/a: {exc}"
    fn, signature, constexprs, attrs, options = specialise(launch)
    ck = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                        target=GPUTarget("cuda", arch, 32), options=options)
    return case.name, arch, ptx_body(ck.asm["ptx"]), None


def same_code(before_dir: Path, archs=ARCHS, only: str | None = None, jobs: int = 2) -> list[dict]:
    """Compile the default cases (filtered by ``only``) from the kernel package in ``before_dir`` and
    from this repository's, and compare their PTX without debug information: one record per case
    with ``same`` True/False, or ``na`` where the older package cannot launch it. Each compile runs in
    a fresh spawned process (the two packages load under one module name)."""
    keys = [(c, a) for a in archs for c in default_cases(a)]
    if only:
        keys = [(c, a) for c, a in keys if all(part in f"{c.name}-sm{a}" for part in only.split(","))]
    tasks = [(c, a, d) for c, a in keys for d in (before_dir, None)]
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(max(1, jobs), mp_context=multiprocessing.get_context("spawn"),
                                 max_tasks_per_child=1) as pool:
            results = list(pool.map(_ptx_of, tasks))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    records = []
    for (name, arch, old, old_na), (_, _, new, new_na) in zip(results[::2], results[1::2]):
        rec = dict(case=name, arch=arch)
        if old is None or new is None:
            rec["na"] = old_na or new_na
        else:
            rec["same"] = old == new
        records.append(rec)
    return records


# -- budgets ----------------------------------------------------------------------------------------
# docs/testing.md, "Kernel efficiency": the hot path may cost at most 5% more registers and main-loop
# instructions than the yardstick compiled with the same config.
HOT_PATH_SLACK = 1.05
MIN_DECODE_CTAS_PER_SM = 2


def _yardstick(records, rec):
    """The yardstick record with the same arch, dtype, head dim and load path as ``rec``."""
    for r in records:
        if (r["kernel"] == "flash" and r["arch"] == rec["arch"] and r["dtype"] == rec["dtype"]
                and r["head_dim"] == rec["head_dim"] and r["tma"] == rec["tma"] and "regs" in r):
            return r
    return None


def budget_report(records: list[dict]) -> list[dict]:
    """One row per (budget, kernel record): ``ok`` and the measured ``detail``."""
    rows = []

    def add(budget, rec, ok, detail):
        rows.append(dict(budget=budget, case=rec["case"], arch=rec["arch"], ok=bool(ok), detail=detail))

    for rec in records:
        if "regs" not in rec:
            if "error" in rec:
                add("compiles", rec, False, rec["error"][:300])
            continue
        add("zero spills", rec, rec["spill_store"] == 0 and rec["spill_load"] == 0,
            f"{rec['spill_store']} / {rec['spill_load']} bytes")
        if rec["kernel"] in ("prefill", "decode", "flash", "column") and "exp2_ops_per_elem" in rec:
            allowed = 2 if rec["softcap"] else 1
            # the hidden-sink variant rescales two running states, each under its own max: two row exp2s
            row_allowed = 2 if rec["variant"] == "hidden" else 1
            ok = rec["exp2_ops_per_elem"] <= allowed and rec["exp2_row_ops"] <= row_allowed
            if "ex2_expected" in rec:
                ok = ok and rec["ex2_per_tile"] <= rec["ex2_expected"]
            add("one exp2 per score element", rec, ok,
                f"{rec['exp2_ops_per_elem']} tile exp2 op(s) per key loop (allowed {allowed}), MUFU.EX2 "
                f"{rec.get('ex2_per_tile')} per thread per tile (expected {rec.get('ex2_expected')})")
        if rec["kernel"] == "prefill" and rec["variant"] == "hot":
            ref = _yardstick(records, rec)
            if ref is not None and "main_loop_sass" in rec:
                ok = (rec["regs"] <= ref["regs"] * HOT_PATH_SLACK
                      and rec["main_loop_sass"] <= ref["main_loop_sass"] * HOT_PATH_SLACK)
                add("hot path within 5% of the yardstick", rec, ok,
                    f"regs {rec['regs']} vs {ref['regs']}, main loop {rec['main_loop_sass']} vs "
                    f"{ref['main_loop_sass']} SASS")
        if rec["kernel"] in ("prefill", "decode", "column") and rec["variant"] in ("hot", "policy", "padded", "stats",
                                                                                 "hidden", "lse"):
            add("no dense mask in the common cases", rec, rec["mask"] == "none",
                f"dense mask argument: {rec['mask']}")
        if rec["variant"] == "all" and rec["kernel"] in ("prefill", "decode"):
            add("a dense mask is bit-packed or copied asynchronously", rec,
                rec["mask"] == "bit-packed" or rec["mask_async"],
                f"mask {rec['mask']}, asynchronous copy: {rec['mask_async']}, plain global loads in the main "
                f"loop: {rec.get('ldg', 0)}")
        if rec["kernel"] == "prefill" and rec["tma"]:
            add("bulk tensor copies on sm_90", rec, rec["ptx_bulk_tensor"] > 0 and rec.get("utmaldg", 0) > 0,
                f"{rec['ptx_bulk_tensor']} cp.async.bulk.tensor in the PTX, {rec.get('utmaldg', 0)} UTMALDG in the main loop")
        if rec["kernel"] == "decode":
            add(">= 2 decode programs per SM", rec, rec["ctas_per_sm"] >= MIN_DECODE_CTAS_PER_SM,
                f"{rec['ctas_per_sm']} CTAs/SM (registers allow {rec['ctas_by_regs']}, shared memory "
                f"{rec['ctas_by_smem']})")
    return rows


# -- native timing ----------------------------------------------------------------------------------
def native_cases(arch: int) -> list[Case]:
    """What ``--native`` times on a GPU: the bf16 cases at hd 64 and 128 (the budgets' configs; the
    rest would not fit gpu_check.sh's few minutes of JIT compiles)."""
    return [c for c in default_cases(arch) if c.dtype == "bf16" and c.head_dim in (64, 128) and c.kernel != "reduce"]


def run_native(markdown: Path | None = None, deadline_s: float = 1e9) -> list[dict]:
    """Time each native case with its real launch on the current CUDA device (triton.testing.do_bench
    median): prefill and the yardstick in TFLOP/s (FLOPs = 4 B H Q mean-keys-per-row D), decode in
    GB/s of K and V read once. Rows are written to ``markdown`` as they come, and the run stops
    starting new cases after ``deadline_s`` seconds."""
    import torch
    import triton.testing

    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    lines = [f"# Native timing of the audited configurations: {torch.cuda.get_device_name()} (sm_{arch})", "",
             "| kernel | variant | dtype | hd | ms | TFLOP/s | K/V GB/s |", "|---|---|---|---|---|---|---|"]
    records, t0 = [], time.perf_counter()
    for case in native_cases(arch if arch >= 90 else 80):
        if time.perf_counter() - t0 > deadline_s:
            lines.append(f"| stopped after {deadline_s:.0f} s | | | | | | |")
            break
        rec = dict(case=case.name, arch=arch)
        try:
            call = case_call(case, arch, device="cuda", fill=True)
            ms = triton.testing.do_bench(lambda: call.launcher(*call.args, **call.kwargs), warmup=10, rep=50,
                                         return_mode="median")
            rec.update(ms=ms, tflops=call.flops / ms / 1e9, gbs=call.bytes / ms / 1e6)
            cells = f"{ms:.3f} | {rec['tflops']:.0f} | {rec['gbs']:.0f}"
        except Exception as exc:  # reported in the table; the other cases still run
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            cells = f"failed: {rec['error'][:80]} | |"
        records.append(rec)
        lines.append(f"| {case.kernel} | {case.variant}{' (TMA)' if case.tma else ''} | {case.dtype} | "
                     f"{case.head_dim} | {cells} |")
        if markdown is not None:
            markdown.write_text("\n".join(lines) + "\n")
        print(lines[-1], flush=True)
    return records


# -- report -----------------------------------------------------------------------------------------
def _loads(rec) -> str:
    parts = []
    if rec.get("utmaldg"):
        parts.append(f"TMA {rec['utmaldg']}")
    if rec.get("ldgsts"):
        parts.append(f"cp.async {rec['ldgsts']}")
    if rec.get("ldg"):
        parts.append(f"LDG {rec['ldg']}")
    if rec.get("mask", "none") != "none":
        parts.append(f"mask {rec['mask']}{' async' if rec.get('mask_async') else ''}")
    return ", ".join(parts) or "-"


def markdown_table(records: list[dict]) -> str:
    head = ("| arch | kernel | variant | dtype | hd | config | regs | spill st/ld B | smem KB | CTAs/SM | "
            "MMA/tile | exp2/thread/tile (per elem) | main-loop SASS | key loops | main-loop loads |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        label = f"| sm_{r['arch']} | {r['kernel']} | {r['variant']}{' (TMA)' if r.get('tma') else ''} | {r['dtype']} | {r['head_dim']} |"
        if "na" in r:
            lines.append(label + " n/a |" + " |" * 10)
            continue
        if "error" in r:
            lines.append(label + f" failed: {r['error'][:80]} |" + " |" * 10)
            continue
        ex2 = f"{r.get('ex2_per_tile', '-')} ({r.get('ex2_per_elem', '-')})"
        lines.append(label + f" {r['config']} | {r['regs']} | {r['spill_store']} / {r['spill_load']} | "
                     f"{r['shared'] / 1024:.0f} | {r['ctas_per_sm']} | {r.get('mma_per_tile', '-') or '-'} | {ex2} | "
                     f"{r.get('main_loop_sass', '-')} | {r['key_loops']} | {_loads(r)} |")
    return "\n".join(lines)


def _cell(rec: dict | None, key: str, fmt=str) -> str:
    if rec is None:
        return "-"
    if "na" in rec:
        return "n/a"
    if "error" in rec:
        return "failed"
    value = rec.get(key)
    return "-" if value is None else fmt(value)


def _spills(rec: dict) -> str:
    return f"{rec['spill_store']} / {rec['spill_load']}"


def _exp2(rec: dict) -> str:
    return f"{rec.get('ex2_per_tile', '-')} ({rec.get('ex2_per_elem', '-')})"


def comparison_table(before: list[dict], after: list[dict], dtype: str = "bf16", head_dim: int = 128) -> str:
    """Before/after table of one dtype and head dim: every ``after`` record next to the ``before``
    record of the same arch, kernel, variant, dtype and head dim on the pointer path (an older
    package has no other). Cells read ``before -> after``; n/a: the older package lacks the feature."""
    def key(r):
        return r["arch"], r["kernel"], r["variant"], r["dtype"], r["head_dim"]

    old = {key(r): r for r in before if not r.get("tma")}
    head = ("| arch | kernel | variant | config | regs | spill st/ld B | smem KB | CTAs/SM | exp2/thread/tile (per elem) "
            "| main-loop SASS | key loops | main-loop loads |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = [r for r in after if r["dtype"] == dtype and r["head_dim"] == head_dim]
    order = {"flash": 0, "prefill": 1, "decode": 2, "reduce": 3, "column": 4}
    variants = {"yardstick": 0, "hot": 1, "policy": 2, "padded": 3, "stats": 4, "all": 5, "hidden": 6, "lse": 7}
    rows.sort(key=lambda r: (r["arch"], order[r["kernel"]], variants[r["variant"]], not r.get("tma")))
    for r in rows:
        b = old.get(key(r))
        pair = lambda field, fmt=str: (f"{_cell(b, field, fmt)} -> {_cell(r, field, fmt)}"  # noqa: E731
                                        if b is not None else _cell(r, field, fmt))
        ok = "regs" in r and (b is None or "regs" in b)
        spill = f"{_spills(b)} -> {_spills(r)}" if ok and b is not None else (_spills(r) if "regs" in r else "-")
        ex2 = f"{_exp2(b)} -> {_exp2(r)}" if ok and b is not None else (_exp2(r) if "regs" in r else "-")
        loads = f"{_loads(b)} -> {_loads(r)}" if ok and b is not None else (_loads(r) if "regs" in r else "-")
        kb = lambda v: f"{v / 1024:.0f}"  # noqa: E731
        lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['variant']}{' (TMA)' if r.get('tma') else ''} | "
                     f"{pair('config') if b is not None and b.get('config', r.get('config')) != r.get('config') else _cell(r, 'config')} | "
                     f"{pair('regs')} | {spill} | {pair('shared', kb)} | {pair('ctas_per_sm')} | "
                     f"{ex2} | {pair('main_loop_sass')} | {pair('key_loops')} | {loads} |")
    return "\n".join(lines)


README_BEGIN = "<!-- kernel_audit.py --readme: begin -->"
README_END = "<!-- kernel_audit.py --readme: end -->"


def update_readme(path: Path, block: str) -> None:
    """Replace the text between the README_BEGIN and README_END markers of ``path`` (atomically)."""
    from sinkfix.files import atomic_write_text

    text = path.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path} has no {README_BEGIN} ... {README_END} block to replace")
    atomic_write_text(path, text[:start + len(README_BEGIN)] + "\n" + block.strip() + "\n" + text[end:])


def _print_progress(rec: dict) -> None:
    state = "n/a" if "na" in rec else "failed" if "error" in rec else f"{rec['regs']} regs"
    print(f"  {rec['case']} sm_{rec['arch']}: {state}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON instead of tables")
    parser.add_argument("--out", type=Path, help="keep each kernel's PTX, TTGIR, SASS and ptxas log here")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--only", help="comma-separated substrings a case name must all contain")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--kernels", type=Path, help="audit this kernel package folder instead of kernels/")
    parser.add_argument("--records", type=Path, help="audit.json of an earlier run: report it, compile nothing")
    parser.add_argument("--before", type=Path,
                        help="audit.json of an earlier run (e.g. --kernels on main's kernels/): add before/after tables")
    parser.add_argument("--readme", type=Path,
                        help="with --before: write the bf16 hd 128 before/after tables and the budgets into this "
                             "file's marked block")
    parser.add_argument("--native", action="store_true",
                        help="on a CUDA GPU: time the bf16 configurations with real launches instead")
    parser.add_argument("--deadline", type=float, default=1e9, help="--native: start no case after this many s")
    parser.add_argument("--same-code", type=Path, metavar="KERNELS_DIR",
                        help="compare the PTX (debug information left out) of the default cases, or --only's, "
                             "compiled from this kernel package folder and from kernels/; exit 1 on a difference")
    args = parser.parse_args(argv)
    if args.same_code is not None:
        archs = tuple(int(a) for a in args.arch.split(","))
        records = same_code(args.same_code, archs, args.only, args.jobs)
        for rec in records:
            verdict = rec.get("na") or ("same PTX" if rec["same"] else "DIFFERENT PTX")
            print(f"{rec['case']} sm_{rec['arch']}: {verdict}")
        differ = [r for r in records if r.get("same") is False]
        print(f"{sum(r.get('same') is True for r in records)} identical, {len(differ)} different, "
              f"{sum('na' in r for r in records)} not applicable")
        return 1 if differ else 0
    if args.native:
        import torch

        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            print("--native needs a CUDA GPU and TRITON_INTERPRET unset", file=sys.stderr)
            return 2
        records = run_native(args.markdown, args.deadline)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "native.json").write_text(json.dumps(records, indent=1))
        return 0 if records and not any("error" in r for r in records) else 1
    archs = tuple(int(a) for a in args.arch.split(","))
    t0 = time.time()
    if args.records is not None:  # tables and budgets of an earlier run, nothing compiled
        records = [r for r in json.loads(args.records.read_text())["records"] if r["arch"] in archs]
    else:
        records = run_audit(archs, args.only, args.jobs, args.kernels, args.out,
                            progress=None if args.json else _print_progress)
    budgets = budget_report(records)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "audit.json").write_text(json.dumps(dict(records=records, budgets=budgets), indent=1))
    if args.json:
        print(json.dumps(dict(records=records, budgets=budgets), indent=1))
    else:
        import triton

        compiled = sum(r.get("compile_s", 0) for r in records)
        source = "read from the records of an earlier run" if args.records else f"{time.time() - t0:.0f} s wall"
        text = [f"Kernel audit: triton {triton.__version__}, {len(records)} configurations, {compiled:.0f} s of "
                f"compilation ({source})", ""]
        for arch in archs:
            text += [f"## sm_{arch}", "", markdown_table([r for r in records if r["arch"] == arch]), ""]
        missed = [b for b in budgets if not b["ok"]]
        text += ["## Budgets", "", f"{len(budgets) - len(missed)} of {len(budgets)} met."]
        text += [f"- MISSED {b['budget']}: {b['case']} sm_{b['arch']}: {b['detail']}" for b in missed]
        if args.before is not None:
            before = json.loads(args.before.read_text())["records"]
            compare = []
            for arch in archs:
                compare += [f"### sm_{arch}, bf16, head dim 128: before -> after", "",
                            comparison_table(before, [r for r in records if r["arch"] == arch]), ""]
            text += ["", "## Before -> after", ""] + compare
            if args.readme:
                old_budgets = budget_report(before)
                old_met = sum(b["ok"] for b in old_budgets)
                summary = [f"Budgets before: {old_met} of {len(old_budgets)} checks met on the {len(before)} "
                           "configurations audited there; after: "
                           f"{len(budgets) - len(missed)} of {len(budgets)} met on all {len(records)} default "
                           "configurations (every dtype and head dim, `benchmarks/AUDIT.md`)."]
                summary += [f"- MISSED {b['budget']}: {b['case']} sm_{b['arch']}: {b['detail']}" for b in missed]
                update_readme(args.readme, "\n".join(compare + summary))
        print("\n".join(text))
        if args.markdown:
            from sinkfix.files import atomic_write_text

            atomic_write_text(args.markdown, "\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
