"""A patched model streaming through a SinkCache: the Triton decode kernels agree with the PyTorch path.

On a machine without a GPU the kernels run under the interpreter (conftest sets TRITON_INTERPRET).
"""

from __future__ import annotations

import pytest
import torch

from ..conftest import require_triton_kernels

require_triton_kernels()

import sinkfix  # noqa: E402
from sinkfix import Policy  # noqa: E402
from sinkfix.caches import SinkCache  # noqa: E402

from ..conftest import tiny_model  # noqa: E402
from .conftest import DEVICE  # noqa: E402

POLICY = Policy(sink_scale=0.6, virtual_sink_logit=0.5)


@torch.no_grad()
def _stream(model, ids, backend):
    cache = SinkCache(model.config, n_sink=2, window=5)
    with sinkfix.patch(model, POLICY, backend=backend) as handle:
        assert handle.backend == backend
        logits = [model(ids[:, :4], cache=cache, use_cache=True).logits]  # a prefill, then one token a step
        logits += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(4, ids.shape[1])]
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_streaming_decode_through_kernels_matches_torch_path(arch):
    model = tiny_model(arch).to(DEVICE)
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    expect, _ = _stream(model, ids, "torch")
    got, cache = _stream(model, ids, "triton")
    full = next(layer for layer in cache.layers if layer.keep_sinks)  # Gemma3's sliding layers are SinkLayers too
    assert full.evicted and full.kept_length == 7  # the last steps ran on re-rotated sinks + window
    # fp32 kernels vs fp32 PyTorch path: both ~1e-6 from fp64 per layer; 2e-4 on logits of size ~10
    torch.testing.assert_close(got, expect, atol=2e-4, rtol=0)
