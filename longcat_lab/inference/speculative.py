"""Self-speculative decoding with the MTP module (paper 2.4, 6.1.2; docs/design.md §6.2): the model's own MTP drafts
one token, and one forward of the main model over [pending token ; draft] against the latent cache both checks the
draft and gives the token after it. LongCat-Flash serves with the same single draft token.

One cycle, with the main cache holding positions 0..L-1 and the pending token x_L known but not yet fed:
    draft   d ~ MTP(norm(h_{L-1}), x_L)                      (the MTP's output at position L-1, predicting x_{L+1})
    verify  logits_L, logits_{L+1} = main([x_L ; d])          (positions L and L+1, one forward, absorbed MLA)
    accept  x_{L+1} = d if accepted, then x_{L+2} ~ logits_{L+1} (two tokens from one main forward)
    reject  x_{L+1} ~ the corrected distribution; the cache forgets position L+1 (`LatentCache.truncate`)
The MTP then reads the verified hidden states and tokens (one or two positions) and drafts again. Its own cache slot
only ever receives verified inputs, so it never rolls back.

Greedy (temperature 0): accepted iff d equals the main model's argmax, so the output is plain greedy's. Sampling:
the standard rule (Leviathan et al. 2023; Chen et al. 2023) keeps the main model's distribution exactly: accept d
with probability min(1, p(d) / q(d)), else draw from max(0, p - q) renormalised (`accept_or_resample`), p and q
being the main model's and the MTP's `next_token_probs` at the same temperature and top-p.

Batch 1 only: with a batch, sequences would accept different numbers of tokens and their caches would go ragged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from longcat_lab.inference.generate import check_generation, next_token_probs
from longcat_lab.model.cache import LatentCache
from longcat_lab.model.model import LongCatLM
from longcat_lab.model.mtp import mtp_logits


@dataclass
class SpeculativeStats:
    """What a speculative run did: `accepted` has one entry per verification (True where the draft was accepted),
    `from_draft` one per generated token (True where the token is an accepted draft; the others are the main
    model's own: the first token, a correction after a rejection, the token after an accepted draft)."""

    accepted: list[bool] = field(default_factory=list)
    from_draft: list[bool] = field(default_factory=list)

    @property
    def drafted(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafts (nan before the first draft)."""
        return sum(self.accepted) / self.drafted if self.accepted else float("nan")

    @property
    def tokens_per_forward(self) -> float:
        """Tokens the main model produced per verification forward: 1 + acceptance rate."""
        return 1.0 + self.acceptance_rate


def accept_or_resample(
    p_BV: torch.Tensor, q_BV: torch.Tensor, draft_B1: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule for drafts drawn from q: keep draft d with probability min(1, p(d) / q(d)),
    else draw from max(0, p - q) renormalised; the result is distributed as p whatever q is. p and q ([B, V]) need
    not be normalised. Returns (tokens [B, 1], accepted [B] bool)."""
    p = p_BV / p_BV.sum(-1, keepdim=True)
    q = q_BV / q_BV.sum(-1, keepdim=True)
    p_d, q_d = p.gather(-1, draft_B1), q.gather(-1, draft_B1)
    u = torch.rand(q_d.shape, generator=generator, dtype=q_d.dtype, device=q_d.device)
    accepted = (u * q_d < p_d).squeeze(-1)  # u < p(d)/q(d), without dividing (q(d) > 0 for a drawn d)
    residual = (p - q).clamp_min(0)
    # p == q leaves no residual mass, and then a rejection never happens: draw from p to keep shapes simple.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    resampled = torch.multinomial(residual, 1, generator=generator)
    return torch.where(accepted[:, None], draft_B1, resampled), accepted


def _choose(
    logits_BV: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A token from logits (argmax at temperature 0, else a draw) and the weights it was drawn from (or None)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1, keepdim=True), None
    probs = next_token_probs(logits_BV, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator), probs


def _forward(model: LongCatLM, ids: torch.Tensor, cache: LatentCache) -> tuple[torch.Tensor, torch.Tensor]:
    """The main model's logits and its normed last hidden states (what its LM head and the MTP read), taken from
    the final norm's output by a hook: asking `forward` for the routing record instead would build one per layer."""
    seen = []
    handle = model.norm.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        logits = model.forward(ids, cache=cache, validate=False).logits
    finally:
        handle.remove()
    return logits, seen[-1]


@torch.inference_mode()
def speculative_stream(
    model: LongCatLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stats: SpeculativeStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each new token ([1, 1]) as `stream` does, decoding with the model's MTP module as the draft (one
    token per cycle). `stats` (a `SpeculativeStats`) records each draft's fate. Needs a model with
    num_nextn_predict_layers=1 and a batch of one sequence."""
    check_generation(model, idx, max_new_tokens, temperature, top_p)
    if model.mtp is None:
        raise ValueError("speculative decoding needs the model's MTP module: build it with num_nextn_predict_layers=1")
    if idx.shape[0] != 1:
        raise ValueError(f"idx has batch size {idx.shape[0]}: speculative decoding takes one sequence (batch 1)")
    if max_new_tokens == 0:
        return
    stats = stats if stats is not None else SpeculativeStats()
    greedy = temperature == 0
    main_blocks = range(2 * model.config.num_layers)
    was_training = model.training
    model.eval()
    try:
        # One slot more than plain decoding: the MTP's attention (docs/design.md §6.2). A draft is only verified
        # while a token is still wanted, so no position past the last one is ever written.
        cache = LatentCache(len(main_blocks) + 1, idx.shape[1] + max_new_tokens, model.decoding_weights)
        logits, hidden = _forward(model, idx.long(), cache)
        pending, _ = _choose(logits[:, -1], temperature, top_p, generator)
        stats.from_draft.append(False)
        yield pending
        left = max_new_tokens - 1
        # The MTP reads every prompt position: hidden state j with token j+1 (the last one the pending token).
        mtp_in = torch.cat([idx[:, 1:].long(), pending], dim=1)
        draft_logits = mtp_logits(model, hidden, mtp_in, cache)[:, -1]
        while left:
            draft, q = _choose(draft_logits, temperature, top_p, generator)
            length = cache.seq_len
            logits, hidden = _forward(model, torch.cat([pending, draft], dim=1), cache)  # hidden [1, 2, D]
            if greedy:
                token = logits[:, 0].argmax(dim=-1, keepdim=True)
                accepted = bool(token == draft)
            else:
                token, ok = accept_or_resample(next_token_probs(logits[:, 0], temperature, top_p), q, draft, generator)
                accepted = bool(ok)
            stats.accepted.append(accepted)
            if not accepted:
                cache.truncate(length + 1, main_blocks)  # position L+1 held the rejected draft
            stats.from_draft.append(accepted)
            yield token
            left -= 1
            if left == 0:
                break
            if accepted:
                pending, _ = _choose(logits[:, 1], temperature, top_p, generator)
                stats.from_draft.append(False)
                yield pending
                left -= 1
                if left == 0:
                    break
                draft_logits = mtp_logits(model, hidden, torch.cat([token, pending], dim=1), cache)[:, -1]
            else:
                pending = token
                draft_logits = mtp_logits(model, hidden[:, :1], token, cache)[:, -1]
    finally:
        nn.Module.train(model, was_training)  # not model.train: keep the decoding weights for the next call


@torch.no_grad()
def speculative_generate(
    model: LongCatLM, idx: torch.Tensor, max_new_tokens: int, **options
) -> tuple[torch.Tensor, SpeculativeStats]:
    """idx followed by max_new_tokens tokens ([1, S + max_new_tokens]) and the run's `SpeculativeStats`. Options
    (`temperature`, `top_p`, `generator`) as in `speculative_stream`."""
    stats = SpeculativeStats()
    tokens = list(speculative_stream(model, idx, max_new_tokens, stats=stats, **options))
    return torch.cat([idx.long(), *tokens], dim=1), stats


__all__ = ["SpeculativeStats", "accept_or_resample", "speculative_generate", "speculative_stream"]
