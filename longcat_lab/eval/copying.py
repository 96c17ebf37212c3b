"""In-context copying (docs/design.md §3.5): does a model repeat a span it has already seen? It is the skill behind an
agent's arguments, an id, an e-mail or a postcode copied from earlier in the conversation.

`copy_score(model)` shows a span of random token ids, then `gap` other random ids, then the same span again. A model
that copies predicts the second showing from the first: its loss there falls towards 0 and its top-1 towards 1. A
model that does not copy predicts the second showing no better than the first. This is the repeated-random-tokens
test by which induction heads are found (Olsson et al., 2022, "In-context learning and induction heads"). The first
token of each showing is not scored, since nothing in the sequence predicts it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longcat_lab._util import check_int

SPAN = 32
GAPS = (0, 256)
ROWS = 8


@torch.no_grad()
def copy_score(model, span: int = SPAN, gaps: tuple[int, ...] = GAPS, rows: int = ROWS, seed: int = 0) -> dict:
    """Per gap (a str key): the mean loss (nats) on the first and the second showing, and the second showing's top-1
    accuracy. Token ids are drawn uniformly from the lower 7/8 of the vocabulary (clear of special tokens, which a
    tokenizer puts last); a gap that does not fit the model's context is skipped."""
    check_int("span", span, 2)
    check_int("rows", rows)
    vocab, limit = model.config.vocab_size, model.config.max_position_embeddings
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = {}
    try:
        for gap in gaps:
            check_int("gap", gap, 0)
            if 2 * span + gap > limit:
                continue
            first = torch.randint(0, vocab * 7 // 8, (rows, span), generator=g)
            filler = torch.randint(0, vocab * 7 // 8, (rows, gap), generator=g)
            seq = torch.cat([first, filler, first], dim=1).to(model.device)
            logits = model(seq[:, :-1]).logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), seq[:, 1:], reduction="none")
            second = slice(span + gap, 2 * span + gap - 1)  # predictions of the second showing's tokens 2..span
            hits = logits[:, second].argmax(-1) == seq[:, second.start + 1 : second.stop + 1]
            out[str(gap)] = {
                "first_loss": float(nll[:, : span - 1].mean()),
                "second_loss": float(nll[:, second].mean()),
                "second_top1": float(hits.float().mean()),
            }
    finally:
        model.train(was_training)
    return out


def format_copying(score: dict) -> str:
    """One line: per gap, the loss on the first and second showing and the second's top-1."""
    parts = [
        f"gap {gap}: loss {s['first_loss']:.2f} -> {s['second_loss']:.2f}, top-1 {s['second_top1']:.2f}"
        for gap, s in score.items()
    ]
    return "copying a repeated random span (first -> second showing): " + "; ".join(parts)


__all__ = ["GAPS", "ROWS", "SPAN", "copy_score", "format_copying"]
