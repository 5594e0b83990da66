"""sinkfix.monitor on SmolLM2-135M: the live record against inspect's statistics on the same real
text, and the guard against a prompt far outside its calibration ranges."""

from __future__ import annotations

import pytest
import torch

import sinkfix
from sinkfix.analysis.inspection import text_windows
from sinkfix.analysis.metrics import measure_extreme_tokens
from sinkfix.profile import ModelIdentity, Profile
from sinkfix.telemetry import calibration_statistics
from sinkfix.texts import domain_text

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def _tensor(nested) -> torch.Tensor:
    return torch.tensor([[float("nan") if x is None else x for x in row] for row in nested], dtype=torch.float64)


def _per_head_policy(layers: int, heads: int) -> sinkfix.Policy:
    g = torch.Generator().manual_seed(0)
    return sinkfix.Policy(sink_scale=0.8 + 0.2 * torch.rand(layers, heads, generator=g))


def test_record_matches_inspect_on_real_text(smollm2, one_thread):
    """The exact parts of a record (sink share, value drain, residual peak) are inspect's numbers to
    1e-4 on a 256-token window of the held-out prose, with a per-head correction applied."""
    model, tokenizer = smollm2
    (window,) = text_windows(tokenizer, domain_text("pydoc", "eval"), seq_len=256)[:1]
    with sinkfix.patch(model) as handle:
        policy = _per_head_policy(handle.num_layers, max(handle.num_heads()))
    with sinkfix.patch(model, policy):
        reference = measure_extreme_tokens(model, [window])
        with sinkfix.monitor(model) as monitor, torch.no_grad(), monitor.request(domain="prose"):
            model(input_ids=window[None], use_cache=False)
    (record,) = monitor.records
    torch.testing.assert_close(_tensor(record["sink_share"]), reference.sink_share, atol=1e-4, rtol=0)
    torch.testing.assert_close(_tensor(record["value_drain"]), reference.value_drain, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(record["residual_peak"], dtype=torch.float64), reference.residual_peak,
                               atol=0, rtol=1e-4)
    assert max(max(layer) for layer in record["sink_share"]) > 0.5  # SmolLM2 has strong sinks to measure


def test_guard_serves_random_tokens_with_the_identity(smollm2, one_thread):
    """Calibrated on two windows of prose; a prompt of uniformly random token ids (no language at
    all) leaves the sink-share ranges by more than the default margin, and the guard serves that
    request uncorrected; a window of the same prose does not trip it."""
    model, tokenizer = smollm2
    windows = text_windows(tokenizer, domain_text("pydoc", "calib"), seq_len=256)[:2]
    with sinkfix.patch(model) as handle:
        policy = _per_head_policy(handle.num_layers, max(handle.num_heads()))
    with sinkfix.patch(model, policy):
        stats = calibration_statistics(model, windows)
    profile = Profile(ModelIdentity.of(model), policy.sink_scale.clone(), None, statistics=stats)
    random_ids = torch.randint(0, tokenizer.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    with sinkfix.patch(model, profile), sinkfix.monitor(model, guard=profile) as monitor, torch.no_grad():
        monitor.forward(input_ids=windows[0][None], use_cache=False)
        inside = monitor.records[0]["guard"]
        monitor.forward(input_ids=random_ids, use_cache=False)
        outside = monitor.records[0]
    assert inside["checked"] and not inside["tripped"]
    guard = outside["guard"]
    assert guard["tripped"] and guard["action"] == "rerun as identity" and guard["worst"]["excess"] > 0
    assert outside["correction"]["identity_layers"] == guard["layers"]
    served = _tensor(outside["sink_share"])  # the switched-off layers were served with beta = 1
    unscaled = _tensor(outside["sink_share_unscaled"])
    torch.testing.assert_close(served[guard["layers"]], unscaled[guard["layers"]], atol=0, rtol=0)


def test_prompt_measures_benchmark_compares_equal_methods(tmp_path):
    """``bench_prompt_measures.py`` times the three ways of computing the prompt measures inside real
    monitored prefills, and checks that they give the same numbers (exit 1 otherwise)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prompt_measures.py"
    out = tmp_path / "measures.json"
    done = subprocess.run([sys.executable, str(script), "--rounds", "2", "--prompt", "160", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert list(saved["methods"]) == ["layer, one part", "layer, parts", "together"]
    assert saved["largest_difference"] <= 1e-4
    assert all(len(row["samples_ms"]) == 2 and row["median_ms"] > 0 for row in saved["methods"].values())
    assert "largest difference between the methods' measures" in done.stdout
