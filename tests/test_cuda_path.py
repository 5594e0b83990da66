"""The PyTorch path on CUDA: the fused attention with log-sum-exp (efficient-attention op) instead
of the dense score matrix. Runs only where CUDA is (benchmarks/gpu_check.sh runs it on a lent GPU)."""

from __future__ import annotations

import pytest
import torch

from sinkfix.ops.flash import fused_lse_available
from sinkfix.ops.attention import sink_attention_torch
from sinkfix.ops.reference import reference_sink_attention, visibility_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["causal", "padded", "decode"])
def test_cuda_split_path_uses_the_fused_op_and_matches_the_reference(dtype, layout):
    torch.manual_seed(0)
    batch, q_heads, kv_heads, dim = 2, 8, 2, 64
    q_len, k_len = (1, 300) if layout == "decode" else (1023, 1023)
    q = torch.randn(batch, q_heads, q_len, dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, k_len, dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, k_len, dim, device="cuda", dtype=dtype)
    kw: dict = dict(causal=layout != "decode")
    cols = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    if layout == "padded":
        mask = visibility_mask(batch, q_len, k_len, causal=True, device="cuda").clone()
        mask[1, ..., :5] = False
        kw = dict(attn_mask=mask)
        cols[1] = 5
    beta = torch.rand(q_heads, device="cuda")
    assert fused_lse_available(q.device, dtype)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got = sink_attention_torch(q, k, v, sink_cols=cols, beta=beta, **kw)
    peak = torch.cuda.max_memory_allocated() - base
    ref, _, _ = reference_sink_attention(q, k, v, sink_cols=cols, beta=beta, **kw)
    same_dtype, _, _ = reference_sink_attention(q, k, v, sink_cols=cols, beta=beta, **kw, compute_dtype=torch.float32)
    torch_error = (same_dtype.to(dtype).double() - ref).abs().max().item()
    floor = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert (got.out.double() - ref).abs().max().item() <= 2 * torch_error + floor
    # no (B, H, Q, K) fp32 score matrix (64 MB here): the fused op keeps the peak far below it
    assert layout == "decode" or peak < batch * q_heads * q_len * k_len * 4
