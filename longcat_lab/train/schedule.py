"""The training schedule of a list of `StageConfig`s: which stage a step is in (`stage_at`), its learning rate (`lr_at`:
warmup, then cosine per stage) and every-n-steps cadences (`every`). Plain arithmetic on the configs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from longcat_lab.train.config import StageConfig


def stage_at(stages: Sequence[StageConfig], step: int) -> tuple[int, int]:
    """(stage index, step within the stage) for the 0-based optimizer step `step`."""
    start = 0
    for i, s in enumerate(stages):
        if step < start + s.steps:
            return i, step - start
        start += s.steps
    return len(stages) - 1, stages[-1].steps - 1


def every(n: int, step: int) -> bool:
    """Whether the 1-based optimizer step `step` is one of an every-`n`-steps schedule (`n=0`: never)."""
    return bool(n) and step % n == 0


def lr_at(stages: Sequence[StageConfig], step: int) -> float:
    """LR of the 0-based optimizer step `step`: within a stage, linear warmup from the previous stage's final LR
    (0 before the first stage) to the stage's lr, then cosine down to end_lr_ratio * lr at the stage's last step."""
    i, j = stage_at(stages, step)
    s = stages[i]
    prev_end = 0.0 if i == 0 else stages[i - 1].lr * stages[i - 1].end_lr_ratio
    if j < s.warmup:
        return prev_end + (s.lr - prev_end) * (j + 1) / s.warmup
    span = s.steps - s.warmup - 1
    progress = (j - s.warmup) / span if span > 0 else 1.0
    end = s.lr * s.end_lr_ratio
    return end + (s.lr - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = ["every", "lr_at", "stage_at"]
