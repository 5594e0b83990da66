"""A patched model running through the Triton kernels matches the PyTorch path.

On a machine without a GPU the kernels run under the interpreter (conftest sets TRITON_INTERPRET).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import sinkfix  # noqa: E402
from sinkfix import Policy, ResidualClip  # noqa: E402

from ..conftest import tiny_model  # noqa: E402
from .conftest import DEVICE  # noqa: E402

POLICY = Policy(sink_scale=0.6, virtual_sink_logit=0.5, residual_clip=ResidualClip(4.0))


def _compare(model, ids, attention_mask=None, atol=2e-4):
    with torch.no_grad():
        with sinkfix.patch(model, POLICY, backend="torch"):
            expect = model(ids, attention_mask=attention_mask).logits
        with sinkfix.patch(model, POLICY, backend="triton") as handle:
            assert handle.backend == "triton"
            got = model(ids, attention_mask=attention_mask).logits
    real = slice(None) if attention_mask is None else attention_mask.bool()
    # fp32 kernels vs fp32 PyTorch path: both ~1e-6 from fp64 per layer; 2e-4 on logits of size ~10
    torch.testing.assert_close(got[real], expect[real], atol=atol, rtol=0)
    assert (expect - model(ids, attention_mask=attention_mask).logits)[real].abs().max() > 1e-3  # policy acts


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gptoss"])
def test_tiny_models_through_kernels_match_torch_path(arch):
    model = tiny_model(arch).to(DEVICE)
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    _compare(model, ids, mask)


@pytest.mark.slow
def test_smollm2_through_kernels_matches_torch_path():
    try:
        model, tok = sinkfix.load_model("smollm2-135m")
    except sinkfix.ModelLoadError as exc:
        pytest.skip(str(exc))
    ids = tok("The attention sink of a language model is usually its first token.", return_tensors="pt").input_ids
    _compare(model.to(DEVICE), ids.to(DEVICE), atol=1e-3)
