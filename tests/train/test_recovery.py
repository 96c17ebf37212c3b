"""Tests of what a run folder survives (docs/design.md §9): the writer lock (a second writer refused with the
holder named, a crashed holder's record taken over), resume falling back past a damaged newest checkpoint (moved
aside, never deleted), damaged metrics.jsonl lines skipped with a warning and kept in a backup, structural damage
in meta.json, and the machine-dependent config checks (threads, device, seed). Tiny 4-step runs.

Run: `bash tools/test.sh tests/train/test_recovery.py`.
"""

import dataclasses
import json
import logging
import os
import shutil
import socket

import pytest
import torch

from longcat_lab import checkpoint
from longcat_lab.checkpoint import CheckpointError
from longcat_lab.data import train_tokenizer
from longcat_lab.model import presets
from longcat_lab.testing import random_model, tiny_train_config
from longcat_lab.train import TrainingError, read_metrics, train
from longcat_lab.train.lock import LOCK_NAME, RunLock, RunLockedError
from longcat_lab.train.trainer import check_runtime


def config(cache, steps=4, **changes):
    return tiny_train_config(
        cache, steps, **{"eval_every": 0, "eval_windows": 2, "ckpt_every": 2, "rg_every": 0, **changes}
    )


def run(cfg, out, **kwargs):
    return train(presets.tiny(), cfg, out, progress=False, **kwargs)


def copy_run(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    (dst / LOCK_NAME).unlink(missing_ok=True)
    return dst


# The writer lock ---------------------------------------------------------------------------------------------------
def test_second_writer_is_refused_naming_the_holder(cache, tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.held
        with pytest.raises(TrainingError, match=rf"being written by PID {os.getpid()} on host {socket.gethostname()}"):
            run(config(cache, steps=2), tmp_path)
        with pytest.raises(RunLockedError):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / LOCK_NAME).read_bytes() == b"", "a released lock leaves no holder record"


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    record = {"pid": 999_999_999, "host": "elsewhere", "since": 0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))  # written by a writer killed before it released
    with caplog.at_level(logging.WARNING), RunLock(tmp_path) as lock:
        assert lock.taken_over.startswith("PID 999999999 on host elsewhere")
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "taking over the lock of PID 999999999" in caplog.text


# Resume falls back past a damaged checkpoint ---------------------------------------------------------------------
def test_resume_falls_back_to_the_newest_good_checkpoint(finished, cache, tmp_path, caplog):
    out = copy_run(finished[0], tmp_path)
    bad = out / "checkpoints" / "step_000004" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING):
        res = run(config(cache), out, resume=True)
    assert res.resumed_from == 2 and res.step == 4
    assert [r["loss"] for r in res.rows("train")] == finished[1], "steps 3-4 redone bit for bit"
    moved = out / "checkpoints" / "corrupt_step_000004"
    assert (moved / "model.safetensors").is_file(), "the damaged checkpoint is moved aside, never deleted"
    line = next(r.getMessage() for r in caplog.records if "fails verification" in r.getMessage())
    assert "\n" not in line and "model.safetensors" in line and "resuming from step_000002" in line


def test_meta_json_structural_damage_is_one_line(finished, tmp_path):
    out = copy_run(finished[0], tmp_path)
    ckpt = out / "checkpoints" / "step_000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    for damage, match in (
        (lambda m: m["files"].__setitem__("config.json", "abc"), "entry for config.json is not"),
        (lambda m: m["files"]["config.json"].pop("bytes"), "entry for config.json is not"),
        (lambda m: m.__setitem__("files", [1]), "no 'files' object"),
        (lambda m: m.__setitem__("step", None), "'step' is not an integer"),
    ):
        broken = json.loads(json.dumps(meta))
        damage(broken)
        (ckpt / "meta.json").write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=match):
            checkpoint.verify(ckpt)
    (ckpt / "meta.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match="not a valid checkpoint meta file"):
        checkpoint.verify(ckpt)
    # A reader of the run folder falls back as well, and leaves the damaged one where it is.
    _, _, got = checkpoint.load(out)
    assert got["step"] == 2 and ckpt.is_dir()


# Damaged metrics.jsonl -------------------------------------------------------------------------------------------
def test_damaged_metrics_lines_are_skipped_on_resume_and_kept(finished, cache, tmp_path, caplog):
    out = copy_run(finished[0], tmp_path)
    (out / "checkpoints" / "step_000004").rename(out / "checkpoints" / "gone_step_4")  # resume from step 2
    metrics = out / "metrics.jsonl"
    original = metrics.read_bytes()
    damage = b'[1, 2]\n{"step": null}\n\xff\xfe garbage\n' + b"[" * 50_000 + b"\n"
    metrics.write_bytes(original + damage)
    with caplog.at_level(logging.WARNING):
        res = run(config(cache), out, resume=True)
    assert res.resumed_from == 2 and [r["loss"] for r in res.rows("train")] == finished[1]
    warning = next(r.getMessage() for r in caplog.records if "damaged line" in r.getMessage())
    n = original.count(b"\n")
    assert f"line {n + 1} (a JSON list, not an object)" in warning and f"line {n + 3} (not UTF-8 text)" in warning
    assert f"line {n + 2} (no integer step)" in warning and str(metrics) in warning
    assert (out / "metrics.jsonl.damaged").read_bytes() == original + damage, "nothing is lost"


def test_read_metrics_survives_hostile_input(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_bytes(b'{"step": 1}\n' + b"[" * 100_000 + b"\n\xff\xfe\n" + b"1" * 5000 + b'\n{"step": 2}\n')
    with pytest.warns(UserWarning) as caught:
        assert read_metrics(f) == [{"step": 1}, {"step": 2}]
    messages = [str(w.message) for w in caught]
    assert any("line 2 skipped: not JSON" in m for m in messages)
    assert any("line 3 skipped: not UTF-8 text" in m and str(f) in m for m in messages)
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="no metrics rows yet"):
        read_metrics(f)


# Machine-dependent config checks --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_threads": 100_000}, "num_threads=100000 is not allowed"),
        ({"seed": 2**63}, "seed=9223372036854775808 is not allowed"),
        ({"device": "cuda:99"}, "device='cuda:99' is not allowed: this machine has"),
        ({"device": "cudax"}, "device='cudax' is not allowed"),
    ],
)
def test_machine_checks_name_the_field(cache, tmp_path, change, match):
    cfg = dataclasses.replace(config(cache), **change)
    with pytest.raises(ValueError, match=match):
        check_runtime(cfg)
    with pytest.raises(ValueError, match=match):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(cache):
    with pytest.raises(ValueError, match="device='cuda' is not allowed: this machine has 0 CUDA"):
        check_runtime(dataclasses.replace(config(cache), device="cuda"))


def test_rotation_never_shows_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    tok = train_tokenizer(["def f(x):\n    return x\n"] * 20, 300)
    model = random_model(presets.tiny(), 0)
    deleting_while_listed = []
    real_rmtree = shutil.rmtree

    def spy(path, *a, **k):  # a reader listing the run while a folder is deleted must not see that folder
        listed = {p.name for p in checkpoint.list_checkpoints(tmp_path)}
        deleting_while_listed.extend(n for n in listed if n == os.path.basename(path))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", spy)
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, tok, {}, {"step": step}, keep=1)
    assert not deleting_while_listed
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003"]
