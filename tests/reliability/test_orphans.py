"""Process hygiene (docs/design.md §9): `kill -9` of a `train --nproc 2` launcher or of a `sweep --jobs 2` parent
leaves no rank or worker running (polled for up to 10 s) and the run folders' locks free; a rendezvous endpoint
held by a program that never answers is refused in one line; `die_with_parent` ends a child whose parent ended.
Linux only (the tests read /proc).

Run: `bash tools/test.sh tests/reliability/test_orphans.py` (the two `kill -9` tests start real runs: marked slow).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longcat_lab.cli import main
from longcat_lab.train.lock import LOCK_NAME, RunLock, RunLockedError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
ROOT = Path(__file__).resolve().parents[2]


def children(pid: int) -> set[int]:
    """Every living descendant of `pid` (from /proc)."""
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                parent_of[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parent_of.items() if p in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            out.add(pid)
    return out


def wait_for(condition, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


def start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "log.txt", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [sys.executable, "-m", "longcat_lab", *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
    )


def kill_and_check(proc: subprocess.Popen, tmp_path: Path, lock_dirs: list[Path]) -> None:
    """kill -9 the parent; every descendant must be gone within 10 s and every lock free."""
    kids = children(proc.pid)
    assert kids, (tmp_path / "log.txt").read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        wait_for(lambda: not alive(kids), 10, "the children to end")
    finally:
        for pid in alive(kids):  # leave nothing behind even when the test fails
            os.kill(pid, signal.SIGKILL)
    for d in lock_dirs:  # the kernel frees a killed process's lock as it tears the process down: give it 10 s
        wait_for(lambda d=d: lock_free(d), 10, f"the lock of {d} to be released")


def lock_free(folder: Path) -> bool:
    try:
        with RunLock(folder) as lock:
            return lock.held
    except RunLockedError:
        return False


def lock_taken(folder: Path) -> bool:
    return any(p.stat().st_size for p in folder.rglob(LOCK_NAME))


@pytest.mark.slow
def test_kill_9_of_the_train_launcher_ends_its_ranks(tmp_path):
    run = tmp_path / "run"
    proc = start(
        ["train", "--preset", "tiny", "--out", str(run), "--nproc", "2", "--steps", "100000", "--samples", "0"]
        + ["--eval", "none", "--no-progress", "--set", "batch_size=2", "--set", f"cache_dir={tmp_path / 'cache'}"]
        + ["--set", "max_bytes_per_domain=150000", "--set", "tokenizer_sample_bytes=60000", "--set", "num_threads=1"],
        tmp_path,
    )
    try:
        # Both ranks running (not only the lock taken), so that the snapshot of the launcher's children has them.
        def started() -> bool:
            return (lock_taken(run) and len(children(proc.pid)) >= 2) or proc.poll() is not None

        wait_for(started, 300, "the ranks to start training")
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()
        kill_and_check(proc, tmp_path, [run])
    finally:
        proc.kill()


@pytest.mark.slow
def test_kill_9_of_a_sweep_parent_ends_its_workers(tmp_path):
    out = tmp_path / "sweeps"
    proc = start(
        ["sweep", "z_loss", "--jobs", "2", "--seeds", "1", "--preset", "tiny", "--steps", "100000"]
        + ["--out", str(out), "--no-progress"],
        tmp_path,
    )
    try:
        wait_for(
            lambda: sum(1 for p in out.rglob(LOCK_NAME) if p.stat().st_size) >= 2 or proc.poll() is not None,
            300,
            "two sweep runs to start",
        )
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()
        kill_and_check(proc, tmp_path, [p.parent for p in out.rglob(LOCK_NAME)])
    finally:
        proc.kill()


def test_die_with_parent_ends_an_orphan(tmp_path):
    # A parent starts a child that arms die_with_parent, prints its PID and sleeps; the parent is killed with -9.
    child = (
        "import os, sys, time\nfrom longcat_lab.parallel.launch import die_with_parent\n"
        "die_with_parent(int(sys.argv[1]))\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n"
    )
    parent = (
        "import os, subprocess, sys, time\n"
        f"c = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())], stdout=sys.stdout)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, env=env, text=True)
    child_pid = int(proc.stdout.readline())
    try:
        assert alive({child_pid})
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not alive({child_pid}), 10, "the orphan to end")
    finally:
        if alive({child_pid}):
            os.kill(child_pid, signal.SIGKILL)


def test_die_with_parent_ends_a_child_whose_parent_is_already_gone():
    # The parent PID given is not this process's parent: the child has been orphaned already, so it ends at once.
    code = "from longcat_lab.parallel.launch import die_with_parent\ndie_with_parent(1 << 30)\nprint('ran on')\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1 and "ran on" not in done.stdout


def test_a_rendezvous_port_held_by_another_program_is_refused_in_one_line(tmp_path, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(8)  # accepts connections (the kernel does) but never answers
        port = holder.getsockname()[1]
        code = main(
            ["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--nproc", "1", "--nnodes", "1:2"]
            + ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "2", "--samples", "0", "--eval", "none"]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"--rdzv-endpoint='127.0.0.1:{port}'" in err[0] and "--rdzv-timeout=2" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--nnodes", "abc"], "--nnodes='abc'"),
        (["--nnodes", "3:2"], "--nnodes='3:2'"),
        (["--nnodes", "2", "--rdzv-endpoint", "nohost"], "--rdzv-endpoint='nohost'"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:99999"], "--rdzv-endpoint='h:99999'"),
        (["--rdzv-timeout", "0"], "--rdzv-timeout=0"),
    ],
)
def test_bad_launch_flags_are_one_line(tmp_path, capsys, flags, named):
    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--nproc", "1", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and named in err[0]
