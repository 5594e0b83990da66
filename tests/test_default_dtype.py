"""Patched and monitored models under ``torch.set_default_dtype(torch.float64)``: tensors sinkfix makes
itself (constants, masks, fills, ``torch.where`` of two Python numbers) take the default dtype unless
told otherwise, and the CPU's fused attention op refuses mixed float32 / float64 inputs."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix import Policy, ResidualClip

from .conftest import tiny_config

IDS = torch.tensor([[5, 9, 2, 7, 3, 11, 4, 8, 6, 10], [1, 1, 1, 7, 3, 11, 4, 8, 6, 10]])
MASK = torch.tensor([[1] * 10, [0, 0, 0] + [1] * 7])  # the second row left-padded

POLICIES = {
    "per-head": Policy(sink_scale=0.5, virtual_sink_logit=-2.0),
    "content sinks (ACT)": Policy.act(),
    "relative clip": Policy(residual_clip=ResidualClip(1.05)),
    "absolute clip": Policy(residual_clip=ResidualClip(5.0, mode="absolute")),
}


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _run(model, policy) -> tuple[torch.Tensor, torch.Tensor]:
    with sinkfix.patch(model, policy), torch.no_grad():
        logits = model(IDS, attention_mask=MASK).logits
        tokens = model.generate(IDS, attention_mask=MASK, max_new_tokens=3, do_sample=False)
    return logits, tokens


@pytest.mark.parametrize("name", list(POLICIES))
def test_a_float32_model_gives_the_same_output_under_a_float64_default(name, float64_default):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32).eval()
    got = _run(model, POLICIES[name])
    torch.set_default_dtype(torch.float32)
    want = _run(model, POLICIES[name])
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
def test_a_monitor_runs_under_a_float64_default(model_dtype, float64_default):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=model_dtype).eval()
    with sinkfix.patch(model, POLICIES["per-head"]), sinkfix.monitor(model) as monitor:
        with monitor.request(), torch.no_grad():
            model.generate(IDS, attention_mask=MASK, max_new_tokens=3, do_sample=False)
    assert len(monitor.records) == 2
    for record in monitor.records:
        assert all(0 <= share <= 1 for layer in record["sink_share"] for share in layer)
        assert all(peak > 0 for peak in record["residual_peak"])
