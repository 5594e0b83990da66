"""Review 50: switching a patched model's attention implementation turned the correction off unsaid."""

from __future__ import annotations

import copy

import pytest
import torch

import sinkfix
from sinkfix.errors import UsageError

from .conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("switch_to", ["eager", "sdpa"])
def test_a_forward_after_switching_the_attention_implementation_is_refused(arch, switch_to):
    # it ran stock attention (0.22 off the patched logits on tiny llama) while PatchHandle.of(model)
    # and a monitor's records still said corrected
    stock = tiny_model(arch, seed=1)
    model = copy.deepcopy(stock)
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        handle = sinkfix.patch(model, sinkfix.Policy(sink_scale=0.3))
        patched = model(input_ids=ids).logits
        model.set_attn_implementation(switch_to)
        with pytest.raises(UsageError, match=f"switched to '{switch_to}' after sinkfix.patch"):
            model(input_ids=ids)
        with sinkfix.monitor(model) as monitor, pytest.raises(UsageError, match="switched"):
            model(input_ids=ids)
        assert monitor.records == []
        model.set_attn_implementation("sinkfix")  # switched back: the patch runs again
        torch.testing.assert_close(model(input_ids=ids).logits, patched, rtol=0, atol=0)
        handle.remove()
        model.set_attn_implementation(switch_to)  # unpatched: any implementation, no refusal
        torch.testing.assert_close(model(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
