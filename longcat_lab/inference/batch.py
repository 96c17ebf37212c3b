"""Continuous batching (docs/design.md §7.2): `BatchDecoder` decodes many sequences together, one forward per step
over every active sequence, while sequences join and leave between steps.

A sequence joins with its prompt prefilled alone (a one-sequence `LatentCache`, the same forward `stream` runs) and
copied into a row of the shared `BatchLatentCache`; from then on each `step` feeds every row its last token at that
row's own position. Rows of different lengths are padded and the padding masked, RoPE rotates each row by its own
position, and the MoE routes each token as always, so a sequence decodes what it would decode alone (up to float
rounding of the batched matmuls). A finished sequence `leave`s at once and its row is reused.

Each sequence samples with its own settings and generator, one row at a time, so a seeded request draws what it
would draw alone; `logits_mask` is the per-sequence hook for constrained decoding (structured outputs): a callable
that takes the ids generated so far and the row's logits [1, vocab] and returns the logits to sample from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from longcat_lab._util import check_int
from longcat_lab.inference.generate import check_generation, sample_next
from longcat_lab.model.cache import BatchLatentCache, LatentCache
from longcat_lab.model.model import LongCatLM

LogitsMask = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class Sequence:
    """One sequence of a batch: its prompt, sampling settings and the tokens generated so far (`tokens`)."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    logits_mask: LogitsMask | None = None
    tokens: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)


class BatchDecoder:
    """Up to `max_batch` sequences decoding together: `join` prefills one and returns its first token, `step` decodes
    one more token of every joined sequence (in `sequences` order), `leave` frees a sequence's row."""

    def __init__(self, model: LongCatLM, max_batch: int):
        check_int("max_batch", max_batch, 1)
        self.model, self.max_batch = model, max_batch
        model.eval()
        self.cache = BatchLatentCache(2 * model.config.num_layers, max_batch, model.decoding_weights)
        self.sequences: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.sequences)

    def _sample(self, seq: Sequence, logits_1V: torch.Tensor) -> int:
        if seq.logits_mask is not None:
            logits_1V = seq.logits_mask(seq.tokens, logits_1V)
        token = int(sample_next(logits_1V, seq.temperature, seq.top_p, seq.generator))
        seq.tokens.append(token)
        return token

    @torch.inference_mode()
    def join(self, seq: Sequence) -> int:
        """Prefill `seq`'s prompt alone, add it to the batch and return its first new token."""
        if len(self.sequences) >= self.max_batch:
            raise ValueError(f"the batch is full: {len(self.sequences)} sequences (max_batch={self.max_batch})")
        idx = torch.tensor([seq.prompt], dtype=torch.long, device=self.model.device)
        check_generation(self.model, idx, seq.max_new_tokens, seq.temperature, seq.top_p)
        alone = LatentCache(2 * self.model.config.num_layers, len(seq.prompt), self.model.decoding_weights)
        logits = self.model(idx, cache=alone, logits_to_keep=1).logits[:, -1]
        self.cache.add(alone)
        self.sequences.append(seq)
        return self._sample(seq, logits)

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One forward over every sequence's last token; each sequence's new token, in `sequences` order."""
        if not self.sequences:
            return []
        last = torch.tensor([[s.tokens[-1]] for s in self.sequences], device=self.model.device)
        logits = self.model(last, cache=self.cache, validate=False).logits[:, -1]
        self.cache.advance()
        return [self._sample(s, logits[i : i + 1]) for i, s in enumerate(self.sequences)]

    @torch.inference_mode()
    def leave(self, seq: Sequence) -> None:
        """Free `seq`'s row now (the last sequence moves into it, as in `BatchLatentCache.remove`)."""
        row = self.sequences.index(seq)
        self.cache.remove(row)
        self.sequences[row] = self.sequences[-1]
        self.sequences.pop()

    def run(self, sequences: list[Sequence]) -> list[list[int]]:
        """Decode `sequences` to their max_new_tokens, at most max_batch at a time, each joining as a row frees:
        the plain loop the server's scheduler elaborates. Returns each one's new tokens."""
        waiting = list(sequences)
        while waiting or self.sequences:
            while waiting and len(self.sequences) < self.max_batch:
                seq = waiting.pop(0)
                self.join(seq)
                if len(seq.tokens) >= seq.max_new_tokens:
                    self.leave(seq)
            self.step()
            for seq in [s for s in self.sequences if len(s.tokens) >= s.max_new_tokens]:
                self.leave(seq)
        return [s.tokens for s in sequences]


__all__ = ["BatchDecoder", "LogitsMask", "Sequence"]
