"""CUDA graphs: on a GPU, ``generate`` with a static cache compiles the decode step by itself
(inductor, ``mode="reduce-overhead"``, whose cudagraph trees replay recorded graphs and check that
every allocation of their memory pool is accounted for). A patched model, and a monitored one, must
decode there as they do eagerly. Runs only where CUDA is (``benchmarks/gpu_check.sh``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import sinkfix

from ..conftest import tiny_model
from .conftest import DEVICE

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")


@pytest.mark.parametrize("monitored", [False, True], ids=["patched", "monitored"])
def test_generate_under_cuda_graphs_equals_eager(monitored):
    # a failure then names where each allocation the trees could not account for was made
    torch._inductor.config.triton.cudagraph_trees_history_recording = True
    torch._dynamo.reset()
    model = tiny_model("llama").to(DEVICE)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kwargs = dict(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None,
                  cache_implementation="static")
    records = {}
    with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.8), backend="triton"), torch.no_grad():
        monitor = sinkfix.monitor(model) if monitored else None
        try:
            tokens = {}
            for mode in ("eager", "graphs"):
                request = monitor.request() if monitor is not None else contextlib.nullcontext()
                with request:
                    tokens[mode] = model.generate(**kwargs, disable_compile=mode == "eager")
                if monitor is not None:
                    (records[mode],) = monitor.records
        finally:
            if monitor is not None:
                monitor.close()
    assert torch.equal(tokens["graphs"], tokens["eager"])
    if monitored:
        assert records["graphs"]["tokens"] == records["eager"]["tokens"] == 18
        torch.testing.assert_close(torch.tensor(records["graphs"]["sink_share"]),
                                   torch.tensor(records["eager"]["sink_share"]), atol=1e-5, rtol=0)
