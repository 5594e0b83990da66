"""Review 35 of the PyTorch ops around the Triton kernels (/work/review/report35.md, findings 1-6).

1. The fused CPU attention op read q/k/v whose last dimension is not contiguous (``x[..., ::2]``,
   head-dim-major storage) or whose query rows overlap as garbage: wrong, run-to-run different
   outputs and NaN, on every path that uses it (positional, content, gradients, observers).
2. A float64 beta crashed the decode fast path with statistics or gradients (a float64 model with a
   monitor crashed at its first decode step).
3. The blockwise backward sliced a (B, 1, 1, K) mask along its broadcast query axis: empty from the
   second row block on.
4. The content path ran no argument checks (K = 0 killed the process with SIGFPE; scale 0 gave NaN).
5. The positional PyTorch backend ran integer inputs, ignored ``key_ranges`` without
   ``key_padding``, took 2-D masks the kernels refused, and failed deep inside on wrong shapes.
6. The content path scaled the sink's own row by exp(lse_S - lse_all) from two different ops.

The tests that need the Triton kernels run under ``TRITON_INTERPRET=1`` (or on a GPU) and are
skipped otherwise, as in ``tests/kernels``; everything else runs the PyTorch path on the CPU. Shapes
are tiny: each test takes a second or two.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import sinkfix
from sinkfix.ops import attention_grad
from sinkfix.ops.attention import sink_attention, sink_attention_torch
from sinkfix.ops.content_attention import content_sink_attention
from sinkfix.ops.content_reference import (
    column_stats_reference, decide_hidden_sinks, reference_content_sink_attention,
)
from sinkfix.ops.flash import flash_with_lse
from sinkfix.ops.reference import reference_sink_attention, sink_key_mask

from .conftest import tiny_model, triton_kernels_unusable

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = (INTERPRET or torch.cuda.is_available()) and triton_kernels_unusable() is None
needs_kernels = pytest.mark.skipif(not KERNELS, reason="the Triton kernels need TRITON_INTERPRET=1 or a GPU, and a "
                                                       "triton that can run them (tests/conftest.py)")
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=needs_kernels)]

# fp32 paths against the fp64 formula on these O(1) shapes: 1-4e-7 measured (review 35's fp32
# errors were 1e-7 to 7e-7); the broken views were 2.0-4.4 off, or NaN
ATOL = 2e-6


def _qkv(batch=1, q_heads=2, kv_heads=1, q_len=9, k_len=9, dim=32, seed=3, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=g)
    k[:, :, 0] += 1.5 * q.mean((1, 2))[:, None]  # a sink worth the name in column 0
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def _last_dim_every_other(t):
    """The same values as ``t`` behind a last-dimension stride of 2."""
    fill = min(1e30, torch.finfo(t.dtype).max)  # what a misread returns: far from the values
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), fill, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def _dim_major(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _overlapping_rows(t):
    """Row stride 1 (rows overlap): row i holds elements i .. i + D - 1 of one buffer per head. Not
    the values of ``t``: the caller compares against its own copy."""
    b, h, n, d = t.shape
    store = torch.randn(b, h, n + d, generator=torch.Generator().manual_seed(9)).to(t.dtype)
    return store.as_strided((b, h, n, d), (store.stride(0), store.stride(1), 1, 1))


def _seq_every_other(t):
    wide = torch.full((t.shape[0], t.shape[1], 2 * t.shape[2], t.shape[3]), 1e30, dtype=t.dtype)
    wide[:, :, ::2] = t
    return wide[:, :, ::2]


def _bshd(t):
    return t.transpose(1, 2).contiguous().transpose(1, 2)


VIEWS = {"last-dim-stride-2": _last_dim_every_other, "dim-major": _dim_major, "seq-stride-2": _seq_every_other,
         "bshd": _bshd}


# -- 1. strided views and the fused CPU op ------------------------------------------------------------
@pytest.mark.parametrize("which", ["q", "k", "v", "qkv"])
@pytest.mark.parametrize("view", [*VIEWS, "overlapping-rows"])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_with_lse_reads_any_strides_right(view, which, causal):
    """flash_with_lse against the fp64 softmax of the very same values (before the fix: 2-4 off,
    NaN for dim-major and overlapping query rows). Expanded (stride-0) batch and heads too."""
    q, k, v = _qkv(batch=2, q_heads=2, kv_heads=2)
    make = _overlapping_rows if view == "overlapping-rows" else VIEWS[view]
    tensors = [make(t) if name in which else t for name, t in zip("qkv", (q, k, v))]
    q_, k_, v_ = tensors
    want, _, want_lse = reference_sink_attention(*(t.contiguous() for t in tensors), causal=causal)
    for _ in range(2):  # it was nondeterministic: outside reads changed from call to call
        junk = [torch.full((1000,), 1e30) for _ in range(20)]  # noqa: F841 (churns the allocator)
        out, lse = flash_with_lse(q_, k_, v_, visible=None, is_causal=causal, scale=32 ** -0.5)
        assert (out.double() - want).abs().max() < ATOL
        assert (lse.double() - want_lse).abs().max() < ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("view", ["last-dim-stride-2", "dim-major"])
def test_reduced_precision_strided_views_give_the_contiguous_result(view, dtype):
    """bf16 was affected the same way (2.52 off): a strided call now equals the same call on
    contiguous copies, bit for bit (the op is given such copies)."""
    q, k, v = _qkv(dtype=dtype)
    kw = dict(causal=True, first_column_sink=True, beta=torch.tensor([0.5, 0.3]))
    got = sink_attention(VIEWS[view](q), VIEWS[view](k), VIEWS[view](v), backend="torch", **kw)
    want = sink_attention(q, k, v, backend="torch", **kw)
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)


def test_flash_with_lse_takes_expanded_batch_and_heads_without_copies_going_wrong():
    q, k, v = _qkv(batch=1, q_heads=4, kv_heads=1)
    q, k, v = q.expand(3, -1, -1, -1), k.expand(3, 2, -1, -1), v.expand(3, 2, -1, -1)  # stride 0
    want, _, want_lse = reference_sink_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    out, lse = flash_with_lse(q, k, v, visible=None, is_causal=True, scale=32 ** -0.5)
    assert (out.double() - want).abs().max() < ATOL and (lse.double() - want_lse).abs().max() < ATOL


# every PyTorch path that reaches the fused op: identity (plain softmax), the causal first-column
# prefill, the decode step (Q = 1, every row sees keys 1..), the general path (a mask and two sink
# columns), the observers' per-row sink mass and the telemetry statistics
POSITIONAL_CASES = {
    "identity": dict(causal=True),
    "first-column-prefill": dict(causal=True, first_column_sink=True, beta=torch.tensor([0.5, 0.3])),
    "decode-step": dict(first_column_sink=True, beta=torch.tensor([0.5, 0.3]), q_len=1),
    "general": dict(causal=True, sink_cols=torch.tensor([[0, 4]]), beta=torch.tensor([0.5, 0.3]),
                    virtual_sink_logit=torch.tensor([0.2, -1.0]), sliding_window=6),
    "observer-mass": dict(causal=True, first_column_sink=True, beta=torch.tensor([0.5, 0.3]), need_sink_mass=True),
    "telemetry-stats": dict(causal=True, first_column_sink=True, beta=torch.tensor([0.5, 0.3]),
                            need_sink_stats=True),
}


def _reference_kwargs(kw, batch):
    ref = {a: b for a, b in kw.items() if a not in ("first_column_sink", "need_sink_mass", "need_sink_stats", "q_len")}
    if kw.get("first_column_sink"):
        ref["sink_cols"] = torch.zeros(batch, 1, dtype=torch.long)
    return {a: (b.double() if isinstance(b, torch.Tensor) and b.is_floating_point() else b) for a, b in ref.items()}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("case", list(POSITIONAL_CASES))
def test_positional_paths_on_strided_views(case, view):
    """Before: the identity 3.96 off plain softmax on x[..., ::2], NaN with a beta on dim-major views."""
    kw = dict(POSITIONAL_CASES[case])
    q, k, v = _qkv(q_len=kw.pop("q_len", 9))
    want, probs, _ = reference_sink_attention(q.double(), k.double(), v.double(), **_reference_kwargs(kw, 1))
    got = sink_attention(VIEWS[view](q), VIEWS[view](k), VIEWS[view](v), backend="torch", **kw)
    assert (got.out.double() - want).abs().max() < ATOL
    plain = sink_attention(q, k, v, backend="torch", **kw)
    if kw.get("need_sink_mass"):
        assert (got.sink_mass - plain.sink_mass).abs().max() < ATOL
    if kw.get("need_sink_stats"):
        assert (got.sink_stats - plain.sink_stats).abs().max() < ATOL


@needs_kernels
def test_observers_on_the_triton_backend_read_strided_views_right():
    """need_sink_mass on backend="triton" runs the PyTorch path (the fused op): its output and the
    per-row sink mass of a dim-major call equal those of the contiguous call."""
    q, k, v = _qkv(device=KERNEL_DEVICE)
    kw = dict(causal=True, first_column_sink=True, beta=torch.tensor([0.5, 0.3], device=KERNEL_DEVICE),
              need_sink_mass=True)
    got = sink_attention(_dim_major(q), _dim_major(k), _dim_major(v), backend="triton", **kw)
    want, _, _ = reference_sink_attention(q.double(), k.double(), v.double(), **_reference_kwargs(kw, 1))
    assert (got.out.double() - want).abs().max() < ATOL
    plain = sink_attention(q, k, v, backend="triton", **kw)
    assert (got.sink_mass - plain.sink_mass).abs().max() < ATOL


@pytest.mark.parametrize("view", ["last-dim-stride-2", "dim-major"])
def test_calibration_gradients_through_strided_views_equal_fp64_autograd(view):
    """The split path's gradients (the CPU fused backward) on strided q/k/v against fp64 autograd of
    the formula, through out and lse (before: the q gradient 4.0 off, gradients of size 3.6)."""
    q, k, v = _qkv()
    beta = torch.tensor([0.5, 0.3])
    kw = dict(causal=True, sink_cols=torch.tensor([[0, 3]]), beta=beta)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    views = [VIEWS[view](t) for t in leaves]
    got = sink_attention(*views, backend="torch", **kw)
    g = torch.Generator().manual_seed(5)
    w_out, w_lse = torch.randn(got.out.shape, generator=g), torch.randn(got.lse.shape, generator=g)
    ((got.out * w_out).sum() + (got.lse * w_lse).sum()).backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out, _, lse = reference_sink_attention(*ref_leaves, **_reference_kwargs(kw, 1))
    ((out * w_out.double()).sum() + (lse * w_lse.double()).sum()).backward()
    for leaf, ref in zip(leaves, ref_leaves):
        scale = ref.grad.abs().max()
        assert (leaf.grad.double() - ref.grad).abs().max() < 2e-6 * max(1.0, float(scale))


def _content_reference(q, k, v, **kw):
    """The fp64 rule: column statistics -> decision -> correction (the hidden set is returned)."""
    q, k, v = q.double(), k.double(), v.double()
    layout = dict(causal=kw["causal"])
    stats = column_stats_reference(q, k, **layout)
    is_sink = sink_key_mask(kw["sink_cols"], q.shape[0], k.shape[2], q.device)
    hidden = decide_hidden_sinks(stats, is_sink, threshold=kw["threshold"], min_rows=1, heads=None)
    out, _, _ = reference_content_sink_attention(q, k, v, hidden=hidden, hidden_beta=kw["hidden_beta"].double(),
                                                 **layout, sink_cols=kw["sink_cols"], beta=kw["beta"].double())
    return out, hidden


@pytest.mark.parametrize("view", ["last-dim-stride-2", "dim-major"])
def test_content_path_on_strided_views(view):
    """content_sink_attention(backend="torch") with Q > 8 (the fused three-pass path): before, 1.58
    off and another hidden set on x[..., ::2]."""
    q, k, v = _qkv(q_len=12, k_len=12, dim=16, seed=0)
    kw = dict(hidden_beta=torch.tensor([0.5, 0.5]), threshold=0.1, causal=True, sink_cols=torch.tensor([[0]]),
              beta=torch.tensor([0.7, 0.9]))
    want, want_hidden = _content_reference(q, k, v, **kw)
    got = content_sink_attention(VIEWS[view](q), VIEWS[view](k), VIEWS[view](v), backend="torch", **kw)
    assert torch.equal(got.hidden, want_hidden)
    assert (got.out.double() - want).abs().max() < ATOL


# -- 2. float64 beta on the decode fast path ----------------------------------------------------------
@pytest.mark.parametrize("mode", ["stats", "grad", "plain"])
def test_float64_beta_on_the_decode_step(mode):
    """One query row, first-column sink, float64 inputs and beta: with statistics or gradients the
    out-of-place weight was float64 and torch.lerp refused it ("expected dtype float for `weight`")."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 1, 16, dtype=torch.float64)
    k, v = torch.randn(1, 1, 6, 16, dtype=torch.float64), torch.randn(1, 1, 6, 16, dtype=torch.float64)
    beta = torch.tensor([0.5, 0.8], dtype=torch.float64)
    q_in = q.clone().requires_grad_() if mode == "grad" else q
    got = sink_attention(q_in, k, v, backend="torch", first_column_sink=True, beta=beta,
                         need_sink_stats=mode == "stats")
    want, probs, _ = reference_sink_attention(q, k, v, sink_cols=torch.zeros(1, 1, dtype=torch.long), beta=beta)
    assert got.out.dtype == torch.float64
    # the epilogue is float32 for every input dtype (docs/formulas.md, "Precision"): float32 rounding
    assert (got.out.detach() - want).abs().max() < 1e-6
    if mode == "stats":
        stock = reference_sink_attention(q, k, v, sink_cols=torch.zeros(1, 1, dtype=torch.long))[1]
        assert (got.sink_stats[..., 0].double() - stock[..., 0].sum(-1)).abs().max() < 1e-6
        assert torch.equal(got.sink_stats[..., 1], torch.ones(1, 2))
    if mode == "grad":
        got.out.sum().backward()
        q64 = q.clone().requires_grad_()
        first = torch.zeros(1, 1, dtype=torch.long)
        reference_sink_attention(q64, k, v, sink_cols=first, beta=beta)[0].sum().backward()
        assert (q_in.grad - q64.grad).abs().max() < 1e-6


def test_float64_model_with_a_monitor_generates():
    """Review 35's repro: a float64 model, a policy and a monitor crashed at the first decode step."""
    model = tiny_model("llama").double()
    ids = torch.randint(2, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.8)):
        with torch.no_grad():
            plain = model.generate(ids, max_new_tokens=3, do_sample=False)
        with sinkfix.monitor(model) as mon:
            monitored = mon.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(monitored, plain)  # the monitor only reads
    assert len(mon.records) >= 1


# -- 3. the blockwise backward with a broadcast query axis -----------------------------------------
@pytest.mark.parametrize("mask_kind", ["key-padding", "per-row"])
def test_blockwise_backward_with_several_row_blocks(monkeypatch, mask_kind):
    """Softcap sends gradients through attention_grad's blockwise backward. With the score budget
    scaled down to 3 query rows per block, a folded (B, 1, 1, K) key padding became an empty mask
    from the second block on ("size of tensor a (3) must match the size of tensor b (0)")."""
    B, H, Q, K, D = 2, 2, 8, 8, 16
    monkeypatch.setattr(attention_grad, "_BLOCK_ELEMENTS", B * H * K * 3)
    torch.manual_seed(0)
    q = torch.randn(B, H, Q, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, 1, K, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, 1, K, D, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.5, 0.8], dtype=torch.float64, requires_grad=True)
    padding = torch.ones(B, K, dtype=torch.bool)
    padding[0, :3] = False  # left padding in row 0
    kw = dict(causal=True, softcap=5.0, sink_cols=torch.tensor([[3], [0]]), beta=beta)
    mask_arg = (dict(key_padding=padding) if mask_kind == "key-padding"
                else dict(attn_mask=padding[:, None, None, :].expand(B, 1, Q, K)))
    out = sink_attention(q, k, v, backend="torch", **mask_arg, **kw).out
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    got = [t.grad.clone() for t in (q, k, v, beta)]
    for t in (q, k, v, beta):
        t.grad = None
    ref, _, _ = reference_sink_attention(q, k, v, attn_mask=padding[:, None, None, :], **kw)
    (ref * weights).sum().backward()
    for a, t in zip(got, (q, k, v, beta)):
        assert (a - t.grad).abs().max() < 1e-12  # the same fp64 formula, block by block


# -- 4. content path argument checks ------------------------------------------------------------------
def _content_call(backend, q, k, v, **overrides):
    kw = dict(hidden_beta=torch.tensor([0.5, 0.5], device=q.device), threshold=0.1, causal=True)
    kw.update(overrides)
    return content_sink_attention(q, k, v, backend=backend, **kw)


def _bad_content(name):
    """(q, k, v, overrides, exception, exact message) for a bad content call (Q = 12 rows)."""
    cases = {
        "no-key": (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0], {}), ValueError,
                   "sink attention needs at least one query row and one key, got Q={Q}, K=0"),
        "window-0": (lambda q, k, v: (q, k, v, dict(sliding_window=0)), ValueError,
                     "sliding_window must be an integer >= 1, got 0"),
        "window-true": (lambda q, k, v: (q, k, v, dict(sliding_window=True)), ValueError,
                        "sliding_window must be an integer >= 1, got True"),
        "scale-0": (lambda q, k, v: (q, k, v, dict(scale=0.0)), ValueError,
                    "scale must be a finite number > 0, got 0.0"),
        "scale-negative": (lambda q, k, v: (q, k, v, dict(scale=-0.25)), ValueError,
                           "scale must be a finite number > 0, got -0.25"),
        "offset-2.5": (lambda q, k, v: (q, k, v, dict(causal_offset=2.5)), ValueError,
                       "causal_offset must be an integer, got 2.5"),
        "sink-cols-float": (lambda q, k, v: (q, k, v, dict(sink_cols=torch.zeros(1, 1, device=q.device))), TypeError,
                            "sink_cols must hold integer key columns, got torch.float32"),
        "beta-shape": (lambda q, k, v: (q, k, v, dict(beta=torch.ones(3, device=q.device))), ValueError,
                       "beta must have shape (Hq,) = (2,), got (3,)"),
        "hidden-beta-shape": (lambda q, k, v: (q, k, v, dict(hidden_beta=torch.ones(3, device=q.device))), ValueError,
                              "hidden_beta must have shape (Hq,) = (2,), got torch.float32 (3,)"),
        "hidden-shape": (lambda q, k, v: (q, k, v, dict(hidden=torch.zeros(1, 2, 5, dtype=torch.bool,
                                                                           device=q.device))), ValueError,
                         "hidden must be a bool or uint8 (B, Hq, K) = (1, 2, 12) tensor, got torch.bool (1, 2, 5)"),
        "no-hidden-no-threshold": (lambda q, k, v: (q, k, v, dict(threshold=None)), ValueError,
                                   "content-dependent sinks need either a hidden-sink mask (hidden) or a threshold "
                                   "to decide one"),
        "threshold-nan": (lambda q, k, v: (q, k, v, dict(threshold=float("nan"))), ValueError,
                          "threshold must be a finite number (the mean attention a hidden sink's column exceeds), "
                          "got nan"),
        "mixed-dtypes": (lambda q, k, v: (q, k.half(), v, {}), TypeError,
                         "q, k, v must share one dtype among {dtypes}, got torch.float32, torch.float16, "
                         "torch.float32"),
        "int-qkv": (lambda q, k, v: (q.long(), k.long(), v.long(), {}), TypeError,
                    "q, k, v must share one dtype among {dtypes}, got torch.int64, torch.int64, torch.int64"),
        "mask-2d": (lambda q, k, v: (q, k, v, dict(attn_mask=torch.ones(12, 12, dtype=torch.bool, device=q.device))),
                    ValueError, "attn_mask (12, 12) does not broadcast to (B, 1|Hq, Q, K) = (1, 2, {Q}, 12)"),
        "key-padding-shape": (lambda q, k, v: (q, k, v, dict(key_padding=torch.ones(1, 13, dtype=torch.bool,
                                                                                     device=q.device))),
                              ValueError, "key_padding must be a bool (B|1, K) = (1|1, 12) tensor, got torch.bool "
                                          "(1, 13)"),
    }
    return cases[name]


CONTENT_BAD = ["no-key", "window-0", "window-true", "scale-0", "scale-negative", "offset-2.5", "sink-cols-float",
               "beta-shape", "hidden-beta-shape", "hidden-shape", "no-hidden-no-threshold", "threshold-nan",
               "mixed-dtypes", "int-qkv", "mask-2d", "key-padding-shape"]


# the few-rows code (Q <= 8) and the fused passes / kernels (Q = 12), both backends; Q = 12, K = 0 on
# the PyTorch backend runs in a subprocess below (it killed the process)
CONTENT_BAD_CASES = [pytest.param(name, backend, q_len, marks=needs_kernels if backend == "triton" else ())
                     for name in CONTENT_BAD for backend in ("torch", "triton") for q_len in (4, 12)
                     if not (name == "no-key" and backend == "torch" and q_len == 12)]


@pytest.mark.parametrize("name, backend, q_len", CONTENT_BAD_CASES)
def test_content_sinks_refuse_bad_arguments_with_one_message(name, backend, q_len):
    """Both backends, both code paths: the same one-line error before any compute."""
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    q, k, v = _qkv(q_len=q_len, k_len=12, dim=16, device=device)
    make, error, message = _bad_content(name)
    q, k, v, overrides = make(q, k, v)
    dtypes = "fp16/bf16/fp32/fp64" if backend == "torch" else "fp16/bf16/fp32"
    with pytest.raises(error) as caught:
        _content_call(backend, q, k, v, **overrides)
    assert str(caught.value) == message.format(Q=q_len, dtypes=dtypes)


def test_content_with_no_key_is_an_error_not_a_crash():
    """K = 0 with 12 query rows on the PyTorch backend: the fused op divided by the length and the
    process died of SIGFPE (exit code -8)."""
    child = ("import torch; from sinkfix.ops.content_attention import content_sink_attention as c\n"
             "try:\n"
             "    c(torch.randn(1, 2, 12, 16), torch.randn(1, 1, 0, 16), torch.randn(1, 1, 0, 16), backend='torch',\n"
             "      hidden_beta=torch.tensor([.5, .5]), threshold=0.1, causal=True)\n"
             "except ValueError as e:\n"
             "    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: sink attention needs at least one query row and one key, got Q=12, K=0" in done.stdout


@pytest.mark.parametrize("q_len", [4, 12])
@needs_kernels
def test_content_triton_backend_refuses_fp64_whatever_the_row_count(q_len):
    """fp64 q/k/v: the kernels refuse them at Q > 8, and Q <= 8 ran them on the PyTorch code."""
    q, k, v = _qkv(q_len=q_len, k_len=12, dim=16, dtype=torch.float64, device=KERNEL_DEVICE)
    with pytest.raises(TypeError, match=re.escape("q, k, v must share one dtype among fp16/bf16/fp32, got "
                                                  "torch.float64")):
        _content_call("triton", q, k, v)


@pytest.mark.parametrize("q_len", [4, 12])
def test_content_checks_do_not_refuse_valid_calls(q_len):
    """Guards against over-refusal: fp64 on the PyTorch backend (computed in fp32), a uint8 hidden
    set (as the kernels take it), a 0-d softcap tensor and a broadcast (B, 1, 1, K) mask run, and
    equal the fp64 rule."""
    q, k, v = _qkv(q_len=q_len, k_len=12, dim=16)
    hidden = torch.zeros(1, 2, 12, dtype=torch.bool)
    hidden[:, :, 5] = True
    mask = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    mask[..., 7] = False
    kw = dict(hidden_beta=torch.tensor([0.5, 0.2]), causal=True, causal_offset=12 - q_len,
              sink_cols=torch.tensor([[0]]), beta=torch.tensor([0.7, 0.9]), attn_mask=mask)
    want, _, _ = reference_content_sink_attention(q.double(), k.double(), v.double(), hidden=hidden,
                                                  **{a: (b.double() if isinstance(b, torch.Tensor)
                                                         and b.is_floating_point() else b) for a, b in kw.items()},
                                                  softcap=30.0)
    for hid in (hidden, hidden.to(torch.uint8)):
        for dtype in (torch.float32, torch.float64):
            got = content_sink_attention(q.to(dtype), k.to(dtype), v.to(dtype), backend="torch", hidden=hid,
                                         softcap=torch.tensor(30.0), **kw)
            assert got.out.dtype == dtype and (got.out.double() - want).abs().max() < ATOL


# -- 5. the positional PyTorch backend refuses what the kernels refuse -------------------------------
def _positional_bad(name, device):
    q, k, v = _qkv(q_len=3, k_len=4, dim=16, device=device)
    gen = torch.Generator().manual_seed(0)
    ints = [torch.randint(-3, 4, t.shape, generator=gen).to(device) for t in (q, k, v)]
    ranges = torch.tensor([[2, 4, 0]], dtype=torch.int32, device=device)
    cases = {
        "int64": ((*ints,), {}, TypeError,
                  "q, k, v must share one dtype among {dtypes}, got torch.int64, torch.int64, torch.int64"),
        "mixed": ((q, k.half(), v), dict(causal=True), TypeError,
                  "q, k, v must share one dtype among {dtypes}, got torch.float32, torch.float16, torch.float32"),
        "mask-2d": ((q, k, v), dict(attn_mask=torch.ones(3, 4, dtype=torch.bool, device=device)), ValueError,
                    "attn_mask (3, 4) does not broadcast to (B, 1|Hq, Q, K) = (1, 2, 3, 4)"),
        "mask-wrong-k": ((q, k, v), dict(attn_mask=torch.ones(1, 1, 3, 5, dtype=torch.bool, device=device)),
                         ValueError, "attn_mask (1, 1, 3, 5) does not broadcast to (B, 1|Hq, Q, K) = (1, 2, 3, 4)"),
        "key-padding-wrong-k": ((q, k, v), dict(key_padding=torch.ones(1, 5, dtype=torch.bool, device=device)),
                                ValueError, "key_padding must be a bool (B|1, K) = (1|1, 4) tensor, got torch.bool "
                                            "(1, 5)"),
        "key-padding-4d": ((q, k, v), dict(key_padding=torch.ones(1, 1, 1, 4, dtype=torch.bool, device=device)),
                           ValueError, "key_padding must be a bool (B|1, K) = (1|1, 4) tensor, got torch.bool "
                                       "(1, 1, 1, 4)"),
        "key-ranges-alone": ((q, k, v), dict(causal=True, key_ranges=ranges), ValueError,
                             "key_ranges needs the key_padding it summarises"),
        "head-dim-0": ((q[..., :0], k[..., :0], v[..., :0]), {}, ValueError, "q/k/v head dim must be >= 1, got 0"),
        "softcap-0d-zero": ((q, k, v), dict(softcap=torch.tensor(0.0)), ValueError,
                            "softcap must be a finite number > 0, got 0.0"),
    }
    return cases[name]


POSITIONAL_BAD = ["int64", "mixed", "mask-2d", "mask-wrong-k", "key-padding-wrong-k", "key-padding-4d",
                  "key-ranges-alone", "head-dim-0", "softcap-0d-zero"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", POSITIONAL_BAD)
def test_positional_backends_refuse_the_same_inputs(name, backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    qkv, kw, error, message = _positional_bad(name, device)
    dtypes = "fp16/bf16/fp32/fp64" if backend == "torch" else "fp16/bf16/fp32"
    with pytest.raises(error) as caught:
        sink_attention(*qkv, backend=backend, **kw)
    assert str(caught.value) == message.format(dtypes=dtypes)


@pytest.mark.parametrize("name", ["int64", "mixed", "mask-2d", "head-dim-0"])
def test_the_torch_entry_and_its_gradient_path_refuse_too(name):
    """sink_attention_torch itself, and the blockwise gradient path (softcap + a gradient)."""
    qkv, kw, error, message = _positional_bad(name, "cpu")
    with pytest.raises(error, match=re.escape(message.format(dtypes="fp16/bf16/fp32/fp64"))):
        sink_attention_torch(*qkv, **kw)
    if qkv[0].is_floating_point():
        q = qkv[0].clone().requires_grad_()
        with pytest.raises(error, match=re.escape(message.format(dtypes="fp16/bf16/fp32/fp64"))):
            sink_attention(q, *qkv[1:], backend="torch", softcap=20.0, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_positional_checks_do_not_refuse_valid_calls(backend):
    """Guards against over-refusal: a 0-d softcap tensor equals the float softcap, broadcast 4-D
    masks and a (B, K) key padding with its ranges run, fp64 runs on the PyTorch backend."""
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    q, k, v = _qkv(batch=2, q_len=5, k_len=7, dim=16, device=device)
    padding = torch.ones(2, 7, dtype=torch.bool, device=device)
    padding[1, :2] = False
    from sinkfix.kernels.masks import key_padding_ranges

    kw = dict(causal=True, causal_offset=2, beta=torch.tensor([0.5, 0.3], device=device),
              sink_cols=torch.tensor([[0], [2]], device=device))
    mask = padding[:, None, None, :]
    want, _, _ = reference_sink_attention(q.double(), k.double(), v.double(), attn_mask=mask, softcap=3.0,
                                          **_reference_kwargs(kw, 2))
    for extra in (dict(attn_mask=mask), dict(attn_mask=mask.expand(2, 1, 5, 7)),
                  dict(key_padding=padding, key_ranges=key_padding_ranges(padding))):
        got = sink_attention(q, k, v, backend=backend, softcap=torch.tensor(3.0), **extra, **kw)
        assert (got.out.double() - want).abs().max() < ATOL
        same = sink_attention(q, k, v, backend=backend, softcap=3.0, **extra, **kw)
        assert torch.equal(got.out, same.out)
    if backend == "torch":
        got = sink_attention(q.double(), k.double(), v.double(), backend="torch", attn_mask=mask, softcap=3.0,
                             **_reference_kwargs(kw, 2))
        assert got.out.dtype == torch.float64 and (got.out - want).abs().max() < 1e-6


@needs_kernels
def test_decode_launcher_checks_its_block_n_override():
    """The prefill launcher refused block_n=24 in one line; the decode launcher failed deep in the
    interpreter ("arange's range must be a power of 2")."""
    from sinkfix.kernels.attention_decode import sink_attention_decode

    q, k, v = _qkv(q_len=1, k_len=300, dim=16, device=KERNEL_DEVICE)
    for bad in (24, 8, 16.0):
        with pytest.raises(ValueError, match=re.escape(f"block_n must be a power of 2 >= 16, got {bad!r}")):
            sink_attention_decode(q, k, v, block_n=bad)
    out, _ = sink_attention_decode(q, k, v, block_n=32, sink_cols=torch.zeros(1, 1, dtype=torch.long,
                                                                               device=KERNEL_DEVICE))
    want, _, _ = reference_sink_attention(q.double(), k.double(), v.double(), sink_cols=torch.zeros(1, 1,
                                                                                                     dtype=torch.long))
    assert (out.double().cpu() - want.cpu()).abs().max() < ATOL


# -- 6. the sink's own row on the content path ---------------------------------------------------------
@pytest.mark.parametrize("q_len", [5, 12])  # few-rows code and the fused three passes
@pytest.mark.parametrize("sink_score", [10.0, 40.0, 140.0])
def test_content_path_leaves_the_sinks_own_row_as_stock(sink_score, q_len):
    """Row 0 sees only the sink: its output is the sink's value exactly, as the positional path
    has it (before: scaled by exp(lse_S - lse_all) of two different ops, 3.1e-5 relative at a sink
    score of 140 with an empty hidden set). The other rows stay on the fp64 rule, with and
    without a hidden sink."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, q_len, 64, generator=g)
    k, v = torch.randn(1, 1, q_len, 64, generator=g), torch.randn(1, 1, q_len, 64, generator=g)
    direction = q[0, :, 0].mean(0)
    k[0, 0, 0] = direction * sink_score * 8 / (q[0, :, 0] @ direction).mean()  # row 0's score ~ sink_score
    kw = dict(causal=True, sink_cols=torch.tensor([[0]]), beta=torch.tensor([0.5, 0.5]),
              hidden_beta=torch.tensor([0.5, 0.5]))
    for hidden_col in (None, 3):
        hidden = torch.zeros(1, 2, q_len, dtype=torch.bool)
        if hidden_col is not None:
            hidden[:, :, hidden_col] = True
        got = content_sink_attention(q, k, v, backend="torch", hidden=hidden, **kw).out
        assert torch.equal(got[0, :, 0], v[0, 0, 0].expand(2, 64))
        want, _, _ = reference_content_sink_attention(q.double(), k.double(), v.double(), hidden=hidden,
                                                      **_reference_kwargs(kw, 1))
        # fp32 against fp64 at scores up to ~140: about 1e-7 x |score| (docs/formulas.md)
        assert (got.double() - want).abs().max() < 2e-7 * max(sink_score, 10.0)
        if hidden_col is None:  # an empty hidden set is the positional formula
            positional = sink_attention(q, k, v, backend="torch", causal=True, sink_cols=kw["sink_cols"],
                                        beta=kw["beta"]).out
            assert torch.equal(positional[0, :, 0], got[0, :, 0])


# -- the identity is still the stock model -------------------------------------------------------------
@torch.no_grad()
def test_identity_policy_on_a_tiny_model_is_the_stock_model():
    model = tiny_model("llama")
    ids = torch.randint(2, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    stock = model(ids, attention_mask=mask).logits
    with sinkfix.patch(model, sinkfix.Policy()):
        patched = model(ids, attention_mask=mask).logits
    real = mask.bool()
    # measured 0.0 (the identity is one call of the op the stock model's SDPA uses); 1e-6 in case
    # another build orders a sum differently
    assert (patched - stock)[real].abs().max() <= 1e-6
