"""Continuous batching (docs/design.md §7.2): `BatchDecoder` decodes many sequences together, one forward per step
over every active sequence, while sequences join and leave between steps.

Sequences join with their prompts prefilled together in one forward (`join_many`: the prompts right-padded into one
`LatentCache`; causal attention keeps every real position from seeing the padding after it, and the MoE routes each
token on its own, so each prompt's positions come out as they would alone) and copied into rows of the shared
`BatchLatentCache`; from then on each `step` feeds every row its last token at that row's own position. Rows of
different lengths are padded and the padding masked, RoPE rotates each row by its own position, and the MoE routes each
token as always, so a sequence decodes what it would decode alone (up to float rounding of the batched matmuls). A
finished sequence `leave`s at once and its row is reused.

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

    def check(self, seq: Sequence) -> None:
        """The one-line error `generate` would raise for `seq`'s prompt and settings, if any."""
        idx = torch.tensor([seq.prompt], dtype=torch.long, device=self.model.device)
        check_generation(self.model, idx, seq.max_new_tokens, seq.temperature, seq.top_p)

    def join(self, seq: Sequence) -> int:
        """Prefill `seq`'s prompt, add it to the batch and return its first new token."""
        return self.join_many([seq])[0]

    @torch.inference_mode()
    def join_many(self, seqs: list[Sequence]) -> list[int]:
        """Prefill the prompts of `seqs` in one forward, add them to the batch and return each one's first new token.
        Every prompt is checked before any joins: a bad one joins none."""
        if len(self.sequences) + len(seqs) > self.max_batch:
            raise ValueError(
                f"the batch is full: {len(self.sequences)} sequences + {len(seqs)} joining (max_batch={self.max_batch})"
            )
        for seq in seqs:
            self.check(seq)
        if not seqs:
            return []
        T = max(len(s.prompt) for s in seqs)
        idx = torch.zeros(len(seqs), T, dtype=torch.long, device=self.model.device)  # right padding: id 0, unseen
        for i, seq in enumerate(seqs):
            idx[i, : len(seq.prompt)] = torch.tensor(seq.prompt, dtype=torch.long)
        prefill = LatentCache(2 * self.model.config.num_layers, T, self.model.decoding_weights)
        # One prompt needs only its last position's logits; padded prompts each need their own last position.
        logits = self.model(idx, cache=prefill, logits_to_keep=1 if len(seqs) == 1 else 0, validate=False).logits
        tokens = []
        for i, seq in enumerate(seqs):
            self.cache.add(prefill, i, len(seq.prompt))
            self.sequences.append(seq)
            # Counted from the end (T - len(prompt) padding positions follow the last one): right whether the
            # forward kept every position or only the last.
            tokens.append(self._sample(seq, logits[i : i + 1, len(seq.prompt) - T - 1]))
        return tokens

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
        """Decode `sequences` to their max_new_tokens, at most max_batch at a time, joining (prefilled together) as
        rows free: the plain loop the server's scheduler elaborates. Returns each one's new tokens."""
        waiting = list(sequences)
        while waiting or self.sequences:
            joining = waiting[: self.max_batch - len(self.sequences)]
            del waiting[: len(joining)]
            self.join_many(joining)
            for seq in [s for s in joining if len(s.tokens) >= s.max_new_tokens]:
                self.leave(seq)
            self.step()
            for seq in [s for s in self.sequences if len(s.tokens) >= s.max_new_tokens]:
                self.leave(seq)
        return [s.tokens for s in sequences]


__all__ = ["BatchDecoder", "LogitsMask", "Sequence"]
