"""Kernel tests: device choice, random inputs and the tolerance rule shared by the kernel tests.

Device: CUDA tensors with compiled kernels when a GPU is present and TRITON_INTERPRET is unset,
otherwise CPU tensors through the Triton interpreter. Triton picks interpreter or compiler when a
``@triton.jit`` function is *decorated* (checked in triton 3.9: ``triton.jit`` reads the knob, the
launch does not), so the variable is set here, process-wide, when pytest collects this directory
and before any test imports a kernel module; it stays set for the rest of the process (the other
test modules do not run triton on the CPU except through the interpreter). sinkfix.kernels itself
imports no kernel module; one imported earlier in the other mode is reloaded below. Triton's own
``tl.standard`` helpers are decorated when triton is first imported (transformers imports it via
torch._dynamo), which is why the AOT compile test compiles in spawned processes without the flag.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

_KERNEL_MODULES = ("sinkfix.kernels.attention_common", "sinkfix.kernels.attention_prefill",
                   "sinkfix.kernels.attention_decode", "sinkfix.kernels.residual_clip",
                   "sinkfix.kernels.column_mass")
for _name in _KERNEL_MODULES:  # the common helpers first: the kernels import them
    _mod = sys.modules.get(_name)
    if _mod is not None:
        _kernel = vars(_mod)["softmax_stats" if _name.endswith("common") else
                             next(k for k in vars(_mod) if k.endswith("_kernel") or k.startswith("_sink_attn"))]
        if (type(_kernel).__name__ == "InterpretedFunction") != INTERPRET:
            importlib.reload(_mod)

from sinkfix.ops.reference import reference_sink_attention, share_within, visibility_mask  # noqa: E402

from ..conftest import require_triton_kernels  # noqa: E402

# Absolute floor of the tolerance rule, per dtype: about one rounding of an O(1) output (fp32
# 1e-6 ~ 8 ulp of 1.0; fp16 1e-3 ~ 1 ulp = 2^-10; bf16 8e-3 ~ 1 ulp = 2^-7).
# It only matters where the same-dtype PyTorch error happens to be tiny (a row that sees one key,
# a constant output), i.e. where one rounding of the output is the whole error.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
LSE_ATOL = 1e-5  # lse is fp32 in every case; a few ulp of values ~10


def randn(*shape, dtype, device=DEVICE, scale=1.0, layout="bhsd"):
    """Random N(0, scale^2) tensor (never zeros). layout 'bshd' returns a (B, H, S, D) view of
    (B, S, H, D) memory, the transposed layout transformers hands to attention functions."""
    if layout == "bshd":
        b, h, s, d = shape
        return (torch.randn(b, s, h, d, dtype=torch.float32) * scale).to(device=device, dtype=dtype).transpose(1, 2)
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def make_qkv(batch, q_heads, kv_heads, q_len, k_len, head_dim, dtype, *, layout="bhsd", sink_cols=None,
             sink_boost=0.0, seed=0):
    """q, k, v with an attention sink, as trained models have one: when ``sink_boost`` > 0 the keys
    at ``sink_cols`` are aligned with the mean query (+ sink_boost logits on average) and their
    values are drained (x 0.05). This puts most of the mass on the sink, the regime where the
    sink-aware policies differ from softmax and where l_N << l_S tests the epilogue's numerics."""
    torch.manual_seed(seed)
    q = randn(batch, q_heads, q_len, head_dim, dtype=torch.float32, layout=layout)
    k = randn(batch, kv_heads, k_len, head_dim, dtype=torch.float32, layout=layout)
    v = randn(batch, kv_heads, k_len, head_dim, dtype=torch.float32, layout=layout)
    if sink_boost and sink_cols is not None:
        q_dir = q.mean(dim=(1, 2))  # (B, D)
        q_dir = q_dir / q_dir.norm(dim=-1, keepdim=True)
        q = q + 1.5 * q_dir[:, None, None, :]
        for b in range(batch):
            for c in sink_cols[b].tolist():
                if 0 <= c < k_len:
                    k[b, :, c] = q_dir[b] * sink_boost * head_dim ** 0.5 / 1.5
                    v[b, :, c] *= 0.05
    return q.to(dtype), k.to(dtype), v.to(dtype)


def torch_sink_attention(q, k, v, *, attn_mask=None, causal=False, causal_offset=0, sliding_window=None,
                         scale=None, softcap=None, sink_cols=None, beta=None, extra_logits=None, virtual_sink_logit=None):
    """The same formula as the fp64 reference, run the way an eager PyTorch implementation in the
    input dtype runs it: q.k^T and P.V as matmuls in the input dtype, the softmax statistics in
    fp32 (transformers' eager attention casts scores to fp32 for the softmax), P cast back to the
    input dtype. Its error against fp64 is the yardstick of the tolerance rule."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ kr.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    probs, lse = _probs_fp32(scores.float(), q.shape[0], attn_mask, causal, causal_offset, sliding_window,
                             sink_cols, beta, extra_logits, virtual_sink_logit)
    out = probs.to(q.dtype) @ vr
    return out, lse


def _probs_fp32(scores, batch, attn_mask, causal, causal_offset, sliding_window, sink_cols, beta, extra_logits,
                virtual_sink_logit):
    """fp32 transcription of reference_sink_attention's probability formula on given scores."""
    _, heads, q_len, k_len = scores.shape
    device = scores.device
    visible = visibility_mask(batch, q_len, k_len, attn_mask=attn_mask, causal=causal, causal_offset=causal_offset,
                              sliding_window=sliding_window, device=device).expand(batch, heads, q_len, k_len)
    is_sink = torch.zeros(batch, k_len, dtype=torch.bool, device=device)
    if sink_cols is not None:
        for b_, cols in enumerate(sink_cols.expand(batch, -1).tolist()):
            is_sink[b_, [c for c in cols if 0 <= c < k_len]] = True
    is_sink = is_sink[:, None, None, :]
    in_s, in_n = visible & is_sink, visible & ~is_sink
    row_max = torch.where(visible, scores, torch.tensor(float("-inf"), device=device)).amax(-1, keepdim=True)
    zero_value = []  # (B, H, Q, E): s_aux in every row, the virtual logit where a non-sink key is seen
    if extra_logits is not None:
        zero_value.append(extra_logits.float().to(device)[None, :, None, :].expand(batch, heads, q_len, -1))
    if virtual_sink_logit is not None:
        virtual = virtual_sink_logit.float().to(device)[None, :, None, None].expand(batch, heads, q_len, 1)
        zero_value.append(torch.where(in_n.any(-1, keepdim=True), virtual, float("-inf")))
    if zero_value:
        extra = torch.cat(zero_value, dim=-1)
        row_max = torch.maximum(row_max, extra.amax(-1, keepdim=True))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.where(visible, torch.exp(scores - row_max), torch.zeros_like(scores))
    l_s, l_n = (e * in_s).sum(-1, keepdim=True), (e * in_n).sum(-1, keepdim=True)
    l_v = torch.exp(extra - row_max).sum(-1, keepdim=True) if zero_value else 0.0
    z = l_s + l_n + l_v
    b = torch.ones(heads, device=device) if beta is None else beta.float().to(device)
    b = b[None, :, None, None]
    # the reference's two underflow fixes, so the yardstick is not blind where the reference is
    # right: whether a row sees a non-sink key is a fact of the mask (l_N > 0 underflows at a sink
    # gap of ~110 nats in fp32; the yardstick then ignored beta, 2.66 off, and the rule passed a
    # beta-ignoring output), and the non-sink keys' shares are taken under their own maximum
    has_n = in_n.any(-1, keepdim=True)
    b = torch.where(has_n, b, torch.ones_like(b))
    safe_z = torch.where(z > 0, z, torch.ones_like(z))
    probs = b * e * in_s / safe_z + (l_n + (1 - b) * l_s) / safe_z * share_within(scores, in_n)
    # lse over the real keys under their own maximum: with the zero-value logits in row_max a
    # virtual logit of 120 made log(l_S + l_N) -inf, and the lse rule then passed any lse
    lse = torch.logsumexp(torch.where(visible, scores, torch.tensor(float("-inf"), device=device)), dim=-1)
    return probs, lse


def check_attention(out, lse, q, k, v, *, label="", **kw):
    """Tolerance rule (docs/testing.md): max |kernel - fp64| <= 2 x max |torch same-dtype - fp64|
    + ATOL[dtype] for out, 2 x max |torch fp32 - fp64| + LSE_ATOL for the (fp32) lse; the set of rows with lse = -inf must match exactly and
    every output element must be finite (the tests poison outputs with NaN before the launch)."""
    ref_out, _, ref_lse = reference_sink_attention(q, k, v, **kw)
    lp_out, _ = torch_sink_attention(q, k, v, **kw)
    assert torch.isfinite(out).all(), f"{label}: non-finite output (unwritten or NaN)"
    assert not torch.isnan(lse).any(), f"{label}: NaN in lse (unwritten?)"
    ref_out, ref_lse = ref_out.to(out.device), ref_lse.to(out.device)
    err = (out.double() - ref_out).abs().max().item()
    err_lp = (lp_out.double() - ref_out).abs().max().item()
    tol = 2 * err_lp + ATOL[q.dtype]
    assert err <= tol, f"{label}: out error {err:.3g} > 2 x torch {q.dtype} error {err_lp:.3g} + floor"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{label}: -inf pattern of lse differs"
    fin = torch.isfinite(ref_lse)
    lse_err = lse_err_lp = 0.0
    if fin.any():
        # the kernels' scores are fp32 sums of exact products of the inputs, so lse's yardstick is the
        # same formula with fp32 scores (the same-dtype one rounds the scores to bf16 / fp16 first:
        # an lse error of 1e-2 to 2e-1, which let a kernel off by 5e-2 pass)
        _, lp_lse = torch_sink_attention(q.float(), k.float(), v.float(), **kw)
        lse_err = (lse.double() - ref_lse)[fin].abs().max().item()
        lse_err_lp = (lp_lse.double().to(out.device) - ref_lse)[fin].abs().max().item()
        assert lse_err <= 2 * lse_err_lp + LSE_ATOL, f"{label}: lse error {lse_err:.3g} vs fp32 torch {lse_err_lp:.3g}"
    ERRORS.append((label, str(q.dtype).replace("torch.", ""), err, err_lp, lse_err))
    return err, err_lp


ERRORS: list[tuple] = []  # (label, dtype, kernel err, same-dtype torch err, lse err) per attention check
CLIP_ERRORS: list[tuple] = []  # (dtype, kernel err, same-dtype torch err, max |out|) per clip check


def poisoned(q):
    """NaN-filled (out, lse) buffers in the kernels' own layouts, so unwritten elements fail."""
    b, h, s, d = q.shape
    out = torch.full((b, s, h, d), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.full((b, h, s), float("nan"), dtype=torch.float32, device=q.device)
    return out, lse


def policy_kwargs(policy, q_heads, batch, *, device=DEVICE):
    """Sink-policy keyword arguments: identity, ACT sink scaling with a different beta per head,
    drop (beta = 0), a virtual sink logit, GPT-OSS-style learned s_aux, and everything together."""
    g = torch.Generator().manual_seed(1)
    betas = torch.tensor([0.4, 0.9, 0.0, 1.0, 0.7, 0.25, 0.55, 0.95])[torch.arange(q_heads) % 8]
    first = torch.zeros(batch, 1, dtype=torch.long)
    if policy == "identity":
        kw = dict(sink_cols=first, beta=torch.ones(q_heads))
    elif policy == "scaling":
        kw = dict(sink_cols=first, beta=betas)
    elif policy == "drop":
        kw = dict(sink_cols=first, beta=torch.zeros(q_heads))
    elif policy == "virtual":  # the first-token sink's own row (row 0) must not count it
        kw = dict(sink_cols=first, virtual_sink_logit=torch.full((q_heads,), 1.5))
    elif policy == "identity values":  # a guard's fallback in a compiled forward (PatchHandle.run_as_identity)
        kw = dict(sink_cols=first, beta=torch.ones(q_heads), virtual_sink_logit=torch.full((q_heads,), float("-inf")))
    elif policy == "s_aux":
        kw = dict(extra_logits=torch.randn(q_heads, 1, generator=g) * 2)
    elif policy == "combined":
        extra = torch.randn(q_heads, 3, generator=g)
        extra[::2, 1] = float("-inf")  # -inf entries are ignored
        kw = dict(sink_cols=torch.tensor([[0, 5, -1]] * batch), beta=betas, extra_logits=extra,
                  virtual_sink_logit=torch.randn(q_heads, generator=g))
    else:
        raise ValueError(policy)
    return {k: v.to(device) for k, v in kw.items()}


def pytest_terminal_summary(terminalreporter):
    """The measured errors per dtype (kernel vs fp64, same-dtype torch vs fp64), for RESULTS.md."""
    if CLIP_ERRORS:
        terminalreporter.write_line(f"kernel residual-clip checks: {len(CLIP_ERRORS)}")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            rows = [r for r in CLIP_ERRORS if r[0] == dtype]
            if rows:
                terminalreporter.write_line(
                    f"  {str(dtype)[6:]}: max |out - fp64| / max |out| {max(r[1] / r[3] for r in rows):.3g} "
                    f"(same-dtype torch {max(r[2] / r[3] for r in rows):.3g})")
    if not ERRORS:
        return
    terminalreporter.write_line(f"kernel attention checks: {len(ERRORS)}")
    for dtype in ("float32", "float16", "bfloat16"):
        rows = [r for r in ERRORS if r[1] == dtype]
        if not rows:
            continue
        atol = ATOL[getattr(torch, dtype)]
        used = max(r[2] / (2 * r[3] + atol) for r in rows)
        terminalreporter.write_line(
            f"  {dtype}: {len(rows)} checks, max |out - fp64| {max(r[2] for r in rows):.3g} "
            f"(same-dtype torch {max(r[3] for r in rows):.3g}), max |lse - fp64| {max(r[4] for r in rows):.3g}, "
            f"largest share of the tolerance used {used:.2f}")


class _KernelTestKit:
    """What the kernel tests share, handed out as the ``kt`` fixture (no imports of conftest)."""

    device = DEVICE
    interpret = INTERPRET
    ATOL = ATOL
    make_qkv = staticmethod(make_qkv)
    randn = staticmethod(randn)
    check_attention = staticmethod(check_attention)
    torch_sink_attention = staticmethod(torch_sink_attention)
    poisoned = staticmethod(poisoned)
    policy_kwargs = staticmethod(policy_kwargs)
    clip_errors = CLIP_ERRORS


@pytest.fixture(scope="session")
def kt():
    return _KernelTestKit()


@pytest.fixture(autouse=True)
def _kernels_can_run(request):
    """A test that runs a kernel (through the kit, or with a ``backend="triton"`` parameter) skips,
    saying why, where the installed triton cannot run the kernels (tests/conftest.py)."""
    callspec = getattr(request.node, "callspec", None)
    if "kt" in request.fixturenames or (callspec is not None and callspec.params.get("backend") == "triton"):
        require_triton_kernels()
