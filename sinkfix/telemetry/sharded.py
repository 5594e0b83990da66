"""Telemetry of a model sharded with tensor parallelism: each rank's heads gathered into one record.

Under transformers' tensor parallelism (``DistributedConfig(tp_size=N)``, ``torchrun``) rank ``r``
of the group computes the ``r``-th contiguous block of every layer's query heads (and of its kv
heads), so its attention calls, and the monitor listening to them, see only that block. The
residual stream is whole on every rank (the row-parallel projections are all-reduced), so its
norms, and the token counts, are the same everywhere.

At the end of a request every rank's per-head values (the sink statistics' sums, the prompt's
drain weights and hidden-sink estimates, the value drains, the sink scaling applied) go through one
``all_gather`` of a single fp64 vector over the tensor-parallel group, a few kilobytes, and are put
side by side in rank order: every rank then holds the whole model's values and builds the same
records. Only the group's rank 0 writes the log, serves the metrics and calls the callback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sinkfix.errors import MonitorError
from sinkfix.telemetry.accumulate import flatten_fp64, unflatten

__all__ = ["TensorParallelGroup"]


@dataclass
class TensorParallelGroup:
    """This process's place in the model's tensor-parallel group and how to reach the others."""

    rank: int
    size: int
    group: Any  # a torch.distributed ProcessGroup; None = the default group
    device: torch.device  # where the collective's tensors live (CUDA for NCCL, else the CPU)

    @classmethod
    def of(cls, model: nn.Module, rank: int, size: int) -> "TensorParallelGroup":
        """The group transformers sharded ``model`` over (its device mesh's "tp" dimension, or the
        default group when the world is that group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise MonitorError("this model is sharded with tensor parallelism, but torch.distributed is not "
                               "initialised in this process: the monitor gathers every rank's heads at the end "
                               "of each request and needs the process group transformers sharded it over")
        group = None
        mesh_manager = getattr(model, "_mesh_manager", None)
        if mesh_manager is not None:
            group = mesh_manager.get_mesh("tp").get_group()
        elif dist.get_world_size() != size:
            raise MonitorError(f"cannot tell which processes share this model's tensor-parallel group: the world "
                               f"has {dist.get_world_size()} processes, the model is sharded over {size}, and it "
                               "carries no device mesh")
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return cls(rank, size, group, device)

    def gather_heads(self, fields: dict[str, tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        """``fields``: name -> (this rank's tensor, its head dimension). Returns each field with the
        group's blocks concatenated along that dimension in rank order (rank r's block is heads
        r*h .. r*h + h - 1), as fp64 on the CPU. One collective for all of them."""
        import torch.distributed as dist

        local = {name: tensor for name, (tensor, _) in fields.items()}
        flat = flatten_fp64(local).to(self.device)
        gathered = [torch.empty_like(flat) for _ in range(self.size)]
        dist.all_gather(gathered, flat, group=self.group)
        blocks = [unflatten(block.cpu(), local) for block in gathered]
        return {name: torch.cat([block[name] for block in blocks], dim=dim) for name, (_, dim) in fields.items()}
