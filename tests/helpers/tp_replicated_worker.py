"""One torchrun worker: tiny models whose tensor-parallel plan leaves the attention whole on every rank
(Phi3's fused qkv is gathered, GPT-OSS's plan shards the embedding only), patched with a per-head policy.

Usage: torchrun --nproc-per-node 2 tp_replicated_worker.py CHECKPOINTS_DIR OUT_DIR ARCH [ARCH ...]
Writes OUT_DIR/<arch>-logits.pt (rank 0), OUT_DIR/<arch>-heads-<rank>.json (what the handle says of the heads, what
a policy of the sharded head count said) and OUT_DIR/<arch>-telemetry.jsonl (the log every rank was given).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers as tf
from transformers import DistributedConfig

import sinkfix

IDS = torch.arange(3, 15)[None]


def per_head(heads: int) -> sinkfix.Policy:
    """A per-head policy for a 2-layer model: every head its own sink scale."""
    return sinkfix.Policy(sink_scale=torch.linspace(0.2, 0.9, 2 * heads).reshape(2, heads))


def main(checkpoints: str, out_dir: str, archs: list[str]) -> None:
    torch.set_num_threads(1)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = Path(out_dir)
    for arch in archs:
        model = tf.AutoModelForCausalLM.from_pretrained(Path(checkpoints) / arch,
                                                        distributed_config=DistributedConfig(tp_size=size)).eval()
        heads = model.config.num_attention_heads
        with torch.no_grad(), sinkfix.patch(model, per_head(heads)) as handle:
            logits = model(input_ids=IDS).logits
            seen = {"num_heads": handle.num_heads(), "model_num_heads": handle.model_num_heads(),
                    "tensor_parallel": handle.tensor_parallel, "replicated": handle.replicated_attention}
            with sinkfix.monitor(model, log=out / f"{arch}-telemetry.jsonl") as monitor, monitor.request():
                model(input_ids=IDS)
            seen["record_heads"] = [len(heads) for heads in monitor.records[0]["sink_share"]]
        try:
            sinkfix.patch(model, per_head(heads * size)).remove()
            seen["sharded_count"] = "accepted"
        except sinkfix.PolicyError as exc:
            seen["sharded_count"] = str(exc)
        if rank == 0:
            torch.save(logits, out / f"{arch}-logits.pt")
        (out / f"{arch}-heads-{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
