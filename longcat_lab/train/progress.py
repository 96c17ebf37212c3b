"""How far a run has come, as the `Stateful` objects the trainer hands a checkpoint beside its optimizer, controller,
sampler and RNG (torchtitan's `TrainState`):

- `Progress`: the step, the counters (tokens seen, skipped steps, SDC mismatches) and the last evaluation; the
  "trainer" entry of trainer_state.pt.
- `RouterCounts`: the routers' token counts of a step in progress (non-persistent buffers, so not in the model's
  weights); the "expert_counts" entry.

A trainer_state.pt is a file we may not have written: `load_state_dict` checks every type and raises a ValueError
naming the key, which the checkpoint code reports with the file's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from longcat_lab.model.model import LongCatLM
from longcat_lab.train.config import StageConfig
from longcat_lab.train.schedule import lr_at

COUNTERS = ("skipped_total", "consecutive_skips", "sdc_mismatches", "tokens_seen")


def _count(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name}={v!r} is not allowed: it must be an integer >= 0")
    return v


def check_progress(state: Any) -> dict[str, Any]:
    """A saved `Progress.state_dict` with its types checked: a ValueError naming the key otherwise."""
    if not isinstance(state, dict):
        raise ValueError(f"trainer={type(state).__name__} is not allowed: it must be a dict")
    missing = [k for k in ("step", "counters", "val_loss", "val_step") if k not in state]
    if missing:
        raise ValueError(f"the trainer entry has no {missing}")
    _count("trainer.step", state["step"])
    counters = state["counters"]
    if not isinstance(counters, dict):
        raise ValueError(f"trainer.counters={counters!r} is not allowed: it must be a dict of {list(COUNTERS)}")
    for k in COUNTERS:
        _count(f"trainer.counters.{k}", counters.get(k))
    val_loss = state["val_loss"]
    numbers = isinstance(val_loss, dict) and all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in val_loss.items()
    )
    if not numbers:
        raise ValueError(f"trainer.val_loss={val_loss!r} is not allowed: it must map domains to numbers")
    if state["val_step"] is not None:
        _count("trainer.val_step", state["val_step"])
    return state


@dataclass
class Progress:
    """Where a run stands after `step` optimizer steps of the schedule `stages`."""

    stages: Sequence[StageConfig]
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    skipped_total: int = 0  # steps skipped for a non-finite loss or gradient ...
    consecutive_skips: int = 0  # ... and how many of the last ones in a row
    sdc_mismatches: int = 0
    val_loss: dict[str, float] = field(default_factory=dict)  # the last evaluation, per domain
    val_step: int | None = None  # the step it was taken at

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "scheduler": {"step": self.step, "lr": lr_at(self.stages, max(0, self.step - 1))},
            "counters": {k: getattr(self, k) for k in COUNTERS},
            "val_loss": dict(self.val_loss),
            "val_step": self.val_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = check_progress(state)
        for k in COUNTERS:
            setattr(self, k, state["counters"][k])
        self.val_loss, self.val_step = dict(state["val_loss"]), state["val_step"]
        self.step = state["step"]


class RouterCounts:
    """The tokens each router counted since the controller's last update. A step's counts are summed over every
    rank into rank 0's before a save, so on resume the other ranks (`is_main` False) start from zero."""

    def __init__(self, model: LongCatLM, is_main: bool = True):
        self.model, self.is_main = model, is_main

    def state_dict(self) -> list[torch.Tensor]:
        return [b.router.expert_counts.cpu().clone() for b in self.model.moe_blocks()]

    @torch.no_grad()
    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        blocks = self.model.moe_blocks()
        if not (isinstance(state, list) and all(isinstance(c, torch.Tensor) for c in state)):
            raise ValueError("expert_counts is not allowed: it must be a list of tensors (one per MoE block)")
        if len(state) != len(blocks):
            raise ValueError(f"expert_counts holds {len(state)} tensors: this model has {len(blocks)} MoE blocks")
        for b, counts in zip(blocks, state):
            b.router.expert_counts.copy_(counts if self.is_main else torch.zeros_like(counts))


__all__ = ["COUNTERS", "Progress", "RouterCounts", "check_progress"]
