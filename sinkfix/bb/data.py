"""The Bigram-Backcopy (BB) task of Guo et al. 2024: a data generator with a known ground truth.

A sequence starts with BOS. After a *trigger* token the next token copies the token before the
trigger ("backcopy"); after any other token the next token is drawn from bigram statistics. The k
triggers are the k most frequent tokens of the source. A model that solves the task needs an
attention head that looks at the previous token on trigger rows and does nothing on the others:
the active-dormant head the paper studies, with ground truth known for every query row.

Two sources of bigram statistics, both offline:

* text: character bigrams of text that ships with Python (default: the ``pydoc_data`` language
  reference, ~465k characters), restricted to its ``n_chars`` most frequent characters (65 by
  default, the size of the paper's character vocabulary);
* random: a seeded random Markov matrix (rows drawn from a Dirichlet distribution), with the
  triggers taken as the most frequent tokens of its stationary distribution.

Token ids: ``0 .. n_chars - 1`` are the characters (most frequent first), then BOS, then a delimiter.
The delimiter completes the paper's vocabulary (65 characters + BOS + delimiter); this generator
never emits it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["BigramBackcopy", "SOURCES"]

SOURCES = ("prose", "code", "random")
Source = Literal["prose", "code", "random"]

# Add-alpha smoothing of the bigram counts: a character that never follows another in the source
# text still gets a tiny probability, so every row of the transition matrix is a distribution.
_SMOOTHING = 1e-3


@dataclass(frozen=True)
class BigramBackcopy:
    """A BB task: vocabulary, bigram transition matrix and triggers. Build it with :meth:`build`.

    Attributes:
        chars: the character of each regular token id (``None`` for the random source).
        transition: (n, n) row-stochastic bigram matrix over the regular tokens.
        frequency: (n,) how often each regular token occurs in the source (text counts, or the
            stationary distribution of the random chain); the triggers are its top k.
        triggers: ids of the k trigger tokens, most frequent first.
        initial: (n,) distribution of the first token after BOS (the source frequencies, with the
            triggers removed: a trigger at position 1 would have to copy BOS).
    """

    chars: tuple[str, ...] | None
    transition: torch.Tensor
    frequency: torch.Tensor
    triggers: tuple[int, ...]
    initial: torch.Tensor
    source: str

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, source: Source = "prose", n_chars: int = 65, k: int = 3, seed: int = 0) -> "BigramBackcopy":
        """Build the task from ``source`` ("prose", "code" or "random") with ``n_chars`` regular
        tokens and ``k`` triggers. ``seed`` only matters for the random source."""
        if source not in SOURCES:
            raise ValueError(f"unknown BB source {source!r}; choose one of {', '.join(SOURCES)}")
        if not 1 <= k < n_chars:
            raise ValueError(f"need 1 <= k < n_chars, got k={k}, n_chars={n_chars}")
        if source == "random":
            return cls._from_random(n_chars, k, seed)
        from sinkfix.texts import domain_text

        # "prose" is the pydoc_data language reference (the evaluation split of the built-in domain
        # "pydoc"); "code" is standard-library source (the calibration split of "python"). Both exist
        # offline wherever Python does.
        text = domain_text("pydoc", "eval") if source == "prose" else domain_text("python", "calib")
        return cls.from_text(text, n_chars, k, source=source)

    @classmethod
    def from_text(cls, text: str, n_chars: int = 65, k: int = 3, source: str = "text") -> "BigramBackcopy":
        """Character bigram statistics of ``text`` over its ``n_chars`` most frequent characters.
        Characters outside the vocabulary are dropped before bigrams are counted."""
        counts = Counter(text)
        if len(counts) < n_chars:
            raise ValueError(f"text has {len(counts)} distinct characters, fewer than n_chars={n_chars}")
        # ties broken by the character itself so the vocabulary is deterministic
        chars = tuple(c for c, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n_chars])
        index = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([index[c] for c in text if c in index], dtype=torch.long)
        pairs = torch.zeros(n_chars * n_chars, dtype=torch.float64)
        pairs.index_add_(0, ids[:-1] * n_chars + ids[1:], torch.ones(len(ids) - 1, dtype=torch.float64))
        pairs = pairs.view(n_chars, n_chars) + _SMOOTHING
        transition = pairs / pairs.sum(dim=1, keepdim=True)
        frequency = torch.bincount(ids, minlength=n_chars).to(torch.float64)
        return cls._finish(chars, transition, frequency, k, source)

    @classmethod
    def _from_random(cls, n: int, k: int, seed: int) -> "BigramBackcopy":
        gen = torch.Generator().manual_seed(seed)
        # Dirichlet(0.3) rows: peaked like character bigrams (a few likely successors per token)
        gamma = torch._standard_gamma(torch.full((n, n), 0.3, dtype=torch.float64), generator=gen)
        transition = gamma / gamma.sum(dim=1, keepdim=True)
        # stationary distribution by power iteration (the chain is dense, so it mixes fast)
        freq = torch.full((n,), 1.0 / n, dtype=torch.float64)
        for _ in range(500):
            freq = freq @ transition
        return cls._finish(None, transition, freq, k, "random")

    @classmethod
    def _finish(cls, chars, transition, frequency, k, source) -> "BigramBackcopy":
        order = sorted(range(len(frequency)), key=lambda i: (-float(frequency[i]), i))
        triggers = tuple(order[:k])
        initial = frequency.clone()
        initial[list(triggers)] = 0
        initial = initial / initial.sum()
        return cls(chars, transition.float(), frequency.float(), triggers, initial.float(), source)

    # -- vocabulary -----------------------------------------------------------------------------
    @property
    def n_regular(self) -> int:
        return self.transition.shape[0]

    @property
    def bos_id(self) -> int:
        return self.n_regular

    @property
    def delimiter_id(self) -> int:
        return self.n_regular + 1

    @property
    def vocab_size(self) -> int:
        return self.n_regular + 2

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Readable text of one sequence (BOS as ``^``, random-source tokens as ``<id>``)."""
        out = []
        for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if t == self.bos_id:
                out.append("^")
            elif t == self.delimiter_id:
                out.append("|")
            else:
                out.append(self.chars[t] if self.chars is not None else f"<{t}>")
        return "".join(out)

    # -- sampling -------------------------------------------------------------------------------
    def sample(self, batch: int, seq_len: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch, seq_len) token ids: BOS at position 0, then the BB process.

        Two triggers never follow each other: the first trigger of a sequence follows a
        non-trigger token (position 1 is never a trigger), and a trigger's successor copies the
        token before the trigger, which is then a non-trigger too. So the copy is always defined.
        """
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        ids = torch.empty(batch, seq_len, dtype=torch.long)
        ids[:, 0] = self.bos_id
        ids[:, 1] = torch.multinomial(self.initial.expand(batch, -1), 1, generator=generator).squeeze(1)
        is_trig = torch.zeros(self.n_regular, dtype=torch.bool)
        is_trig[list(self.triggers)] = True
        for t in range(1, seq_len - 1):
            cur = ids[:, t]
            bigram = torch.multinomial(self.transition[cur], 1, generator=generator).squeeze(1)
            ids[:, t + 1] = torch.where(is_trig[cur], ids[:, t - 1], bigram)
        return ids

    def trigger_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool (B, S): query row i holds a trigger, so the next token is ``input_ids[:, i - 1]``
        (the head should be active there) — the ground truth for active vs dormant rows."""
        return torch.isin(input_ids, torch.tensor(self.triggers, dtype=input_ids.dtype, device=input_ids.device))
