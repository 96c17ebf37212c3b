"""What a checkpoint folder holds, and the readers and writers of its small files.

A run folder holds `checkpoints/step_000123/` folders, each with
- `model.safetensors`  the model's state dict (parameters and the persistent expert-bias buffers);
- `config.json`        the `ModelConfig`;
- `train_config.json`  the training config that produced it (the trainer's to write and to read back);
- `tokenizer.json`     the BPE tokenizer, so a checkpoint samples text on its own;
- `trainer_state.pt`   one entry per object saved beside the model (optimizer, controller, data position, RNG, the
                       trainer's counters: `checkpoint.save`'s `states`), loaded with weights_only;
- `meta.json`          written last: step, seed, versions, validation loss, and the size and sha256 of every other
                       file, so a truncated or corrupted file is caught by name before anything is loaded
                       (`checkpoint.verify`).

A checkpoint saved by several ranks has `dcp/` (torch.distributed.checkpoint: one file per rank and `.metadata`) in
place of model.safetensors and says `"layout": "dcp"` in meta.json (`checkpoint.sharded`).

Every reader here turns a file that is not what it should be into a one-line `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from longcat_lab._util import json_bytes
from longcat_lab.model.config import ModelConfig

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
FILES = ("model.safetensors", "config.json", "train_config.json", "tokenizer.json", TRAINER_STATE)
SHARDED = "dcp"
SHARDED_FILES = ("dcp/.metadata", *FILES[1:])
META = "meta.json"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line and names the bad file."""


def one_line(err: BaseException) -> str:
    """An exception's text on one line (torch's and safetensors' messages may span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_sharded(ckpt: str | os.PathLike) -> bool:
    """Whether a checkpoint folder was saved by several ranks (weights in `dcp/`, not model.safetensors)."""
    return (Path(ckpt) / SHARDED / ".metadata").is_file()


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from `path`; a CheckpointError naming the file when it is not one (an OSError, e.g. a file
    rotated away meanwhile, passes through)."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not valid JSON (truncated or corrupted)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data


def read_model_config(ckpt: str | os.PathLike) -> ModelConfig:
    path = Path(ckpt) / "config.json"
    try:
        return ModelConfig.from_dict(read_json(path))
    except CheckpointError:
        raise
    except (ValueError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{path}: not a valid ModelConfig ({one_line(err)})") from None


def read_trainer_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    """trainer_state.pt: {state name: that object's state dict}."""
    path = Path(ckpt) / TRAINER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a dict of states")
    return state


def write_files(
    folder: Path, config: ModelConfig, tokenizer, train_config: dict[str, Any], trainer_state: dict[str, Any]
) -> None:
    """Every file of a checkpoint but the weights and meta.json."""
    (folder / "config.json").write_bytes(json_bytes(config.to_dict()))
    (folder / "train_config.json").write_bytes(json_bytes(train_config))
    (folder / "tokenizer.json").write_text(tokenizer.to_str())
    torch.save(trainer_state, folder / TRAINER_STATE)
