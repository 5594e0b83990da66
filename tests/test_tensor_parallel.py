"""Tensor parallelism: per-head parameters follow the heads when transformers shards them.

torchrun starts 3 CPU processes (gloo); SmolLM2-135M (9 query / 3 kv heads) is sharded with
``DistributedConfig(tp_size=3)``, so each rank's attention sees 3 query heads. The patched logits
must equal the single-process patched logits for a scalar policy and for a per-head profile made
in the single process, and a policy whose head count does not fit gets an error naming both.
"""

from __future__ import annotations

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
