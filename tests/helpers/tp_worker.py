"""One torchrun worker: SmolLM2-135M sharded with transformers' tensor parallelism, patched.

Usage: torchrun --nproc-per-node N tp_worker.py PROFILE OUT_DIR
Writes OUT_DIR/logits-<policy>.pt (rank 0) for the stock model, a scalar policy and the per-head profile,
OUT_DIR/errors-<rank>.txt with the message a policy of the wrong head count raised on that rank, and, with the
profile monitored (a forward, then a short generate, as two requests): OUT_DIR/records-<rank>.json (every rank's
records), OUT_DIR/telemetry.jsonl (the log every rank was given) and OUT_DIR/guard-<rank>.txt (what asking for
a guard said).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import DistributedConfig

import sinkfix
from sinkfix.errors import MonitorError

IDS = torch.arange(100, 164)[None]  # 64 tokens, no padding
NEW_TOKENS = 4


def monitored_requests(model, log=None) -> list[dict]:
    """Two requests through a monitor on the patched ``model``: a forward of IDS, then a greedy
    generate of NEW_TOKENS after it. Returns their records (one per request)."""
    records = []
    with sinkfix.monitor(model, log=log) as monitor, torch.no_grad():
        with monitor.request(domain="prose"):
            model(input_ids=IDS)
        records += monitor.records
        with monitor.request(domain="code"):
            model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), do_sample=False,
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None)
        records += monitor.records
    return records


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

    with sinkfix.patch(model, profile):
        records = monitored_requests(model, log=out / "telemetry.jsonl")
        try:
            sinkfix.monitor(model, guard=profile)
            message = "no error"
        except MonitorError as exc:
            message = str(exc)
    (out / f"records-{rank}.json").write_text(json.dumps(records))
    (out / f"guard-{rank}.txt").write_text(message)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
