"""One torchrun worker: SmolLM2-135M sharded with transformers' tensor parallelism, patched.

Usage: torchrun --nproc-per-node N tp_worker.py PROFILE OUT_DIR
Writes OUT_DIR/logits-<policy>.pt (rank 0) for the stock model, a scalar policy and the per-head profile, and
OUT_DIR/errors-<rank>.txt with the message a policy of the wrong head count raised on that rank.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import DistributedConfig

import sinkfix

IDS = torch.arange(100, 164)[None]  # 64 tokens, no padding


def main(profile_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    out = Path(out_dir)
    model, _ = sinkfix.load_model("smollm2-135m", distributed_config=DistributedConfig(tp_size=int(os.environ["WORLD_SIZE"])))
    profile = sinkfix.Profile.load(profile_path)
    with torch.no_grad():
        stock = model(input_ids=IDS).logits
    if rank == 0:
        torch.save(stock, out / "logits-stock.pt")
    for name, policy in (("scalar", sinkfix.Policy(sink_scale=0.9)), ("profile", profile)):
        with torch.no_grad(), sinkfix.patch(model, policy) as handle:
            assert handle.tensor_parallel is not None and handle.num_heads()[0] * handle.tensor_parallel[1] == 9
            logits = model(input_ids=IDS).logits
        if rank == 0:
            torch.save(logits, out / f"logits-{name}.pt")
    wrong = sinkfix.Policy(sink_scale=torch.full((30, 6), 0.5))
    try:
        sinkfix.patch(model, wrong)
        message = "no error"
    except sinkfix.PolicyError as exc:
        message = str(exc)
    (out / f"errors-{rank}.txt").write_text(message)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
