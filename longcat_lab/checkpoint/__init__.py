"""Checkpoints: one folder per checkpoint (nanochat's checkpoint_manager layout), written atomically, verified on
load, holding a model and a dict of states (torchtitan's `Stateful` way), so that this package knows nothing of the
trainer that hands them over.

- `layout`: what a checkpoint folder holds (model.safetensors or a sharded dcp/, config.json, train_config.json,
  tokenizer.json, trainer_state.pt, meta.json) and the readers of its small files; `CheckpointError`.
- `folders`: a run's checkpoints: `list_checkpoints`, `latest`, `resolve`, `rotate`, `move_aside`.
- `integrity`: meta.json's checksums: `verify`, `newest_verified`.
- `states`: `state_dicts`, `load_state_dicts`, `RNGState`.
- `store`: `save` (one process, or every rank with a `Sharding`), `load` (model, tokenizer, meta), `load_states`
  (a resume), `load_model_state`.
- `sharded`: the torch.distributed.checkpoint layout, which reshards between any numbers of ranks (`Sharding`,
  `load_into`).

Usage: `checkpoint.save(run_dir, step, model, tokenizer, train_config.to_dict(), states={"optimizer": opt,
"controller": controller, ...}, meta={...})`; `model, tokenizer, meta = checkpoint.load(run_dir)`.
"""

from longcat_lab.checkpoint.folders import latest, list_checkpoints, move_aside, prepare_folder, resolve, rotate
from longcat_lab.checkpoint.integrity import newest_verified, read_meta, verify
from longcat_lab.checkpoint.layout import (
    CHECKPOINTS,
    FILES,
    FORMAT,
    META,
    SHARDED,
    SHARDED_FILES,
    TRAINER_STATE,
    CheckpointError,
    is_sharded,
    read_json,
    read_model_config,
    read_trainer_state,
    step_dir_name,
)
from longcat_lab.checkpoint.sharded import Sharding, load_into
from longcat_lab.checkpoint.states import RNGState, Stateful, load_state_dicts, state_dicts
from longcat_lab.checkpoint.store import load, load_model_state, load_states, save

__all__ = [
    "CHECKPOINTS",
    "FILES",
    "FORMAT",
    "META",
    "SHARDED",
    "SHARDED_FILES",
    "TRAINER_STATE",
    "CheckpointError",
    "RNGState",
    "Sharding",
    "Stateful",
    "is_sharded",
    "latest",
    "list_checkpoints",
    "load",
    "load_into",
    "load_model_state",
    "load_state_dicts",
    "load_states",
    "move_aside",
    "newest_verified",
    "prepare_folder",
    "read_json",
    "read_meta",
    "read_model_config",
    "read_trainer_state",
    "resolve",
    "rotate",
    "save",
    "state_dicts",
    "step_dir_name",
    "verify",
]
