"""The checkpoint folders of a run: listing (`list_checkpoints`, `latest`, `resolve`), keeping the newest few
(`rotate`), and moving a damaged one out of the way (`move_aside`).

A checkpoint folder appears by one rename of a complete folder and disappears by a rename out of sight before it
is deleted, so a reader listing a run never sees half of one (docs/design.md §9). One process writes a run folder
at a time (the trainer's writer lock); readers need no lock.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from longcat_lab._util import fsync_dir
from longcat_lab.checkpoint.layout import CHECKPOINTS, META, CheckpointError, is_sharded

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


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


def is_checkpoint_folder(path: str | os.PathLike) -> bool:
    """Whether `path` looks like one checkpoint (rather than a run folder holding several)."""
    path = Path(path)
    return (path / META).is_file() or (path / "model.safetensors").is_file() or is_sharded(path)


def resolve(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint folder as given, or the newest checkpoint of a run folder."""
    path = Path(path_or_run_dir)
    if is_checkpoint_folder(path):
        return path
    newest = latest(path)
    if newest is None:
        raise CheckpointError(f"{path}: neither a checkpoint folder nor a run folder with checkpoints/step_*")
    return newest


def prepare_folder(run_dir: str | os.PathLike) -> Path:
    """The run's checkpoints/ folder, made if missing and cleared of what a crash during a save left behind."""
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (*folder.glob(".tmp-*"), *folder.glob(".del-*")):
        shutil.rmtree(stale, ignore_errors=True)
    return folder


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
    worth a look), so that `latest` and a resume no longer pick it; returns the new path."""
    ckpt = Path(ckpt)
    target, k = ckpt.with_name(f"corrupt_{ckpt.name}"), 1
    while target.exists():
        target, k = ckpt.with_name(f"corrupt_{ckpt.name}.{k}"), k + 1
    os.replace(ckpt, target)
    fsync_dir(ckpt.parent)
    return target


__all__ = ["is_checkpoint_folder", "latest", "list_checkpoints", "move_aside", "prepare_folder", "resolve", "rotate"]
