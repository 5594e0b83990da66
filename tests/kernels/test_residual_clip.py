"""Fused residual clip vs reference_residual_clip: caps, the sink rule, in place, awkward widths."""

from __future__ import annotations

import pytest
import torch

from ..conftest import require_triton_kernels

require_triton_kernels()

import sinkfix.kernels as kernels  # noqa: E402
from sinkfix.kernels.residual_clip import clip_config, residual_clip_triton  # noqa: E402
from sinkfix.ops.reference import reference_residual_clip  # noqa: E402

# Tolerance rule (docs/testing.md): per token, max |kernel - fp64| <= 2 x max |same-dtype torch - fp64|
# + a floor of about one rounding of that token's largest entry (fp32 2^-23 -> 1e-6, fp16 2^-11 ->
# 1e-3, bf16 2^-8 -> 4e-3, relative to the token's own max |out|). The floor matters for bf16 under
# the interpreter: triton 3.9's interpreter truncates fp32 -> bf16 casts (create_fp_trunc ignores
# the rounding mode) where the GPU rounds to nearest even, so one element can be off by a whole
# bf16 ulp (measured: 0.0075 relative vs 0.0038 for round-to-nearest). The floor is per token, not
# relative to the largest output of the batch: that is the exempt sink's massive activation (x60),
# which made the floor 2.24 in bf16 (0.56 in fp16) on O(1) entries, and an output clipped to a cap
# 30% too low passed in bf16 (10% in fp16).
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}
# A clipped token ends at its cap: | ||out|| / cap - 1 | <= CAP_ULPS x eps(dtype). Measured (kernel
# under the interpreter, test_against_reference): 1.1e-7 in fp32 (0.9 eps), 3.4e-3 in bf16 (0.43
# eps: truncation moves every entry the same way), 3.5e-5 in fp16 (0.04 eps).
CAP_ULPS = 4


def _hidden(batch, seq, width, dtype, device, *, sink_pos=((0, 0),), seed=0):
    """Token norms spread over ~0.3x..3x of sqrt(width), with massive activations (x 60) at the
    sink positions, as real residual streams have at the first token."""
    torch.manual_seed(seed)
    h = torch.randn(batch, seq, width) * (0.3 + 2.7 * torch.rand(batch, seq, 1))
    sinks = torch.zeros(batch, seq, dtype=torch.bool)
    for b, s in sink_pos:
        h[b, s] *= 60
        sinks[b, s] = True
    return h.to(device=device, dtype=dtype), sinks.to(device)


def _torch_clip(hidden, threshold, sinks, sink_norm):
    """The same-dtype PyTorch path (as sinkfix.ops.residual runs it): fp32 norms, factor cast to
    the input dtype, one product in the input dtype."""
    norms = hidden.float().norm(dim=-1)
    cap = threshold.float().to(hidden.device)[:, None].expand_as(norms)
    if sinks is not None:
        cap = torch.where(sinks, torch.full_like(cap, float("inf") if sink_norm is None else sink_norm), cap)
    factor = torch.where(norms > cap, cap / norms, torch.ones_like(norms))
    return hidden * factor[..., None].to(hidden.dtype)


def _check(out, hidden_before, threshold, sinks, sink_norm, record=None):
    threshold = threshold.to(out.device)
    ref = reference_residual_clip(hidden_before, threshold, sinks, sink_norm).to(out.device)
    assert torch.isfinite(out).all()
    err_row = (out.double() - ref).abs().amax(-1)  # (B, S)
    # per token, as the floor is: the batch's largest PyTorch error (a clamped x60 sink's rounding)
    # widened every ordinary token's tolerance
    err_torch = (_torch_clip(hidden_before, threshold, sinks, sink_norm).double() - ref).abs().amax(-1)  # (B, S)
    tol_row = 2 * err_torch + FLOOR[out.dtype] * ref.abs().amax(-1)
    if record is not None:
        record.append((out.dtype, err_row.max().item(), err_torch.max().item(), ref.abs().max().item()))
    worst = (err_row - tol_row).argmax()
    assert (err_row <= tol_row).all(), \
        (f"error {err_row.flatten()[worst]:.3g} > 2 x torch {err_torch.flatten()[worst]:.3g} + floor, "
         f"{tol_row.flatten()[worst]:.3g} in all")
    # the clipped tokens end at their cap (the reference's cap per token, sinks' included)
    norms = hidden_before.double().norm(dim=-1).to(out.device)
    cap = threshold.double()[:, None].expand_as(norms)
    if sinks is not None:
        sink_cap = torch.full_like(cap, float("inf") if sink_norm is None else float(sink_norm))
        cap = torch.where(sinks.to(out.device), sink_cap, cap)
    clipped = norms > cap
    if clipped.any():
        gap = (out.double().norm(dim=-1) - cap)[clipped].abs() / cap[clipped]
        gap = torch.where(cap[clipped] > 0, gap, out.double().norm(dim=-1)[clipped])  # cap 0: the norm itself
        bound = CAP_ULPS * torch.finfo(out.dtype).eps
        assert gap.max().item() <= bound, f"clipped token's norm {gap.max().item():.3g} off its cap (> {bound:.3g})"


@pytest.mark.parametrize("width", [576, 640, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("sink_norm", [None, 80.0], ids=["sink-exempt", "sink-clamped"])
def test_against_reference(kt, width, dtype, sink_norm):
    h, sinks = _hidden(2, 37, width, dtype, kt.device, sink_pos=((0, 0), (1, 4)))
    threshold = torch.tensor([1.2 * width ** 0.5, float("inf")], device=kt.device)  # seq 1: no cap
    out = torch.full_like(h, float("nan"))  # poisoned: every element must be written
    residual_clip_triton(h, threshold, sinks, sink_norm, out=out)
    _check(out, h, threshold, sinks, sink_norm, kt.clip_errors)
    clipped = (out != h).any(-1)
    assert clipped[0].sum() > 5 and not clipped[1, ~sinks[1]].any()
    norms = out.float().norm(dim=-1)
    if sink_norm is None:
        assert torch.equal(out[sinks], h[sinks])  # exempt sinks untouched, bit for bit
    else:
        assert torch.allclose(norms[sinks], torch.full_like(norms[sinks], sink_norm), rtol=FLOOR[dtype] * 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_the_check_fails_a_cap_10_percent_too_low(dtype):
    """No kernel: _check itself, on test_against_reference's inputs (an exempt x60 sink). Its floor was
    relative to the sink's massive activation, and a cap 10% too low passed in bf16 and fp16."""
    h, sinks = _hidden(2, 37, 576, dtype, "cpu", sink_pos=((0, 0), (1, 4)))
    threshold = torch.tensor([1.2 * 576 ** 0.5, float("inf")])
    _check(reference_residual_clip(h, threshold, sinks, None).to(dtype), h, threshold, sinks, None)
    wrong = reference_residual_clip(h, threshold * 0.9, sinks, None).to(dtype)
    with pytest.raises(AssertionError):
        _check(wrong, h, threshold, sinks, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_in_place(kt, dtype):
    h, sinks = _hidden(3, 21, 640, dtype, kt.device, sink_pos=((0, 0), (2, 0)))
    before = h.clone()
    threshold = torch.tensor([20.0, 25.0, 30.0], device=kt.device)
    res = kernels.residual_clip_triton(h, threshold, sinks, 100.0, inplace=True)
    assert res is h
    _check(h, before, threshold, sinks, 100.0, kt.clip_errors)
    untouched = ~(h != before).any(-1)
    assert untouched.any() and torch.equal(h[untouched], before[untouched])


def test_absolute_float_threshold_and_no_sinks(kt):
    h, _ = _hidden(2, 9, 1000, torch.float16, kt.device)
    out = kernels.residual_clip_triton(h, 30.0)
    _check(out, h, torch.full((2,), 30.0), None, None)
    assert out.float().norm(dim=-1).max() <= 30.0 * (1 + 1e-3)


def test_strided_input_and_sink_norm_above_norm(kt):
    # a transposed view (stride_xd != 1 after permute); a sink_norm above the sink's norm never
    # scales it up
    base, sinks = _hidden(2, 576, 13, torch.float32, kt.device)
    h = base.transpose(1, 2)  # (2, 13, 576) view
    sinks = torch.zeros(2, 13, dtype=torch.bool, device=kt.device)
    sinks[:, 0] = True
    threshold = torch.tensor([15.0, 18.0], device=kt.device)
    out = kernels.residual_clip_triton(h, threshold, sinks, sink_norm=1e6)
    _check(out, h, threshold, sinks, 1e6)
    assert torch.equal(out[:, 0], h[:, 0])


def test_zero_norm_token_and_zero_threshold(kt):
    h, _ = _hidden(1, 5, 576, torch.float32, kt.device)
    h[0, 2] = 0.0  # a zero row must not divide by zero
    out = kernels.residual_clip_triton(h, torch.tensor([0.0], device=kt.device))
    _check(out, h, torch.tensor([0.0]), None, None)
    assert (out == 0).all()


def test_config_and_validation(kt):
    for width in (576, 640, 1000, 4096, 8192, 65536):
        block_r, block_d, num_warps = clip_config(width)
        assert block_d >= width and block_r * block_d <= max(8192, block_d) and 4 <= num_warps <= 16
    h = torch.randn(2, 3, 64, device=kt.device)
    with pytest.raises(ValueError, match="threshold"):
        residual_clip_triton(h, torch.ones(3, device=kt.device))
    with pytest.raises(ValueError, match="is_sink"):
        residual_clip_triton(h, 1.0, torch.zeros(2, 4, dtype=torch.bool, device=kt.device))
    with pytest.raises(ValueError, match="sink_norm"):
        residual_clip_triton(h, 1.0, torch.zeros(2, 3, dtype=torch.bool, device=kt.device), 0.0)
    with pytest.raises(ValueError, match=r"\(B, S, D\)"):
        residual_clip_triton(h[0], 1.0)
    with pytest.raises(ValueError, match="give is_sink with it"):  # before: accepted, and it clamped nothing
        residual_clip_triton(h, 1.0, None, 5.0)
