"""Public names: one name per idea, old names still working with a deprecation warning; value
equality of policies; the CLI's split between expected errors (exit 2) and bugs (traceback)."""

from __future__ import annotations

import pytest
import torch

import sinkfix
import sinkfix.kernels as kernels
from sinkfix import Policy, ResidualClip
from sinkfix.cli import main
from sinkfix.ops import residual


def test_old_kernel_names_warn_and_resolve_to_the_new_ones():
    with pytest.warns(FutureWarning, match="sink_attention_triton"):
        assert kernels.sink_attention is kernels.sink_attention_triton
    with pytest.warns(FutureWarning, match="residual_clip_triton"):
        assert kernels.clip_residual is kernels.residual_clip_triton
    with pytest.raises(AttributeError):
        kernels.no_such_kernel  # noqa: B018


def test_old_residual_clip_name_warns_and_computes_the_same():
    hidden = torch.randn(2, 5, 8) * torch.tensor([1, 1, 50, 1, 1.0])[None, :, None]
    is_sink = torch.zeros(2, 5, dtype=torch.bool)
    is_sink[:, 0] = True
    threshold = torch.tensor([3.0, 4.0])
    with pytest.warns(FutureWarning, match="residual_clip"):
        old = residual.clip_residual(hidden, threshold, sink_positions=is_sink)
    assert torch.equal(old, residual.residual_clip(hidden, threshold, is_sink))


def test_old_calibrate_keyword_warns(monkeypatch):
    from sinkfix.analysis import calibration

    with pytest.warns(FutureWarning, match="virtual_logit_on_sink_rows"):
        with pytest.raises(calibration.CalibrationError, match="init_beta"):  # stops before any work
            calibration.calibrate(None, None, "text", init_beta=2.0, virtual_on_sink_rows=True)
    with pytest.raises(TypeError, match="no_such_option"):
        calibration.calibrate(None, None, "text", no_such_option=1)


def test_policies_with_per_head_tensors_compare_and_hash_by_value():
    a = Policy(sink_scale=torch.full((2, 3), 0.5), virtual_sink_logit=torch.zeros(2, 3))
    b = Policy(sink_scale=torch.full((2, 3), 0.5), virtual_sink_logit=torch.zeros(2, 3))
    c = Policy(sink_scale=torch.full((2, 3), 0.25), virtual_sink_logit=torch.zeros(2, 3))
    assert a == b and hash(a) == hash(b)
    assert a != c and a != Policy(sink_scale=0.5)
    assert len({a, b, c}) == 2
    clip = ResidualClip(torch.tensor([2.0, float("inf")]))
    assert Policy(residual_clip=clip) == Policy(residual_clip=ResidualClip(torch.tensor([2.0, float("inf")])))
    assert Policy(residual_clip=clip) != Policy(residual_clip=ResidualClip(torch.tensor([3.0, float("inf")])))
    assert Policy() != "identity"


def test_cli_expected_errors_exit_2_and_bugs_surface(monkeypatch, capsys):
    assert main(["bb", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err

    from sinkfix.commands import bb

    def buggy(args):
        raise ValueError("a shape error inside a kernel launcher")

    monkeypatch.setattr(bb, "run", buggy)
    with pytest.raises(ValueError, match="shape error"):
        main(["bb"])


def test_backend_errors_are_typed():
    with pytest.raises(sinkfix.errors.UsageError, match="backend must be one of"):
        sinkfix.ops.attention.resolve_backend("cuda", torch.device("cpu"))
