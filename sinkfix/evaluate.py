"""Perplexity with sliding windows, token-weighted, with an explicit BOS protocol.

Protocol (stated next to every number sinkfix reports): the token stream is cut into windows of
``seq_len`` tokens advancing by ``stride``; no token is scored twice, and each scored token gets as
much left context as its window gives it (the usual strided evaluation). With ``bos=True`` every
window starts with the tokenizer's BOS token (not scored) followed by ``seq_len - 1`` text tokens,
and every text token is scored. Without a BOS a token that opens a window has nothing before it in
that window and is not scored: the first token of the text always, and at the default stride
(``stride = seq_len``, windows that do not overlap) the first token of every window, so each full
window scores ``seq_len - 1`` tokens; with ``stride < seq_len`` the windows overlap and every token
after the first is scored. :attr:`PerplexityResult.tokens` counts the tokens actually scored.
Whether a BOS is present changes which token becomes the attention sink, so it is always part of
the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from sinkfix.errors import UsageError

__all__ = ["Window", "make_windows", "window_nll", "windows_nll", "exp_nll", "perplexity", "PerplexityResult",
           "bos_token_id", "tokenize", "token_ids", "MIN_TOKENS", "model_device", "model_label", "decoder_stack",
           "max_positions", "check_positions"]


@dataclass(frozen=True)
class Window:
    input_ids: torch.Tensor  # (S,)
    labels: torch.Tensor  # (S,), -100 = not scored


def exp_nll(nll: float) -> float:
    """The perplexity of a mean NLL: exp(nll); inf past float's range (a mean NLL above 709.78 nats,
    where math.exp raises), NaN stays NaN."""
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float
    tokens: int
    windows: int
    seq_len: int
    stride: int
    bos: bool

    @property
    def nll(self) -> float:
        # no scored token: no perplexity (NaN), not the 1.0 that an empty sum over one token would give
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        return exp_nll(self.nll)

    def protocol(self) -> str:
        return f"{'BOS + ' if self.bos else 'no BOS, '}{self.seq_len}-token windows, stride {self.stride}, {self.tokens} scored tokens"


def bos_token_id(tokenizer) -> int:
    """The BOS id; falls back to the first special token the tokenizer knows (SmolLM2's <|im_start|>)."""
    for candidate in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "cls_token_id", None)):
        if candidate is not None:
            return int(candidate)
    specials = getattr(tokenizer, "all_special_ids", None) or []
    if specials:
        return int(min(specials))
    raise UsageError("tokenizer has no BOS token; evaluate with bos=False")


#: The fewest tokens a text can be scored on: one token predicted from another.
MIN_TOKENS = 2


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of ``text`` without any special tokens, however few (callers that cut windows
    say themselves what a text is too short for). Special-token markup written in the text is text:
    ``add_special_tokens=False`` only keeps the tokenizer from adding a BOS, and a literal
    ``<|im_start|>`` in a calibration text became SmolLM2's BOS id (the sink) mid-window. No built-in
    text holds such markup (both models' ids of every built-in text are the same either way)."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_tensors="pt")
    except TypeError:  # a tokenizer without the option (a minimal stand-in) parses no markup anyway
        encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    return encoded.input_ids[0]


def tokenize(tokenizer, text: str, name: str | None = None) -> torch.Tensor:
    """1-D token ids of ``text`` without any special tokens (BOS is handled by the window protocol);
    a text under :data:`MIN_TOKENS` tokens is a :class:`UsageError` naming it (``name``)."""
    ids = token_ids(tokenizer, text)
    if ids.numel() < MIN_TOKENS:
        what = "text" if name is None else f"text {name!r}"
        raise UsageError(f"{what} is too short: {ids.numel()} token(s), fewer than the {MIN_TOKENS} needed "
                         "(one token predicted from another)")
    return ids


def max_positions(config) -> int | None:
    """The longest input the model's config states (``max_position_embeddings`` or its older names,
    also in a multimodal model's ``text_config``); None when it states none."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_positions(length: int, config, what: str, model_name: str,
                    error: type[Exception] = UsageError) -> int | None:
    """Refuse windows of ``length`` tokens beyond the positions the model's ``config`` states (past
    them a model's outputs are garbage, not an error); ``what`` names the setting. Returns the limit."""
    limit = max_positions(config)
    if limit is not None and length > limit:
        raise error(f"{what} {length} is larger than {model_name} supports (max_position_embeddings = {limit})")
    return limit


def make_windows(ids: torch.Tensor, seq_len: int, stride: int | None = None, bos_id: int | None = None,
                 max_windows: int | None = None) -> list[Window]:
    """Strided windows over a 1-D token stream (``max_windows``: the first ones only; None = all).

    No token is scored twice. With ``bos_id`` every token is scored; without, a token that opens a
    window is not (nothing precedes it there): the first token, and at ``stride = seq_len`` the first
    token of every window. With ``stride < seq_len`` every token after the first is scored.
    """
    if ids.dim() != 1:
        raise UsageError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
    if bos_id is not None and seq_len < 3:
        raise UsageError(f"seq_len must be >= 3 with a BOS (the BOS and 2 text tokens), got {seq_len}")
    if seq_len < 2:
        raise UsageError(f"seq_len must be >= 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"max_windows must be >= 1 (or None for all), got {max_windows}")
    body = seq_len - (1 if bos_id is not None else 0)
    stride = body if stride is None else stride
    if not 0 < stride <= body:
        raise UsageError(f"stride must be in [1, {body}], got {stride}")
    windows: list[Window] = []
    scored_until = 1 if bos_id is None else 0  # the first token has no context without a BOS
    for begin in range(0, ids.numel(), stride):
        end = min(begin + body, ids.numel())
        chunk = ids[begin:end]
        labels = chunk.clone()
        labels[: max(scored_until - begin, 0)] = -100
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id], dtype=ids.dtype), chunk])
            labels = torch.cat([torch.tensor([-100], dtype=labels.dtype), labels])
        if (labels != -100).any():
            windows.append(Window(chunk, labels))
        scored_until = end
        if end == ids.numel() or (max_windows is not None and len(windows) >= max_windows):
            break
    return windows


def window_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL (fp32) and number of scored tokens. logits (B, S, V), labels (B, S).
    Differentiable in ``logits`` (:class:`_TokenNLL`)."""
    batch, seq, vocab = logits.shape
    # the last position predicts nothing: scored as "not scored" instead of sliced off, so that the
    # gradient is written straight into one (B, S, V) tensor (a slice's backward zero-fills another)
    targets = torch.cat([labels[:, 1:], labels.new_full((batch, 1), -100)], dim=1).reshape(-1)
    valid = targets != -100
    return _TokenNLL.apply(logits.reshape(batch * seq, vocab), targets), int(valid.sum())


#: Logit rows _TokenNLL handles at once: 64 x 49152 fp32 is 12.6 MB, under glibc's largest mmap
#: threshold (32 MB), so its temporaries come from reused heap memory. Whole (S, V) temporaries are
#: fresh pages every time: a SmolLM2 calibration (150 steps with gradients, ~300 scoring passes, 512
#: tokens) took 19.6 million page faults and 51 s of system CPU time with log_softmax + gather.
_NLL_CHUNK_ROWS = 64


class _TokenNLL(torch.autograd.Function):
    """``sum_i [t_i != -100] (logsumexp(x_i) - x_i[t_i])`` over rows of logits x (N, V), computed in
    fp32 in row chunks; the backward writes ``g (softmax(x_i) - onehot(t_i))`` into one new tensor
    with no other full-size temporary (log_softmax + gather needed four)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = logits.shape[0]
        valid = targets != -100
        safe = targets.clamp(min=0)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, _NLL_CHUNK_ROWS):
            stop = min(start + _NLL_CHUNK_ROWS, rows)
            lse[start:stop] = torch.logsumexp(logits[start:stop].float(), dim=-1)
        picked = logits.gather(-1, safe[:, None]).squeeze(-1).float()
        ctx.save_for_backward(logits, lse, safe, valid)
        return ((lse - picked) * valid).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, safe, valid = ctx.saved_tensors
        weight = grad.float() * valid  # (N,): 0 for the rows that are not scored
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], _NLL_CHUNK_ROWS):
            stop = min(start + _NLL_CHUNK_ROWS, logits.shape[0])
            part = torch.exp(logits[start:stop].float() - lse[start:stop, None])
            out[start:stop] = part.mul_(weight[start:stop, None])
        rows = torch.arange(logits.shape[0], device=logits.device)
        out.index_put_((rows, safe), -weight.to(out.dtype), accumulate=True)
        return out, None


def model_device(model) -> torch.device:
    """Where the model's (first materialised) parameters live; CPU for a model with none."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def model_label(model) -> str:
    """What reports call a model: its sinkfix name (the offline models), else the path or hub id it
    was loaded from, else its class."""
    config = getattr(model, "config", None)
    return getattr(model, "sinkfix_name", None) or getattr(config, "_name_or_path", None) or type(model).__name__


def decoder_stack(model):
    """The model without its vocabulary projection (``model.base_model``), for passes that only read
    what the attention calls see: the projection is about 12% of a SmolLM2 forward and makes a
    (Q, 49152) logits tensor per window. The model itself when it has no separate base model."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) and base is not model else model


def _batches(windows: Sequence[Window], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of equal-length windows, in input order within each length (right-padding would
    change nothing for causal models but costs compute)."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    by_len: dict[int, list[Window]] = {}
    for w in windows:
        by_len.setdefault(w.input_ids.numel(), []).append(w)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            part = group[i : i + batch_size]
            yield torch.stack([w.input_ids for w in part]), torch.stack([w.labels for w in part])


@torch.no_grad()
def windows_nll(
    model, windows: Sequence[Window], batch: int = 1, on_batch: Callable[[int], None] | None = None
) -> tuple[float, int]:
    """Summed next-token NLL (fp32 log-softmax, accumulated in fp64) and number of scored tokens.

    Perplexity is ``exp(nll_sum / tokens)``: token-weighted over windows, so a short last window
    counts for its tokens, not as a whole window. ``on_batch(n)`` after each batch of n windows.
    """
    device = model_device(model)
    nll_sum, tokens = 0.0, 0
    for input_ids, labels in _batches(windows, batch):
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits
        nll, count = window_nll(logits, labels.to(logits.device))
        nll_sum += float(nll.double())
        tokens += count
        if on_batch is not None:
            on_batch(input_ids.shape[0])
    return nll_sum, tokens


def _token_ids(ids: torch.Tensor) -> torch.Tensor:
    """1-D ids from 1-D or one-row ids; a batch of texts is refused (their windows would run together)."""
    if not isinstance(ids, torch.Tensor):
        raise UsageError(f"text must be a string or a tensor of token ids, got {type(ids).__name__}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise UsageError(f"token ids must be 1-D or one row (1, S), got shape {tuple(ids.shape)}")
    if ids.numel() < 2:
        raise UsageError("text is too short: fewer than 2 tokens")
    return ids


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str | torch.Tensor,
    *,
    seq_len: int = 512,
    stride: int | None = None,
    bos: bool = False,
    batch_size: int = 1,
    max_windows: int | None = None,
    on_window: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` on ``text`` under the window protocol.

    ``text`` is a string or its token ids: 1-D, or ``(1, S)`` as a tokenizer returns them. Bad
    arguments (a text under 2 tokens, ``seq_len`` beyond the model's positions, ``batch_size`` or
    ``max_windows`` below 1) raise :class:`~sinkfix.errors.UsageError` before the model runs.
    """
    ids = tokenize(tokenizer, text) if isinstance(text, str) else _token_ids(text)
    config = getattr(model, "config", None)
    if config is not None:
        check_positions(seq_len, config, "seq_len", getattr(config, "name_or_path", "") or "the model")
    bos_id = bos_token_id(tokenizer) if bos else None
    windows = make_windows(ids, seq_len, stride, bos_id, max_windows)
    nll_sum, tokens = windows_nll(model, windows, batch_size, on_window)
    if tokens == 0:  # every text of 2 tokens or more has one; a guard, never a perplexity over nothing
        raise UsageError("no token was scored")
    body = seq_len - (1 if bos else 0)
    return PerplexityResult(nll_sum, tokens, len(windows), seq_len, stride or body, bos)
