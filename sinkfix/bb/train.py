"""Small transformers trained on Bigram-Backcopy, as real transformers models.

Three variants, as in the paper: softmax attention + AdamW (the default), softmax + SGD, and ReLU
attention (:mod:`sinkfix.bb.relu_attention`) + AdamW. Each model is a stock ``GPT2LMHeadModel``
(or ``LlamaForCausalLM`` with ``arch="llama"``) with one attention head per layer, so
``sinkfix.patch`` / ``sinkfix.inspect`` work on the softmax ones unchanged, and the ReLU one differs
only by its registered attention implementation.

Why GPT-2 by default: the paper's model is a pre-LayerNorm transformer with *learned absolute*
position embeddings, a ReLU MLP (4x) and ``nn.Embedding``'s N(0, 1) initialisation of the token and
position embeddings; GPT-2 with ``activation_function="relu"`` and re-initialised embeddings is the
closest stock architecture. It matters: on the same budget (1 layer, width 64, 800 AdamW steps at
3e-3 with cosine decay, batch 32 x 64 tokens) the non-trigger rows put 0.99 of their attention on
BOS with this model, but only 0.40 with GPT-2's default N(0, 0.02) embeddings and 0.39 with a RoPE
Llama (N(0, 1) token embeddings); see docs/bb.md.

The softmax variants train with ``"sdpa"`` (the fastest CPU path); measurements switch
implementations as they need (see :mod:`sinkfix.bb.report`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from sinkfix.bb.data import BigramBackcopy
from sinkfix.bb.relu_attention import RELU_IMPL_NAME, register_relu
from sinkfix.errors import UsageError

__all__ = ["Variant", "VARIANTS", "TrainConfig", "TrainResult", "check_width", "build_model", "train_variant"]


@dataclass(frozen=True)
class Variant:
    """One of the paper's training set-ups: attention type, optimizer and learning rate."""

    name: str
    attention: Literal["softmax", "relu"]
    optimizer: Literal["adam", "sgd"]
    lr: float
    description: str

    @property
    def attn_implementation(self) -> str:
        return "sdpa" if self.attention == "softmax" else RELU_IMPL_NAME


# Learning rates. Paper: AdamW 3e-4, SGD 0.03 (momentum 0.9), ReLU + AdamW 3e-3, for 10k steps of
# 512 x 256 tokens. The CPU run is ~3x shorter in steps and 64x smaller per batch, so AdamW gets 10x
# the paper's rate (at 3e-3 the 1-layer sink reaches 0.93 of the attention by step 200) and SGD 10x
# too (at 0.03 a 1-layer model had not learned the copy after 1000 steps: copy accuracy 0.43; at 0.3
# it reaches 1.0). ReLU + AdamW keeps the paper's 3e-3.
VARIANTS: dict[str, Variant] = {
    "adam": Variant("adam", "softmax", "adam", 3e-3, "softmax attention + AdamW"),
    "sgd": Variant("sgd", "softmax", "sgd", 0.3, "softmax attention + SGD (momentum 0.9)"),
    "relu": Variant("relu", "relu", "adam", 3e-3, "ReLU attention + AdamW"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Model and run size. The defaults are the CPU-sized run of docs/bb.md; the paper's values are
    width 256, sequence length 256, batch 512, 10k steps."""

    steps: int = 3000
    batch: int = 32
    seq_len: int = 64
    width: int = 64
    layers: int = 3
    seed: int = 0
    weight_decay: float = 1e-4
    arch: Literal["gpt2", "llama"] = "gpt2"
    # std of the token (and, for GPT-2, position) embeddings at init; 1.0 is nn.Embedding's default,
    # which the paper's model uses. None keeps the architecture's own initialisation.
    embed_std: float | None = 1.0
    eval_every: int = 100
    eval_batch: int = 32

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    variant: Variant
    model: nn.Module
    losses: list[float]
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0  # training loop including the dynamics measurements
    train_s: float = 0.0  # the optimisation steps alone


def check_width(arch: str, width: int, width_name: str = "width", arch_name: str = "arch") -> None:
    """:class:`UsageError` for a width the architecture cannot run. The one head is as wide as the
    model, and Llama's RoPE rotates pairs of its dimensions, so Llama needs an even width; GPT-2 runs
    at any width >= 1 (at width 1 its LayerNorms output their bias alone, whatever the token)."""
    if arch == "llama" and (width < 2 or width % 2):
        raise UsageError(f"{width_name} must be an even number >= 2 with {arch_name} llama, got {width} (RoPE "
                         "rotates pairs of the head's dimensions, and the one head is as wide as the model); "
                         "gpt2 takes any width >= 1")
    if width < 1:
        raise UsageError(f"{width_name} must be >= 1, got {width}")


def build_model(task: BigramBackcopy, config: TrainConfig, variant: Variant) -> nn.Module:
    """A freshly initialised model (seeded with ``config.seed``): ``config.layers`` layers, one
    head per layer (head dim = width), a 4x MLP, untied input / output embeddings, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    check_width(config.arch, config.width)
    if variant.attention == "relu":
        register_relu()
    torch.manual_seed(config.seed)
    positions = max(config.seq_len, 256)
    if config.arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=task.vocab_size, n_positions=positions, n_embd=config.width, n_layer=config.layers,
            n_head=1, n_inner=4 * config.width, activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=task.bos_id, eos_token_id=None,
            tie_word_embeddings=False,
        ))
        embeddings = [model.transformer.wte.weight, model.transformer.wpe.weight]
    elif config.arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=task.vocab_size, hidden_size=config.width, intermediate_size=4 * config.width,
            num_hidden_layers=config.layers, num_attention_heads=1, num_key_value_heads=1, head_dim=config.width,
            max_position_embeddings=positions, bos_token_id=task.bos_id, eos_token_id=None, pad_token_id=None,
            tie_word_embeddings=False, attention_dropout=0.0,
        ))
        embeddings = [model.model.embed_tokens.weight]
    else:
        raise ValueError(f"unknown BB architecture {config.arch!r}; choose gpt2 or llama")
    if config.embed_std is not None:
        with torch.no_grad():
            for weight in embeddings:
                weight.normal_(0.0, config.embed_std)
    model.loss_type = "ForCausalLM"  # GPT-2 has none and would warn on the first loss
    model.set_attn_implementation(variant.attn_implementation)
    return model


def _optimizer(model: nn.Module, variant: Variant, weight_decay: float) -> torch.optim.Optimizer:
    # betas and momentum as in the paper's training script
    if variant.optimizer == "adam":
        return torch.optim.AdamW(model.parameters(), lr=variant.lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    return torch.optim.SGD(model.parameters(), lr=variant.lr, weight_decay=weight_decay, momentum=0.9)


def train_variant(
    task: BigramBackcopy,
    variant: Variant,
    config: TrainConfig,
    on_eval: Callable[[int, nn.Module], dict] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train one variant on fresh BB batches (seeded), next-token cross-entropy on every position,
    constant learning rate (as in the paper).

    ``on_eval(step, model)`` is called in eval mode before the first step, every
    ``config.eval_every`` steps and after the last; its dicts form ``TrainResult.history``, each
    after the first with ``train_loss``: the mean training loss over the steps since the previous entry.
    """
    model = build_model(task, config, variant)
    optimizer = _optimizer(model, variant, config.weight_decay)
    data_gen = torch.Generator().manual_seed(config.seed + 1)
    result = TrainResult(variant, model, [])
    eval_s = 0.0
    previous_step = 0

    def evaluate(step: int) -> None:
        nonlocal eval_s, previous_step
        if on_eval is None:
            return
        t0 = time.perf_counter()
        model.eval()
        entry = {"step": step, **on_eval(step, model)}
        # since the previous entry, not the last eval_every steps: a short last interval would overlap
        since = result.losses[previous_step:step]
        if since:
            entry["train_loss"] = sum(since) / len(since)
        previous_step = step
        result.history.append(entry)
        model.train()
        eval_s += time.perf_counter() - t0

    start = time.perf_counter()
    model.train()
    evaluate(0)
    for step in range(1, config.steps + 1):
        batch = task.sample(config.batch, config.seq_len, generator=data_gen)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        result.losses.append(float(loss.detach()))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{variant.name}: loss became {result.losses[-1]} at step {step}")
        if step % config.eval_every == 0 or step == config.steps:
            evaluate(step)
            if progress is not None:
                progress(f"{variant.name}: step {step}/{config.steps} loss {result.losses[-1]:.3f}")
    model.eval()
    result.wall_s = time.perf_counter() - start
    result.train_s = result.wall_s - eval_s
    return result
