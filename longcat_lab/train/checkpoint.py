"""Checkpoints: one folder per checkpoint (nanochat's checkpoint_manager layout), written atomically, verified on load.

A run folder holds `checkpoints/step_000123/` folders, each with
- `model.safetensors`  the model's state dict (parameters and the persistent expert-bias buffers);
- `config.json`        the `ModelConfig`;
- `train_config.json`  the `TrainConfig` that produced it;
- `tokenizer.json`     the BPE tokenizer, so a checkpoint samples text on its own;
- `trainer_state.pt`   optimizer, LR schedule, controller, RNG and data-position state (loaded with weights_only);
- `meta.json`          written last: step, seed, versions, validation loss, and the size and sha256 of every other
                       file, so a truncated or corrupted file is caught by name before anything is loaded.

A run on several ranks writes `dcp/` (torch.distributed.checkpoint, one file per rank and `.metadata`) in place of
model.safetensors and says `"layout": "dcp"` in meta.json (`longcat_lab.parallel.dcp`); `load` reads both layouts.

Writes go to a hidden temporary folder whose files are fsynced before it is renamed into place, so a crash (or a
power loss) leaves the previous checkpoints and at most a stale temporary folder (removed by the next save); the
last `keep` checkpoints are kept, older ones renamed out of sight before they are deleted, so a reader sees whole
checkpoints only (docs/design.md §12). One process writes a run folder at a time (`train.lock`); readers need no
lock. Public API: `save`, `load` (model, tokenizer, meta; from a run folder, the newest checkpoint that
verifies), `latest`, `list_checkpoints`, `verify`, `newest_verified`, `move_aside`, `read_trainer_state`,
`is_sharded`, `CheckpointError`; `prepare_folder`, `write_rest` and `rotate` are the steps of `save` that the
sharded writer shares.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from longcat_lab._util import check_int, fsync_dir, json_bytes, staged_dir
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LongCatLM

CHECKPOINTS = "checkpoints"
FILES = ("model.safetensors", "config.json", "train_config.json", "tokenizer.json", "trainer_state.pt")
# A checkpoint saved by several ranks (`longcat_lab.parallel.dcp`): its weights and optimizer moments are a
# torch.distributed.checkpoint folder `dcp/` (one file per rank plus `.metadata`) instead of model.safetensors.
SHARDED = "dcp"
SHARDED_FILES = ("dcp/.metadata", *FILES[1:])
META = "meta.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line and names the bad file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint folders of a run (including unverified ones), oldest step first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save(
    run_dir: str | os.PathLike,
    step: int,
    model: LongCatLM,
    tokenizer,
    train_config: dict[str, Any],
    trainer_state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write checkpoint `step` of `model` into `run_dir/checkpoints/` and keep the newest `keep` checkpoints.

    Refuses (CheckpointError) to write a model with a non-finite parameter, so a diverged model can never replace
    the last good checkpoint. An existing folder for the same step is replaced only after the new one is complete."""
    check_int("keep", keep)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"refusing to save step {step}: non-finite values in {bad[:3]}; the last good checkpoint is kept"
        )
    folder = prepare_folder(run_dir)
    with staged_dir(folder / step_dir_name(step), prefix=f".tmp-{step_dir_name(step)}-") as tmp:
        # Serialized here and written by Python, so a full disk is an OSError (ENOSPC) like any other write.
        (tmp / "model.safetensors").write_bytes(save_bytes(state, metadata={"format": "pt"}))
        write_rest(tmp, step, model.config, tokenizer, train_config, trainer_state, meta)
    rotate(run_dir, keep)
    return folder / step_dir_name(step)


def prepare_folder(run_dir: str | os.PathLike) -> Path:
    """The run's checkpoints/ folder, made if missing and cleared of what a crash during a save left behind."""
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (*folder.glob(".tmp-*"), *folder.glob(".del-*")):
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def write_rest(
    tmp: Path,
    step: int,
    config: ModelConfig,
    tokenizer,
    train_config: dict[str, Any],
    trainer_state: dict[str, Any],
    meta: dict[str, Any] | None,
) -> None:
    """Complete the staged checkpoint folder `tmp` whose weights are written: configs, tokenizer, trainer state, and
    meta.json last, with the size and sha256 of every file in the folder; then read it all back (`verify`)."""
    (tmp / "config.json").write_bytes(json_bytes(config.to_dict()))
    (tmp / "train_config.json").write_bytes(json_bytes(train_config))
    (tmp / "tokenizer.json").write_text(tokenizer.to_str())
    torch.save(trainer_state, tmp / "trainer_state.pt")
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in names}
    full_meta = {
        **(meta or {}),
        "format": FORMAT,
        "step": step,
        "files": files,
        "versions": {"torch": torch.__version__, "longcat_lab": _version()},
    }
    (tmp / META).write_bytes(json_bytes(full_meta))
    verify(tmp)  # read back what was written before it can replace anything


def rotate(run_dir: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` checkpoints of a run."""
    for old in list_checkpoints(run_dir)[:-keep]:
        _remove(old)


def _remove(ckpt: Path) -> None:
    """Delete a checkpoint folder without ever showing a half-deleted one: rename it out of sight, then delete."""
    trash = ckpt.with_name(f".del-{ckpt.name}-{os.getpid()}")
    try:
        os.replace(ckpt, trash)
    except OSError:
        return  # already gone
    fsync_dir(ckpt.parent)
    shutil.rmtree(trash, ignore_errors=True)


def move_aside(ckpt: str | os.PathLike) -> Path:
    """Rename a damaged checkpoint folder to `corrupt_step_N[.k]` beside it (never deleted: its files may still be
    worth a look), so that `latest` and `resume` no longer pick it; returns the new path."""
    ckpt = Path(ckpt)
    target, k = ckpt.with_name(f"corrupt_{ckpt.name}"), 1
    while target.exists():
        target, k = ckpt.with_name(f"corrupt_{ckpt.name}.{k}"), k + 1
    os.replace(ckpt, target)
    fsync_dir(ckpt.parent)
    return target


def _version() -> str:
    from longcat_lab import __version__

    return __version__


def verify(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the sizes and sha256 sums in meta.json; returns the meta or raises a one-line
    CheckpointError naming the first bad file."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing, so {ckpt_dir} is not a complete checkpoint")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{meta_path}: not a valid checkpoint meta file (truncated or corrupted)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{meta_path}: not a valid checkpoint meta file (no 'files' object)")
    if isinstance(meta.get("step"), bool) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{meta_path}: not a valid checkpoint meta file ('step' is not an integer)")
    files = meta["files"]
    required = SHARDED_FILES if meta.get("layout") == SHARDED else FILES
    for name in (*required, *sorted(set(files) - set(required))):
        if name.startswith("/") or ".." in name.split("/"):
            raise CheckpointError(f"{meta_path}: lists a file outside the checkpoint ({name!r})")
        path = ckpt_dir / name
        want = files.get(name)
        if want is None:
            raise CheckpointError(f"{meta_path}: lists no checksum for {name}")
        if not (
            isinstance(want, dict)
            and isinstance(want.get("bytes"), int)
            and not isinstance(want.get("bytes"), bool)
            and isinstance(want.get("sha256"), str)
        ):
            raise CheckpointError(f"{meta_path}: the entry for {name} is not {{'bytes': int, 'sha256': str}}")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: truncated or altered ({size} bytes, expected {want['bytes']})")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path}: corrupted (sha256 does not match meta.json)")
    return meta


def resolve(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint folder as given, or the newest checkpoint of a run folder."""
    path = Path(path_or_run_dir)
    if (path / META).is_file() or (path / "model.safetensors").is_file() or is_sharded(path):
        return path
    newest = latest(path)
    if newest is None:
        raise CheckpointError(f"{path}: neither a checkpoint folder nor a run folder with checkpoints/step_*")
    return newest


def newest_verified(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, CheckpointError]]]:
    """(the newest checkpoint of `run_dir` that verifies or None, [(newer checkpoint, why it fails)]). A folder
    that disappears while it is checked was rotated away by a writer and is passed over in silence."""
    bad = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify(ckpt)
            return ckpt, bad
        except (CheckpointError, OSError) as err:
            if ckpt.is_dir():
                bad.append((ckpt, err if isinstance(err, CheckpointError) else CheckpointError(f"{ckpt}: {err}")))
    return None, bad


def load(path_or_run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, tokenizer, meta) from a checkpoint folder, or from the newest checkpoint of a run folder that
    verifies (newer, damaged ones are named in a warning and left in place); the model is in eval mode on `device`.
    Every file is verified against meta.json first. A writer may rotate checkpoints meanwhile: a checkpoint that
    vanishes while it is read is replaced by the then newest one."""
    path = Path(path_or_run_dir)
    if (path / META).is_file() or (path / "model.safetensors").is_file() or is_sharded(path):
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
    from tokenizers import Tokenizer

    meta = verify(ckpt)
    try:
        config = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_bytes().decode("utf-8")))
    except (ValueError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{ckpt / 'config.json'}: not a valid ModelConfig ({err})") from None
    model = LongCatLM(config)
    load_model_state(model, ckpt)
    # Read by Python, so a checkpoint rotated away meanwhile is an OSError that `load` recognises and retries.
    tokenizer = Tokenizer.from_str((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    return model.to(device).eval(), tokenizer, meta


def is_sharded(ckpt: str | os.PathLike) -> bool:
    """Whether a checkpoint folder was saved by several ranks (weights in `dcp/`, not model.safetensors)."""
    return (Path(ckpt) / SHARDED / ".metadata").is_file()


def load_model_state(model: LongCatLM, ckpt: Path) -> None:
    """Load a checkpoint's weights into a whole (not expert-parallel) model, whichever layout it was saved in."""
    if is_sharded(ckpt):
        from longcat_lab.parallel import dcp

        dcp.load_into(model, None, ckpt)
        return
    path = Path(ckpt) / "model.safetensors"
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def read_trainer_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt) / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__})") from None


__all__ = [
    "CheckpointError",
    "save",
    "load",
    "latest",
    "list_checkpoints",
    "verify",
    "newest_verified",
    "move_aside",
    "resolve",
    "read_trainer_state",
    "load_model_state",
    "is_sharded",
    "prepare_folder",
    "write_rest",
    "rotate",
    "step_dir_name",
]
