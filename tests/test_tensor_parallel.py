"""Tensor parallelism: per-head parameters follow the heads when transformers shards them.

torchrun starts 3 CPU processes (gloo); SmolLM2-135M (9 query / 3 kv heads) is sharded with
``DistributedConfig(tp_size=3)``, so each rank's attention sees 3 query heads. The patched logits
must equal the single-process patched logits for a scalar policy and for a per-head profile made
in the single process, and a policy whose head count does not fit gets an error naming both. A
monitor on every rank gathers the ranks' heads into whole-model records equal to the single
process's, and only rank 0 writes the log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sinkfix
from sinkfix.profile import ModelIdentity, Profile

WORKER = Path(__file__).parent / "helpers" / "tp_worker.py"


@pytest.mark.slow
def test_tensor_parallel_logits_match_single_process(smollm2, tmp_path):
    model, _ = smollm2
    torch_run = Path(sys.executable).with_name("torchrun")
    if not torch_run.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed next to this Python")
    g = torch.Generator().manual_seed(0)
    beta = 0.5 + 0.5 * torch.rand(30, 9, generator=g, dtype=torch.float64)
    logit = torch.randn(30, 9, generator=g, dtype=torch.float64)
    profile = Profile(ModelIdentity.of(model), beta, logit)
    profile.save(tmp_path / "profile.json")

    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT="29631")
    done = subprocess.run(
        [str(torch_run if torch_run.exists() else "torchrun"), "--nproc-per-node", "3", "--master-port", "29631",
         str(WORKER), str(tmp_path / "profile.json"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    ids = torch.arange(100, 164)[None]
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    # Sharding alone changes the summation order of the row-parallel projections (partial sums
    # all-reduced across ranks): the stock model's own sharded logits differ from its
    # single-process ones by a rounding error of that size, which no patch can remove.
    stock_gap = (torch.load(tmp_path / "logits-stock.pt") - stock).abs().max().item()
    gaps = {"stock": stock_gap}
    for name, policy in (("scalar", sinkfix.Policy(sink_scale=0.9)), ("profile", profile)):
        with torch.no_grad(), sinkfix.patch(model, policy):
            single = model(input_ids=ids).logits
        gaps[name] = (torch.load(tmp_path / f"logits-{name}.pt") - single).abs().max().item()
    print("max |sharded - single-process| logits:", gaps)
    for name in ("scalar", "profile"):
        assert gaps[name] <= max(1e-4, 2 * stock_gap), gaps
    assert (torch.load(tmp_path / "logits-profile.pt") - stock).abs().max().item() > 1e-2  # the profile acts

    for rank in range(3):
        message = (tmp_path / f"errors-{rank}.txt").read_text()
        assert "(30, 6)" in message and "[30, 9]" in message and f"rank {rank}" in message, message

    _check_monitored_shards(model, profile, tmp_path)


def _check_monitored_shards(model, profile, out):
    """Every rank's monitor gathered the other ranks' heads: its records equal the single-process
    records of the same requests (to the sharding's rounding), rank 0 alone wrote the log, and a
    guard was refused on every rank with the reason."""
    import json

    from .helpers.tp_worker import monitored_requests

    with sinkfix.patch(model, profile):
        single = monitored_requests(model)
    per_rank = [json.loads((out / f"records-{rank}.json").read_text()) for rank in range(3)]
    logged = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    assert [r["domain"] for r in logged] == ["prose", "code"]  # one writer: rank 0, each request once

    def numbers(nested):  # the log writes NaN as null
        return [numbers(x) for x in nested] if isinstance(nested, list) else float("nan") if nested is None else nested

    def close(got, want, atol):
        got = torch.tensor(numbers(got), dtype=torch.float64)
        want = torch.tensor(numbers(want), dtype=torch.float64)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, equal_nan=True)

    for records in [*per_rank, logged]:
        for got, want in zip(records, single, strict=True):
            assert len(got["sink_share"][0]) == 9 and len(got["value_drain"][0]) == 3  # the whole model's heads
            for key in ("tokens", "prompt_tokens", "decoded_tokens", "rows", "dormant_heads", "hidden_sinks"):
                assert got[key] == want[key], key
            for key, atol in (("sink_share", 1e-5), ("sink_share_unscaled", 1e-5), ("dormancy", 1e-4),
                              ("value_drain", 1e-4), ("residual_peak", 1e-2)):
                close(got[key], want[key], atol)
            close(got["correction"]["moved_share"], want["correction"]["moved_share"], 1e-5)
    for rank in range(3):
        assert "tensor parallelism" in (out / f"guard-{rank}.txt").read_text()


@pytest.mark.slow
def test_a_plan_that_leaves_the_attention_whole_keeps_the_whole_policy(tmp_path):
    """Phi3 (its fused qkv gathered on every rank) and GPT-OSS (only the embedding sharded) under
    tp_size=2: every rank computes all 4 heads. The policy is the model's own [2, 4] (a [2, 8] one
    is refused), the logits are the single process's, the records have 4 heads per layer and rank
    0 alone writes them (the head count was doubled, a [2, 4] policy refused, an [2, 8] one accepted)."""
    from .conftest import tiny_model
    from .helpers.tp_replicated_worker import IDS, per_head

    torch_run = Path(sys.executable).with_name("torchrun")
    if not torch_run.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed next to this Python")
    archs = ("phi3", "gptoss")
    singles = {}
    for arch in archs:
        model = tiny_model(arch)
        model.save_pretrained(tmp_path / arch)
        with torch.no_grad(), sinkfix.patch(model, per_head(4)):
            singles[arch] = model(input_ids=IDS).logits
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT="29637")
    done = subprocess.run(
        [str(torch_run if torch_run.exists() else "torchrun"), "--nproc-per-node", "2", "--master-port", "29637",
         str(Path(__file__).parent / "helpers" / "tp_replicated_worker.py"), str(tmp_path), str(tmp_path), *archs],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    for arch in archs:
        gap = (torch.load(tmp_path / f"{arch}-logits.pt") - singles[arch]).abs().max().item()
        assert gap <= 1e-5, (arch, gap)
        for rank in range(2):
            seen = json.loads((tmp_path / f"{arch}-heads-{rank}.json").read_text())
            assert seen["num_heads"] == seen["model_num_heads"] == [4, 4] and seen["record_heads"] == [4, 4]
            assert seen["tensor_parallel"] is None and seen["replicated"] == [rank, 2]
            assert "(2, 8)" in seen["sharded_count"], seen
        (line,) = (tmp_path / f"{arch}-telemetry.jsonl").read_text().splitlines()  # rank 0 alone wrote it
        assert len(json.loads(line)["sink_share"][0]) == 4
