"""Training: configs and the `--set` overrides, the trainer, its parallelism strategies and telemetry, what a
resume checks, the expert-bias controller, auxiliary losses, routing metrics, growth init and fine-tuning
(`train.sft`). Submodules stay importable by name (`from longcat_lab.train import growth`); checkpoints are
`longcat_lab.checkpoint`; the figures of a run are in `longcat_lab.viz.training`."""

from longcat_lab.train.config import SFTConfig, StageConfig, TrainConfig, train_preset
from longcat_lab.train.evaluation import evaluate, sample_text
from longcat_lab.train.overrides import apply_overrides
from longcat_lab.train.results import TrainingError, TrainResult
from longcat_lab.train.telemetry import read_metrics
from longcat_lab.train.trainer import Trainer, train

__all__ = [
    "train",
    "Trainer",
    "TrainResult",
    "TrainConfig",
    "SFTConfig",
    "StageConfig",
    "train_preset",
    "apply_overrides",
    "TrainingError",
    "evaluate",
    "sample_text",
    "read_metrics",
]
