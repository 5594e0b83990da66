"""Device-side running sums of one request batch, read back to the host once.

One :class:`RequestAccumulator` lives for one request (one ``with monitor.request()`` block: a
forward, or every forward of a ``generate`` call) and holds, per attention layer, batch row and
query head, what the fast path and the prompt measurements hand it. Every update is an in-place
tensor op on the device (one ``add_`` per attention call in a decode step, one norm per decoder
layer); nothing is read on the host until :meth:`RequestAccumulator.read`, which moves everything
to the CPU in a single transfer.
"""

from __future__ import annotations

import torch

from sinkfix.telemetry.prompt import PromptMeasures

__all__ = ["RequestAccumulator", "read_once"]


def read_once(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy several device tensors to the host in one transfer (one synchronisation): flattened
    into one fp64 vector, moved, and cut back into the original shapes."""
    names = list(parts)
    flat = torch.cat([parts[n].detach().reshape(-1).to(torch.float64) for n in names]).cpu()
    out, start = {}, 0
    for name in names:
        count = parts[name].numel()
        out[name] = flat[start:start + count].reshape(parts[name].shape)
        start += count
    return out


class RequestAccumulator:
    """Running sums of one request batch of ``batch`` sequences.

    ``stats`` (L, B, H, 2) fp64 sums the (B, Hq, 2) sink statistics of every attention call (mass
    before sink scaling, rows); the prompt's call of each layer also fills the drain weights and the
    sampled hidden-sink estimates (:mod:`sinkfix.telemetry.prompt`). Residual norms are kept per
    forward as (B, Q) tensors, a few floats per token and layer, so the peak ratio of the request is
    exact over all its tokens.
    """

    def __init__(self, num_heads: list[int], batch: int, device: torch.device) -> None:
        layers, heads = len(num_heads), max(num_heads)
        zeros = dict(device=device, dtype=torch.float32)
        self.batch = batch
        self.num_heads = list(num_heads)
        self.kv_heads = [0] * layers
        self.stats = torch.zeros(layers, batch, heads, 2, dtype=torch.float64, device=device)
        self.drain_weight = torch.zeros(layers, batch, heads, **zeros)
        self.value_drain = torch.full((layers, batch, heads), float("nan"), **zeros)
        self.hidden_sinks = torch.zeros(layers, batch, heads, **zeros)
        self.hidden_part = torch.zeros(layers, batch, heads, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(batch, dtype=torch.float64, device=device)
        self.prompt_tokens = torch.zeros(batch, dtype=torch.float64, device=device)
        self.norms: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        self.real: list[torch.Tensor] = []
        self.forwards = 0
        self.in_prompt = True

    # -- updates (device ops only) ------------------------------------------------------------
    def begin_forward(self, real: torch.Tensor) -> None:
        """real (B, Q) bool: which of the forward's new tokens are real (not padding)."""
        self.in_prompt = self.forwards == 0
        self.forwards += 1
        self.real.append(real)
        count = real.sum(-1)
        self.tokens.add_(count)
        if self.in_prompt:
            self.prompt_tokens.add_(count)

    def add_attention(self, layer: int, sink_stats: torch.Tensor) -> None:
        self.stats[layer, :, : sink_stats.shape[1]].add_(sink_stats)

    def add_prompt(self, layer: int, measures: PromptMeasures, rows: torch.Tensor) -> None:
        """The prompt's call of ``layer``; ``rows`` (B, Hq) is its row count, over which the sampled
        hidden-sink part of the dormancy score is extrapolated."""
        heads, kv = measures.drain_weight.shape[1], measures.value_drain.shape[1]
        self.kv_heads[layer] = kv
        self.drain_weight[layer, :, :heads].copy_(measures.drain_weight)
        self.value_drain[layer, :, :kv].copy_(measures.value_drain)
        self.hidden_sinks[layer, :, :heads].copy_(measures.hidden_sinks)
        self.hidden_part[layer, :, :heads].copy_(measures.hidden_part * rows)

    def add_residual(self, layer: int, hidden: torch.Tensor) -> None:
        self.norms[layer].append(torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32))

    # -- reading ------------------------------------------------------------------------------
    def _residual_peaks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, B) max / median of the residual norms over the request's real tokens, and the
        position (among the real tokens) of the maximum; NaN where a layer has no decoder hook."""
        layers = len(self.norms)
        if not self.real:
            nan = torch.full((layers, self.batch), float("nan"), device=self.stats.device)
            return nan, nan
        real = torch.cat(self.real, dim=1)  # (B, T)
        missing = torch.full(real.shape, float("nan"), device=real.device)  # a layer without a decoder hook
        norms = torch.stack([torch.cat(n, dim=1) if len(n) == len(self.real) else missing for n in self.norms])
        median = torch.nanmedian(norms.masked_fill(~real, float("nan")), dim=-1).values
        peak, index = norms.masked_fill(~real, float("-inf")).max(dim=-1)
        position = (real.cumsum(-1) - 1).expand(layers, -1, -1).gather(-1, index[..., None]).squeeze(-1)
        return peak / median, position.float()

    def read(self) -> dict[str, torch.Tensor]:
        """Everything, on the host, in one transfer."""
        peak, position = self._residual_peaks()
        return read_once({
            "stats": self.stats, "drain_weight": self.drain_weight, "value_drain": self.value_drain,
            "hidden_sinks": self.hidden_sinks, "hidden_part": self.hidden_part, "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens, "residual_peak": peak, "peak_position": position,
        })
