"""Writing and reading whole checkpoints: `save` (a model, its tokenizer, the training config and a dict of states;
sharded over ranks with a `Sharding`), `load` (model, tokenizer, meta: what sampling, evaluation and export need),
`load_states` (a checkpoint back into a model and its states: what a resume needs) and `load_model_state`.

Writes go to a hidden temporary folder whose files are fsynced before it is renamed into place, so a crash (or a
power loss) leaves the previous checkpoints and at most a stale temporary folder (removed by the next save); the
last `keep` checkpoints are kept, older ones renamed out of sight before they are deleted, so a reader sees whole
checkpoints only (docs/design.md §9).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from longcat_lab._util import check_int, staged_dir
from longcat_lab.checkpoint.folders import is_checkpoint_folder, prepare_folder, rotate
from longcat_lab.checkpoint.integrity import newest_verified, verify, write_meta
from longcat_lab.checkpoint.layout import (
    TRAINER_STATE,
    CheckpointError,
    is_sharded,
    one_line,
    read_model_config,
    read_trainer_state,
    step_dir_name,
    write_files,
)
from longcat_lab.checkpoint.sharded import Sharding, load_into, save_sharded
from longcat_lab.checkpoint.states import load_state_dicts, state_dicts
from longcat_lab.data.tokenizer import read_tokenizer
from longcat_lab.model.model import LongCatLM

log = logging.getLogger(__name__)


def save(
    run_dir: str | os.PathLike,
    step: int,
    model: LongCatLM,
    tokenizer,
    train_config: dict[str, Any],
    states: Mapping[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    keep: int = 3,
    sharding: Sharding | None = None,
) -> Path:
    """Write checkpoint `step` of `model` into `run_dir/checkpoints/` and keep the newest `keep` checkpoints.
    `states` ({name: a Stateful or a plain value}, `checkpoint.states`) go into trainer_state.pt, `meta` (the run's
    summary) into meta.json beside the checksums; returns the checkpoint's folder. With `sharding`, every rank of
    its mesh calls this and the weights go into dcp/ (`checkpoint.sharded`).

    Refuses (CheckpointError) to write a model with a non-finite parameter, so a diverged model can never replace
    the last good checkpoint. An existing folder for the same step is replaced only after the new one is complete."""
    check_int("keep", keep)
    states = states or {}
    if sharding is not None:
        return save_sharded(run_dir, step, model, tokenizer, train_config, dict(states), sharding, meta, keep)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"refusing to save step {step}: non-finite values in {bad[:3]}; the last good checkpoint is kept"
        )
    folder = prepare_folder(run_dir)
    with staged_dir(folder / step_dir_name(step), prefix=f".tmp-{step_dir_name(step)}-") as tmp:
        # Serialized here and written by Python, so a full disk is an OSError (ENOSPC) like any other write.
        (tmp / "model.safetensors").write_bytes(save_bytes(weights, metadata={"format": "pt"}))
        write_files(tmp, model.config, tokenizer, train_config, state_dicts(states))
        write_meta(tmp, step, {**(meta or {}), "num_params": model.num_params()})
    rotate(run_dir, keep)
    return folder / step_dir_name(step)


def load(path_or_run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, tokenizer, meta) from a checkpoint folder, or from the newest checkpoint of a run folder that
    verifies (newer, damaged ones are named in a warning and left in place); the model is in eval mode on `device`.
    Every file is verified against meta.json first. A writer may rotate checkpoints meanwhile: a checkpoint that
    vanishes while it is read is replaced by the then newest one."""
    path = Path(path_or_run_dir)
    if is_checkpoint_folder(path):
        return _load_folder(path, device)
    for _ in range(5):
        good, bad = newest_verified(path)
        for ckpt, err in bad:
            log.warning("%s fails verification (%s); loading an older checkpoint instead", ckpt.name, err)
        if good is None:
            raise (
                bad[0][1]
                if bad
                else CheckpointError(f"{path}: neither a checkpoint folder nor a run folder with checkpoints/step_*")
            )
        try:
            return _load_folder(good, device)
        except (CheckpointError, OSError):
            if good.is_dir():
                raise
    raise CheckpointError(f"{path}: its checkpoints kept disappearing while being read (a writer is rotating them)")


def _load_folder(ckpt: Path, device: str | torch.device):
    meta = verify(ckpt)
    model = LongCatLM(read_model_config(ckpt))
    load_model_state(model, ckpt)
    # Read by Python, so a checkpoint rotated away meanwhile is an OSError that `load` recognises and retries; a
    # damaged file (even one that makes the tokenizers library panic) is one line naming it.
    try:
        tokenizer = read_tokenizer(ckpt / "tokenizer.json", model.config.vocab_size)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return model.to(device).eval(), tokenizer, meta


def load_model_state(model: LongCatLM, ckpt: str | os.PathLike) -> None:
    """Load a checkpoint's weights into a whole (not sharded) model, whichever layout it was saved in."""
    if is_sharded(ckpt):
        load_into(model, None, ckpt)
        return
    path = Path(ckpt) / "model.safetensors"
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {one_line(err)})") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_states(
    ckpt: str | os.PathLike,
    states: Mapping[str, Any],
    model: LongCatLM | None = None,
    saved: dict[str, Any] | None = None,
    sharding: Sharding | None = None,
) -> None:
    """Load checkpoint `ckpt` into `model` (if given) and each of `states` (Stateful objects, by name), from
    `saved` (its trainer_state.pt, read when not given). A sharded checkpoint, or a `sharding`, reshards the model
    and `states["optimizer"]` through `load_into` (any layout to any layout); every other state gets its entry.
    Anything missing or of the wrong kind is a one-line CheckpointError naming the file and the entry."""
    ckpt = Path(ckpt)
    saved = read_trainer_state(ckpt) if saved is None else saved
    rest = dict(states)
    if model is not None and (sharding is not None or is_sharded(ckpt)):
        load_into(model, rest.pop("optimizer", None), ckpt, sharding, saved)
    elif model is not None:
        load_model_state(model, ckpt)
    load_state_dicts(rest, saved, ckpt / TRAINER_STATE)


__all__ = ["load", "load_model_state", "load_states", "save"]
