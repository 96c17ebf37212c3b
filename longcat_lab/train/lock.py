"""One writer per run folder: `RunLock` is an exclusive lock on `run_dir/.writer.lock`, taken by the trainer for
the whole run (docs/design.md §9).

The lock is an `fcntl.flock` on that file, so the kernel releases it when the holder exits, however it exits
(`kill -9` included): a lock can never outlive its process on the same machine. The file also records the holder
(PID, host, start time) so that a second writer is told who holds the folder, and a writer that finds the record
of a holder that is gone (it crashed before clearing it) says that it takes over. The file is never deleted: a
deleted lock file would let a third process lock a fresh file while the second still holds the old one.

Readers (`checkpoint.load`, `longcat-lab sample`, the notebooks) never take the lock: checkpoints appear and
disappear by atomic renames, so a reader sees whole checkpoints only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".writer.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; an exclusive create stands in for it (a crash leaves a stale file)
    fcntl = None


class RunLockedError(RuntimeError):
    """Another process is writing this run folder; the message names it in one line."""


def _describe(holder: dict[str, Any]) -> str:
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}{when}"


def _read_holder(data: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(data.decode())
    except (ValueError, RecursionError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """The exclusive writer lock of one run folder. `acquire()` takes it or raises `RunLockedError` naming the
    holder; `release()` (or leaving the `with` block, or the process ending) gives it back. `taken_over` names the
    crashed holder whose record was found, if any."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._file = None
        self.taken_over: str | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> RunLock:
        if self._file is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self._acquire_exclusive_create()
        f = open(self.path, "a+b")  # noqa: SIM115 (held open for the life of the lock)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _read_holder(f.read())
            f.close()
            who = _describe(holder) if holder else "another process"
            raise RunLockedError(
                f"{self.run_dir} is being written by {who} (lock file {self.path}); wait for that run to end, "
                "or choose another output folder"
            ) from None
        except BaseException:
            f.close()
            raise
        f.seek(0)
        previous = _read_holder(f.read())
        if previous and previous.get("pid") != os.getpid():
            # The kernel dropped that process's flock, so it is gone: it died without clearing its record.
            self.taken_over = who = _describe(previous)
            log.warning("%s: taking over the lock of %s, which ended without releasing it", self.run_dir, who)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record).encode())
        f.flush()
        self._file = f
        return self

    def _acquire_exclusive_create(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _read_holder(self.path.read_bytes())
            raise RunLockedError(
                f"{self.run_dir} is being written by {_describe(holder) if holder else 'another process'} "
                f"(lock file {self.path}); if no such run is alive, delete the lock file"
            ) from None
        f = os.fdopen(fd, "wb")
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        try:
            if fcntl is None:
                f.close()
                self.path.unlink(missing_ok=True)
                return
            f.seek(0)
            f.truncate()  # an empty record: the next writer has nothing to take over
            f.flush()
        except OSError:
            pass  # a full disk must not hide the error that is on its way out
        finally:
            f.close()  # closing the file drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["RunLock", "RunLockedError", "LOCK_NAME"]
