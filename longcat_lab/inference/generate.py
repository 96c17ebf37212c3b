"""Autoregressive generation (docs/design.md §10): `stream` yields tokens one at a time, `generate` collects them,
`sample_next` picks each token (greedy or top-p): `generate(model, idx, max_new_tokens)`.

Decoding goes through the model's own `forward`: the prompt once, filling a `LatentCache`, then one position per
step against the cache, in which each MLA block takes its absorbed step and the MoE its few-token expert path
(`longcat_lab.model.attention`, `longcat_lab.model.moe`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from longcat_lab._util import check_int, check_nonnegative
from longcat_lab.model.cache import LatentCache
from longcat_lab.model.model import LongCatLM


class Constraint(Protocol):
    """A per-sequence rule on which tokens may come next (`inference.structured.ToolCallConstraint`): `mask` returns
    the logits of one row ([vocab]) with forbidden tokens at -inf, `advance` is told the token that was sampled."""

    def mask(self, logits_V: torch.Tensor) -> torch.Tensor: ...

    def advance(self, token: int) -> None: ...


@torch.inference_mode()
def stream(
    model: LongCatLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    return_logits: bool = False,
    constraints: Sequence[Constraint | None] | None = None,
) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Yield each new token ([B, 1]) as it is decoded; greedy at temperature 0, else top-p sampling. With
    return_logits=True yield (token, logits [B, vocab] in fp32, before temperature) instead. `constraints` (one
    per row, None for a free row) mask each row's logits before sampling and are told each sampled token; the
    yielded logits are then the masked ones.

    With the cache, the prompt goes through `forward` once, filling the latent cache, and every later token is one
    more `forward` of that single position against the cache: the wiring is `LongCatLayer.forward`'s own. Without
    the cache every step recomputes the whole sequence (the slow, obviously-correct reference). Runs in inference
    mode (cheaper per op than no_grad), so the yielded tensors are inference tensors: clone one before modifying it
    in place outside inference mode. The prompt is checked once; later steps skip `forward`'s id checks (their
    host syncs), since generated ids are in range by construction."""
    check_generation(model, idx, max_new_tokens, temperature, top_p)
    if constraints is not None and len(constraints) != idx.shape[0]:
        raise ValueError(f"constraints has {len(constraints)} entries: it needs one per row of idx ({idx.shape[0]})")
    was_training = model.training
    model.eval()
    try:
        # A fresh cache per call, lending the model's decoding weights (rebuilt where a weight has changed).
        cache = (
            LatentCache(2 * model.config.num_layers, idx.shape[1] + max_new_tokens, model.decoding_weights)
            if use_cache
            else None
        )
        seq = inputs = idx.long()
        for _ in range(max_new_tokens):
            logits = model.forward(inputs, cache=cache, logits_to_keep=1, validate=False).logits[:, -1]
            if constraints is not None:
                logits = torch.stack([c.mask(row) if c is not None else row for c, row in zip(constraints, logits)])
            token = sample_next(logits, temperature, top_p, generator)
            if constraints is not None:
                for c, t in zip(constraints, token[:, 0].tolist()):
                    if c is not None:
                        c.advance(t)
            yield (token, logits) if return_logits else token
            if cache is None:
                seq = inputs = torch.cat([seq, token], dim=1)
            else:
                inputs = token
    finally:
        nn.Module.train(model, was_training)  # not model.train: keep the decoding weights for the next call


def check_generation(
    model: LongCatLM, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_p: float
) -> None:
    """The argument checks every generation loop makes (`stream`, `inference.speculative`), as one-line errors."""
    check_int("max_new_tokens", max_new_tokens, 0)
    check_nonnegative("temperature", temperature)
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is not allowed: it must be in (0, 1]")
    model.check_ids("idx", idx)
    limit = model.config.max_position_embeddings
    if idx.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {idx.shape[1]} + max_new_tokens={max_new_tokens} exceeds max_position_embeddings={limit}"
        )


@torch.no_grad()
def generate(
    model: LongCatLM, idx: torch.Tensor, max_new_tokens: int, *, return_logits: bool = False, **options
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Return idx followed by max_new_tokens decoded tokens ([B, S + max_new_tokens]); with return_logits=True
    also the logits each token was drawn from ([B, max_new_tokens, vocab], fp32). Other options as in `stream`."""
    steps = list(stream(model, idx, max_new_tokens, return_logits=return_logits, **options))
    tokens = [s[0] for s in steps] if return_logits else steps
    ids = torch.cat([idx.long(), *tokens], dim=1)
    if not return_logits:
        return ids
    vocab = model.config.vocab_size
    logits = torch.stack([s[1] for s in steps], dim=1) if steps else ids.new_zeros(ids.shape[0], 0, vocab).float()
    return ids, logits


def sample_next(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Greedy argmax at temperature 0; otherwise sample from the smallest set of tokens whose probability mass
    reaches top_p (always at least the most likely one). Returns [B, 1] token ids."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True)
    return torch.multinomial(next_token_probs(logits_BV, temperature, top_p), 1, generator=generator)


def next_token_probs(logits_BV: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The weights `sample_next` draws from at temperature > 0 ([B, vocab], fp32): softmax at `temperature`, cut to
    the top-p nucleus, not renormalised (torch.multinomial does that). Speculative sampling compares two of these."""
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then sends the others to -inf (a
    # near-greedy draw) instead of overflowing every logit to inf and the softmax to NaN.
    logits = logits_BV.float()
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # The most likely token always stays: a top_p below float32's smallest value would otherwise drop it too.
        drop = mass_before >= top_p
        drop[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)
    return probs
