"""Fault injection (docs/design.md §9): `kill -9` at random points of a checkpoint save and of an export, a disk
that fills during a save, two writers on one run folder, and a reader racing the checkpoint rotation. After each
fault every checkpoint that is listed verifies and loads, and nothing half-written is visible. Seeded; a few
iterations each (raise LONGCAT_LAB_FAULT_ITERATIONS for a longer soak).

Run: `bash tools/test.sh tests/reliability/test_faults.py`.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from longcat_lab import checkpoint
from longcat_lab.cli import main
from longcat_lab.data import train_tokenizer
from longcat_lab.export import load_hf, save_hf
from longcat_lab.model import presets
from longcat_lab.testing import random_model

ITERATIONS = int(os.environ.get("LONGCAT_LAB_FAULT_ITERATIONS", "3"))

# A child that writes in a loop until it is killed; it prints "ready" once its imports are done.
WRITER = """
import sys, torch
from longcat_lab.data import train_tokenizer
from longcat_lab.export import save_hf
from longcat_lab.model import presets
from longcat_lab.testing import random_model
from longcat_lab import checkpoint
torch.set_num_threads(1)
kind, out = sys.argv[1], sys.argv[2]
tok = train_tokenizer(["def f(x):\\n    return x\\n"] * 20, 300)
model = random_model(presets.tiny(), 0)
print("ready", flush=True)
step = 0
while True:
    step += 1
    if kind == "save":
        checkpoint.save(out, step, model, tok, {}, {"step": step}, keep=2)
    elif kind == "export":
        save_hf(model, out, tokenizer=tok, overwrite=True)
    elif kind == "lock":
        from longcat_lab.train.lock import RunLock
        held = RunLock(out).acquire()
        print("locked", flush=True)
        sys.stdin.read()
    print("done", step, flush=True)
"""


def start_writer(kind: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WRITER), kind, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def kill9(proc: subprocess.Popen) -> int:
    """Kill -9 and return how many writes the child reported complete."""
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    return sum(1 for line in out.splitlines() if line.startswith("done"))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x\n"] * 20, 300)


@pytest.mark.slow
def test_kill_9_during_checkpoint_saves(tmp_path, tokenizer):
    rng = random.Random(13)
    run = tmp_path / "run"
    for _ in range(ITERATIONS):
        proc = start_writer("save", run)
        time.sleep(rng.uniform(0.05, 0.8))
        kill9(proc)
        listed = checkpoint.list_checkpoints(run)
        for ckpt in listed:
            checkpoint.verify(ckpt)  # every listed checkpoint is whole
        if listed:
            _, _, meta = checkpoint.load(run)
            assert meta["step"] == int(listed[-1].name.split("_")[1])
        # The next writer cleans up what the killed one left and continues.
        checkpoint.save(run, 10_000, random_model(presets.tiny(), 0), tokenizer, {}, {}, keep=2)
        assert not list((run / "checkpoints").glob(".tmp-*"))
        shutil.rmtree(run / "checkpoints" / "step_010000")


@pytest.mark.slow
def test_kill_9_during_exports(tmp_path):
    rng = random.Random(14)
    out = tmp_path / "export"
    reference = None
    for _ in range(ITERATIONS):
        proc = start_writer("export", out)
        time.sleep(rng.uniform(0.05, 0.8))
        done = kill9(proc)
        if done or out.exists():
            model = load_hf(out)  # the folder is either absent or whole
            reference = reference or model.state_dict()
        assert not list(out.parent.glob(f".{out.name}.old-*/{out.name}/missing")), "no half-moved folder"


@pytest.mark.slow
def test_two_writers_and_a_crashed_holder(tmp_path, capsys, caplog):
    run = tmp_path / "run"
    proc = start_writer("lock", run)
    assert proc.stdout.readline().strip() == "locked"
    args = ["train", "--preset", "tiny", "--steps", "2", "--no-progress", "--samples", "0", "--out", str(run)]
    assert main([*args, "--set", "num_threads=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"being written by PID {proc.pid} on host" in err
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    kill9(proc)  # the holder dies without releasing: the next writer takes over and says so
    from longcat_lab.train.lock import RunLock

    with RunLock(run) as lock:
        assert lock.taken_over.startswith(f"PID {proc.pid} on host")


@pytest.mark.slow
def test_reader_racing_rotation(tmp_path):
    run = tmp_path / "run"
    proc = start_writer("save", run)
    try:
        deadline, loads = time.monotonic() + 3.0, 0
        while time.monotonic() < deadline:
            if checkpoint.list_checkpoints(run):
                _, _, meta = checkpoint.load(run)  # never a half-rotated folder, never an error
                assert meta["step"] >= 1
                loads += 1
    finally:
        writes = kill9(proc)
    assert loads > 0 and writes > 2, (loads, writes)


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs (room for one tiny checkpoint, not two); skips unless the test may mount one."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root and mount(8)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_during_save_keeps_the_last_checkpoint(small_disk, tokenizer):
    model = random_model(presets.tiny(), 0)
    first = checkpoint.save(small_disk, 1, model, tokenizer, {}, {}, keep=3)
    with pytest.raises(OSError) as err:
        checkpoint.save(small_disk, 2, model, tokenizer, {}, {}, keep=3)
    assert err.value.errno == errno.ENOSPC
    assert checkpoint.list_checkpoints(small_disk) == [first]
    checkpoint.verify(first)
    assert not list((small_disk / "checkpoints").glob(".tmp-*")), "nothing half-written left behind"
    with pytest.raises(OSError) as err:
        save_hf(model, small_disk / "export")
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoints"]


def test_full_disk_in_the_cli_is_one_line(small_disk, tmp_path, capsys):
    (small_disk / "filler").write_bytes(b"\0" * 1_400_000)  # room for metrics.jsonl, not for a checkpoint
    cache = tmp_path / "cache"
    args = ["train", "--preset", "tiny", "--steps", "2", "--no-progress", "--samples", "0"]
    sets = [f"cache_dir={cache}", "max_bytes_per_domain=150000", "tokenizer_sample_bytes=60000", "num_threads=1"]
    argv = [*args, "--out", str(small_disk / "run"), *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "No space left on device" in err and "--resume" in err
    assert not list((small_disk / "run" / "checkpoints").glob(".tmp-*"))
