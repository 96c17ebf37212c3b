"""Checkpoints: one folder per checkpoint (nanochat's checkpoint_manager layout), written atomically, verified on load.

A run folder holds `checkpoints/step_000123/` folders, each with
- `model.safetensors`  the model's state dict (parameters and the persistent expert-bias buffers);
- `config.json`        the `ModelConfig`;
- `train_config.json`  the `TrainConfig` that produced it;
- `tokenizer.json`     the BPE tokenizer, so a checkpoint samples text on its own;
- `trainer_state.pt`   optimizer, LR schedule, controller, RNG and data-position state (loaded with weights_only);
- `meta.json`          written last: step, seed, versions, validation loss, and the size and sha256 of every other
                       file, so a truncated or corrupted file is caught by name before anything is loaded.

Writes go to a hidden temporary folder that is renamed into place, so a crash leaves the previous checkpoints and
at most a stale temporary folder (removed by the next save); the last `keep` checkpoints are kept. Public API:
`save`, `load` (model, tokenizer, meta), `latest`, `list_checkpoints`, `verify`, `read_trainer_state`,
`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from longcat_lab._util import check_int, json_bytes, replace_dir
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LongCatLM

CHECKPOINTS = "checkpoints"
FILES = ("model.safetensors", "config.json", "train_config.json", "tokenizer.json", "trainer_state.pt")
META = "meta.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


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
    folder = Path(run_dir) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{step_dir_name(step)}-", dir=folder))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_bytes(json_bytes(model.config.to_dict()))
        (tmp / "train_config.json").write_bytes(json_bytes(train_config))
        (tmp / "tokenizer.json").write_text(tokenizer.to_str())
        torch.save(trainer_state, tmp / "trainer_state.pt")
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES}
        full_meta = {
            **(meta or {}),
            "format": FORMAT,
            "step": step,
            "files": files,
            "versions": {"torch": torch.__version__, "longcat_lab": _version()},
        }
        (tmp / META).write_bytes(json_bytes(full_meta))
        verify(tmp)  # read back what was written before it can replace anything
        replace_dir(tmp, folder / step_dir_name(step))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder / step_dir_name(step)


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
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        assert isinstance(files, dict) and isinstance(meta["step"], int)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{meta_path}: not a valid checkpoint meta file (truncated or corrupted)") from None
    for name in FILES:
        path = ckpt_dir / name
        want = files.get(name)
        if want is None:
            raise CheckpointError(f"{meta_path}: lists no checksum for {name}")
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
    if (path / META).is_file() or (path / "model.safetensors").is_file():
        return path
    newest = latest(path)
    if newest is None:
        raise CheckpointError(f"{path}: neither a checkpoint folder nor a run folder with checkpoints/step_*")
    return newest


def load(path_or_run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, tokenizer, meta) from a checkpoint folder, or the newest checkpoint of a run folder; the model is
    in eval mode on `device`. Every file is verified against meta.json first."""
    from tokenizers import Tokenizer

    ckpt = resolve(path_or_run_dir)
    meta = verify(ckpt)
    try:
        config = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    except (json.JSONDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{ckpt / 'config.json'}: not a valid ModelConfig ({err})") from None
    model = LongCatLM(config)
    load_model_state(model, ckpt)
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return model.to(device).eval(), tokenizer, meta


def load_model_state(model: LongCatLM, ckpt: Path) -> None:
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
    "resolve",
    "read_trainer_state",
    "load_model_state",
    "step_dir_name",
]
