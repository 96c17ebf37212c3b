"""meta.json, the checkpoint's receipt: written last (`write_meta`), with the size and sha256 of every other file, so
that `verify` names a truncated, corrupted or missing file before anything is loaded, and `newest_verified` finds
the newest checkpoint of a run that is whole.

meta.json is read as a file we did not write: a wrong type anywhere a reader looks (`step`, `files`, an entry of
`files`, `layout`) is a one-line CheckpointError naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from longcat_lab._util import json_bytes
from longcat_lab._version import __version__
from longcat_lab.checkpoint.folders import list_checkpoints
from longcat_lab.checkpoint.layout import FILES, FORMAT, META, SHARDED, SHARDED_FILES, CheckpointError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_meta(folder: Path, step: int, meta: dict[str, Any] | None) -> None:
    """Write meta.json into the staged checkpoint `folder` whose other files are complete: `meta`, the format,
    step and versions, and the size and sha256 of every file; then read it all back (`verify`)."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}
    full_meta = {
        **(meta or {}),
        "format": FORMAT,
        "step": step,
        "files": files,
        "versions": {"torch": torch.__version__, "longcat_lab": __version__},
    }
    (folder / META).write_bytes(json_bytes(full_meta))
    verify(folder)  # read back what was written before it can replace anything


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json with the types of the fields readers use checked (no checksums compared: that is `verify`)."""
    meta_path = Path(ckpt_dir) / META
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing, so {ckpt_dir} is not a complete checkpoint")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{meta_path}: not a valid checkpoint meta file (truncated or corrupted)") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{meta_path}: not a valid checkpoint meta file (no 'files' object)")
    if not _is_int(meta.get("step")):
        raise CheckpointError(f"{meta_path}: not a valid checkpoint meta file ('step' is not an integer)")
    if not isinstance(meta.get("layout", SHARDED), str):
        raise CheckpointError(f"{meta_path}: not a valid checkpoint meta file ('layout' is not a string)")
    return meta


def verify(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the sizes and sha256 sums in meta.json; returns the meta or raises a one-line
    CheckpointError naming the first bad file."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META
    meta = read_meta(ckpt_dir)
    files = meta["files"]
    required = SHARDED_FILES if meta.get("layout") == SHARDED else FILES
    for name in (*required, *sorted(set(files) - set(required))):
        if name.startswith("/") or ".." in name.split("/"):
            raise CheckpointError(f"{meta_path}: lists a file outside the checkpoint ({name!r})")
        path = ckpt_dir / name
        want = files.get(name)
        if want is None:
            raise CheckpointError(f"{meta_path}: lists no checksum for {name}")
        if not (isinstance(want, dict) and _is_int(want.get("bytes")) and isinstance(want.get("sha256"), str)):
            raise CheckpointError(f"{meta_path}: the entry for {name} is not {{'bytes': int, 'sha256': str}}")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: truncated or altered ({size} bytes, expected {want['bytes']})")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path}: corrupted (sha256 does not match meta.json)")
    return meta


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


__all__ = ["newest_verified", "read_meta", "verify", "write_meta"]
