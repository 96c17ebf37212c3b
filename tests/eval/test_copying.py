"""Tests of the in-context copying score (`longcat_lab.eval.copying`) on a rule that copies and on a random model.
Run: .venv/bin/python -m pytest tests/eval/test_copying.py"""

import types

import pytest
import torch

from longcat_lab.eval.copying import copy_score, format_copying
from longcat_lab.testing import random_model


class InductionRule(torch.nn.Module):
    """Predicts, at each position, the token that followed the last earlier occurrence of the current token (the
    induction-head rule), and nothing in particular where the token is new."""

    def __init__(self, vocab: int = 4096, context: int = 512):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=vocab, max_position_embeddings=context)
        self.device = torch.device("cpu")

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.config.vocab_size)
        for b in range(x.shape[0]):
            last = {}
            for i, token in enumerate(x[b].tolist()):
                if token in last:
                    logits[b, i, x[b, last[token] + 1]] = 30.0
                last[token] = i
        return types.SimpleNamespace(logits=logits)


def test_a_model_that_copies_predicts_the_second_showing():
    score = copy_score(InductionRule(), span=16, gaps=(0, 64))
    for s in score.values():
        assert s["second_top1"] > 0.9 and s["second_loss"] < 1.0 and s["first_loss"] > 5.0
    assert set(score) == {"0", "64"}
    assert "gap 64: loss" in format_copying(score)


def test_a_random_model_does_not_copy_and_long_gaps_are_skipped():
    model = random_model(seed=0)  # the tiny preset: a 512-token context
    score = copy_score(model, span=16, gaps=(0, 600))
    assert set(score) == {"0"}  # 16 + 600 + 16 positions do not fit
    s = score["0"]
    assert s["second_top1"] < 0.1 and abs(s["second_loss"] - s["first_loss"]) < 0.5
    assert not model.training  # evaluated in eval mode, and left as it was
    with pytest.raises(ValueError, match="span=1"):
        copy_score(model, span=1)
