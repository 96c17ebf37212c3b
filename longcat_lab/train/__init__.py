"""Training: configs and the `--set` overrides, the trainer and its telemetry, checkpoints, the expert-bias
controller, auxiliary losses, routing metrics and growth init. Submodules stay importable by name
(`from longcat_lab.train import checkpoint`); the figures of a run are in `longcat_lab.viz.training`."""

from longcat_lab.train.config import StageConfig, TrainConfig, train_preset
from longcat_lab.train.evaluation import evaluate, sample_text
from longcat_lab.train.overrides import apply_overrides
from longcat_lab.train.telemetry import read_metrics
from longcat_lab.train.trainer import Trainer, TrainingError, TrainResult, train

__all__ = [
    "train",
    "Trainer",
    "TrainResult",
    "TrainConfig",
    "StageConfig",
    "train_preset",
    "apply_overrides",
    "TrainingError",
    "evaluate",
    "sample_text",
    "read_metrics",
]
