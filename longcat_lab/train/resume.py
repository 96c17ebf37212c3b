"""What a resume reads back and checks, as functions of files and configs (the trainer's `_resume` loads the states
through `checkpoint.load_states`):

- `newest_good_checkpoint(run_dir)`: the newest checkpoint that verifies, newer damaged ones moved aside;
- `config_diffs(ckpt, model_config, train_config)`: what differs from the configs a checkpoint was written with,
  the fields marked `FREE_ON_RESUME` left out (a resume refuses any other difference);
- `read_train_config(ckpt, cls)`: a checkpoint's train_config.json as `cls` (TrainConfig or SFTConfig);
- `read_trainer_state(ckpt)`: its trainer_state.pt, {state name: state dict}; one written before the trainer's
  `Progress` was an entry of its own (its step and counters at the top level) is read into today's layout.

Every file here is one we may not have written: a wrong type is a one-line CheckpointError naming the file and the
field, never another kind of error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from longcat_lab import checkpoint
from longcat_lab.checkpoint import CheckpointError
from longcat_lab.checkpoint.layout import one_line
from longcat_lab.model.config import ModelConfig
from longcat_lab.train.config import TrainConfig, resume_free_fields
from longcat_lab.train.results import TrainingError
from longcat_lab.train.telemetry import to_json

log = logging.getLogger(__name__)

# `Progress`'s entries, which trainer_state.pt held at its top level before they moved under "trainer".
PROGRESS_KEYS = ("step", "scheduler", "counters", "val_loss", "val_step")
# DataConfig.cache_dir only says where the data cache lives: any value gives the same data.
_FREE_ANYWHERE = frozenset({"cache_dir"})


def read_train_config(ckpt: str | os.PathLike, cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    path = Path(ckpt) / "train_config.json"
    try:
        return cls.from_dict(checkpoint.read_json(path))
    except CheckpointError:
        raise
    except (ValueError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{path}: not a valid {cls.__name__} ({one_line(err)})") from None


def _config_diff(saved: Any, now: Any, free: frozenset[str], prefix: str = "") -> list[str]:
    """'field: old -> new' for every difference that matters for a resume (nested configs and stages walked)."""
    if isinstance(saved, dict) and isinstance(now, dict) and prefix[-9:] != "mixture.":
        diffs = []
        for k in sorted(set(saved) | set(now)):
            if (not prefix and k in free) or k in _FREE_ANYWHERE:
                continue
            diffs += _config_diff(saved.get(k), now.get(k), free, f"{prefix}{k}.")
        return diffs
    if (
        isinstance(saved, list)
        and isinstance(now, list)
        and len(saved) == len(now)
        and saved
        and isinstance(saved[0], dict)
    ):
        return [d for i, (a, b) in enumerate(zip(saved, now)) for d in _config_diff(a, b, free, f"{prefix}{i}.")]
    a, b = (to_json(v, sort_keys=True) for v in (saved, now))
    return [] if a == b else [f"{prefix[:-1]}: {a} -> {b}"]


def config_diffs(
    ckpt: str | os.PathLike, model_config: ModelConfig, train_config: TrainConfig, strict: bool = False
) -> list[str]:
    """The differences between checkpoint `ckpt`'s configs and these, without the fields a resume may change
    (`strict`: with them, to ask whether a finished run is the run these configs describe). Both files are read
    through their dataclass, so a field added since the checkpoint was written holds its default there and only
    real differences count."""
    saved_cfg = read_train_config(ckpt, type(train_config)).to_dict()
    saved_model = checkpoint.read_model_config(ckpt).to_dict()
    free = frozenset() if strict else resume_free_fields(type(train_config))
    return _config_diff(saved_cfg, train_config.to_dict(), free) + [
        f"model.{d}" for d in _config_diff(saved_model, model_config.to_dict(), frozenset())
    ]


def read_trainer_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    saved = checkpoint.read_trainer_state(ckpt)
    if "trainer" not in saved and "step" in saved:
        rest = {k: v for k, v in saved.items() if k not in PROGRESS_KEYS}
        return {**rest, "trainer": {k: saved[k] for k in PROGRESS_KEYS if k in saved}}
    return saved


def newest_good_checkpoint(run_dir: Path, move_bad: bool = True) -> Path:
    """The newest checkpoint of `run_dir` that verifies; newer, damaged ones are moved aside (`move_bad`; never
    deleted), each with a one-line warning. None verifying is a TrainingError that changes nothing."""
    good, bad = checkpoint.newest_verified(run_dir)
    if good is None:
        raise TrainingError(
            f"cannot resume {run_dir}: none of its checkpoints verifies (newest: {bad[0][1]}); nothing "
            "was changed: repair or move them, or start a new --out"
        )
    for ckpt, err in bad if move_bad else ():
        moved = checkpoint.move_aside(ckpt)
        log.warning("%s fails verification (%s): moved to %s; resuming from %s", ckpt.name, err, moved, good.name)
    return good


__all__ = ["config_diffs", "newest_good_checkpoint", "read_train_config", "read_trainer_state"]
