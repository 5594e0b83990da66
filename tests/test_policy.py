"""Policy construction, validation and resolution: bad parameters fail where they are written."""

from __future__ import annotations

import math

import pytest
import torch

from sinkfix import Policy, PolicyError, ResidualClip


def test_default_is_identity():
    assert Policy().is_identity
    assert Policy(sink_scale=1.0).is_identity
    assert not Policy(sink_scale=0.9).is_identity
    assert not Policy(virtual_sink_logit=0.0).is_identity
    assert not Policy(residual_clip=ResidualClip(8.0)).is_identity


@pytest.mark.parametrize("beta", [1.5, -0.1, float("nan"), float("inf")])
def test_bad_scalar_beta_is_refused(beta):
    with pytest.raises(PolicyError, match="sink_scale"):
        Policy(sink_scale=beta)


def test_bad_virtual_logit_is_refused():
    with pytest.raises(PolicyError, match="NaN or inf"):
        Policy(virtual_sink_logit=float("nan"))
    with pytest.raises(PolicyError, match="virtual_sink_logit"):
        Policy(virtual_sink_logit=torch.tensor([[0.0, float("inf")]]))


def test_per_head_tensor_shape_is_checked_against_the_model():
    pol = Policy(sink_scale=torch.full((3, 4), 0.5))
    with pytest.raises(PolicyError, match=r"expected a scalar or \[num_layers, num_heads\] = \[2, 4\]"):
        pol.resolve(2, [4, 4])
    layers = pol.resolve(3, [4, 4, 4])
    assert len(layers) == 3 and torch.equal(layers[1].beta, torch.full((4,), 0.5, dtype=torch.float64))


def test_per_head_values_and_layer_selection():
    beta = torch.arange(8, dtype=torch.float64).reshape(2, 4) / 10
    layers = Policy(sink_scale=beta, virtual_sink_logit=1.0, layers=(1,)).resolve(2, [4, 4])
    assert layers[0].attention_is_identity  # layer 0 switched off
    assert torch.equal(layers[1].beta, beta[1])
    assert torch.equal(layers[1].virtual_sink_logit, torch.ones(4, dtype=torch.float64))
    with pytest.raises(PolicyError, match="out of range"):
        Policy(layers=(5,)).resolve(2, [4, 4])


def test_sink_positions_merge_n_sink_and_extra_positions():
    (layer,) = Policy(n_sink=2, extra_sink_positions=(5, 3)).resolve(1, [2])
    assert layer.sink_positions == (0, 1, 3, 5)
    with pytest.raises(PolicyError, match="already in the sink set"):  # listed twice, once by n_sink
        Policy(n_sink=2, extra_sink_positions=(5, 1))
    with pytest.raises(PolicyError):
        Policy(n_sink=-1)
    with pytest.raises(PolicyError):
        Policy(extra_sink_positions=(-2,))


def test_residual_clip_resolution():
    layers = Policy(residual_clip=ResidualClip([8.0, math.inf], sink_norm=None)).resolve(2, [4, 4])
    assert layers[0].clip.threshold == 8.0 and layers[1].clip is None
    with pytest.raises(PolicyError, match="below 1"):
        Policy(residual_clip=ResidualClip(0.5)).resolve(2, [4, 4])
    with pytest.raises(PolicyError, match="1 or num_layers"):
        Policy(residual_clip=ResidualClip([2.0, 3.0, 4.0])).resolve(2, [4, 4])
    with pytest.raises(PolicyError, match="> 0"):
        Policy(residual_clip=ResidualClip(float("nan"), mode="absolute")).resolve(2, [4, 4])
    with pytest.raises(PolicyError, match="mode"):
        Policy(residual_clip=ResidualClip(2.0, mode="bogus"))


def test_parse_spec():
    assert Policy.parse("identity").is_identity
    assert Policy.parse("drop").sink_scale == 0.0
    pol = Policy.parse("sink_scale=0.9,n_sink=2,layers=0:5,clip=8")
    assert pol.sink_scale == 0.9 and pol.n_sink == 2 and pol.layers == (0, 5)
    assert pol.residual_clip == ResidualClip(8.0, mode="relative")
    with pytest.raises(PolicyError, match="unknown policy key"):
        Policy.parse("beta=0.9")
    with pytest.raises(PolicyError, match="bad value"):
        Policy.parse("sink_scale=abc")
    with pytest.raises(PolicyError, match="sink_scale"):
        Policy.parse("sink_scale=2")
    pol = Policy.parse("virtual_sink_logit=1.5,virtual_logit_on_sink_rows=1")
    assert pol.virtual_logit_on_sink_rows is True
    assert pol.describe() == "sink_scale=1,virtual_sink_logit=1.5,virtual_logit_on_sink_rows=1"
    assert Policy.parse("virtual_sink_logit=1.5").virtual_logit_on_sink_rows is False
    with pytest.raises(PolicyError, match="bad value"):
        Policy.parse("virtual_logit_on_sink_rows=yes")
    with pytest.raises(PolicyError, match="bool"):
        Policy(virtual_logit_on_sink_rows=1)


def test_layer_tensors_are_cached_per_device_unless_trainable():
    (layer,) = Policy(sink_scale=0.5).resolve(1, [3])
    a, _ = layer.tensors(torch.device("cpu"))
    b, _ = layer.tensors(torch.device("cpu"))
    assert a is b and a.dtype == torch.float32
    layer.beta = torch.full((3,), 0.5, requires_grad=True)
    c, _ = layer.tensors(torch.device("cpu"))
    assert c.requires_grad and c is not a
