"""What a training run gives back: a `TrainResult`, or a `TrainingError` saying in one line why it could not go on
(too many non-finite steps, an incompatible resume, a run folder held by another writer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_lab.data import Dataset
from longcat_lab.model.model import LongCatLM
from longcat_lab.train.telemetry import read_metrics


class TrainingError(RuntimeError):
    """Training cannot continue (too many non-finite steps, an incompatible resume); the message says why."""


@dataclass(kw_only=True)
class TrainResult:
    run_dir: Path
    model: LongCatLM
    tokenizer: Any
    dataset: Dataset
    step: int  # optimizer steps done (= total_steps unless stopped early)
    val_loss: dict[str, float]  # the last evaluation, per domain
    checkpoint: Path  # the checkpoint written at `step`
    skipped_steps: int
    alert_counts: dict[str, int]
    sdc_mismatches: int
    resumed_from: int | None  # the step a resume continued from

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path, kind)


__all__ = ["TrainResult", "TrainingError"]
