"""Small helpers every folder shares: input validation that names the field, the value and what is allowed,
writes that readers never see half done, and the provenance stamp of a committed result. One home for each, so
that error messages read the same everywhere."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


# Validation ----------------------------------------------------------------------------------------------------
def is_number(value: Any) -> bool:
    """A finite int or float, and not a bool (True would otherwise pass as 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the float range (10**400 is valid JSON): no float can hold it
        return False


def check_int(name: str, value: Any, lowest: int = 1) -> None:
    """Raise a ValueError naming `name` unless `value` is an int >= `lowest` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        allowed = "a positive integer" if lowest == 1 else f"an integer >= {lowest}"
        raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}")


def check_positive_float(name: str, value: Any) -> None:
    if not is_number(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number > 0")


def check_nonnegative(name: str, value: Any) -> None:
    if not is_number(value) or value < 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number >= 0")


def check_top_p(name: str, value: Any) -> None:
    """Raise a ValueError naming `name` unless `value` is a nucleus-sampling mass in (0, 1]."""
    if not is_number(value) or not 0 < value <= 1:
        raise ValueError(f"{name}={value!r} is not allowed: it must be in (0, 1]")


SEED_LIMIT = 2**63  # torch and numpy generators take a signed 64-bit seed


def check_seed(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer from 0 to 2**63 - 1")


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters: a value read from a file, quoted in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_text(name: str, value: str) -> None:
    """Refuse (one line) text holding bytes that were not UTF-8: Python keeps such bytes of a command line or a
    terminal as lone surrogates (U+DC80..U+DCFF), which no tokenizer can encode."""
    bad = next((i for i, c in enumerate(value) if "\udc80" <= c <= "\udcff"), None)
    if bad is not None:
        byte = ord(value[bad]) - 0xDC00
        raise ValueError(
            f"{name} is not allowed: byte 0x{byte:02x} at character {bad} is not UTF-8; it must be UTF-8 text"
        )


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: it must be one of {allowed}")


def from_known_fields(cls, data: dict[str, Any]):
    """`cls(**data)` for a config dataclass, refusing keys that are not its fields (a typo would otherwise vanish
    into a default). Every config's `from_dict` goes through here."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed fields are {sorted(known)}")
    return cls(**data)


# Atomic writes -------------------------------------------------------------------------------------------------
# A rename is atomic but not durable: without an fsync of the file before it and of the folder after it, a power
# loss can leave the new name pointing at a file whose bytes never reached the disk. So every rename below is
# fenced by fsyncs (docs/design.md §9).
def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder bottom-up, so the tree is on disk before it is renamed."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def check_file_target(path: Path, name: str = "path") -> None:
    """Refuse (one line naming `name`) a place to write a file where something other than a regular file stands: a
    device node (a rename over /dev/full would replace the device), a folder, a pipe or a socket. Symbolic links
    are followed. Every writer goes through here (`atomic_write_bytes`); commands call it before their work."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there (or unreadable: the write itself reports that)
        return
    if not stat.S_ISREG(mode):
        kinds = {stat.S_ISDIR: "a folder", stat.S_ISCHR: "a device node", stat.S_ISBLK: "a device node"}
        kinds |= {stat.S_ISFIFO: "a pipe", stat.S_ISSOCK: "a socket"}
        kind = next((k for test, k in kinds.items() if test(mode)), "not a regular file")
        raise ValueError(f"{name}={str(path)!r} is not allowed: it is {kind}; only regular files are written")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, rename it over `path` and fsync the folder: readers see
    the old file or the whole new one, and after a crash the disk holds one of the two. Only over a regular file
    (or none): `check_file_target`."""
    path = Path(path)
    check_file_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# A list opened by "[" and a newline is structural (JSON strings hold no raw newline), so this never edits a string.
_FLAT_LIST = re.compile(r"\[\n([^\[\]{}\"]*?)\n\s*\]")


def json_bytes(obj: Any, flat_lists: bool = False) -> bytes:
    """Human-readable, diff-friendly JSON (sorted keys, indented, final newline). `flat_lists` writes each list of
    plain values (numbers, null, booleans) on one line: a run's per-step curves take a third of the bytes."""
    text = json.dumps(obj, indent=2, sort_keys=True)
    if flat_lists:
        text = _FLAT_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    return (text + "\n").encode()


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the complete folder `src` to `dst` (its files fsynced first, the parent folder after); an old `dst`
    is moved aside first and deleted only afterwards."""
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:  # put the old folder back
            os.replace(old / dst.name, dst)
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(dst: Path, prefix: str) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `dst` (named `prefix` + random); when the block ends normally it
    replaces `dst` (`replace_dir`), when it raises the folder is deleted, so `dst` is never half-written."""
    dst = Path(dst)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def os_error_line(err: OSError, what: str = "path") -> str:
    """One line for an OSError: the path, what went wrong and what to do about it."""
    where = err.filename if err.filename is not None else "?"
    reason = err.strerror or type(err).__name__
    hints = {
        errno.ENOSPC: "free some space (or choose another place), then run again",
        errno.EDQUOT: "free some space (or choose another place), then run again",
        errno.EACCES: f"choose a {what} you may write to",
        errno.EPERM: f"choose a {what} you may write to",
        errno.EROFS: f"choose a {what} on a writable file system",
        errno.ENOTDIR: f"a file stands where a folder is expected; choose another {what}",
        errno.EEXIST: f"a file stands where a folder is expected; choose another {what}",
        errno.EISDIR: f"a folder stands where a file is expected; choose another {what}",
        errno.ENOENT: f"check the {what}",
    }
    hint = hints.get(err.errno, "check the path and the disk")
    return f"{where}: {reason}; {hint}"


# Provenance ----------------------------------------------------------------------------------------------------
def provenance() -> dict[str, str]:
    """When, from which commit (marked when the work tree has uncommitted changes) and on what machine a result
    was made: the stamp every committed result carries."""
    here = Path(__file__).parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=here,
        ).stdout.strip()
        if commit and dirty:
            commit += " (with uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "machine": f"{platform.platform()}; {platform.processor() or platform.machine()}; "
        f"{multiprocessing.cpu_count()} logical CPUs",
    }
