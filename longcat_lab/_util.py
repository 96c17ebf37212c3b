"""Small helpers every folder shares: input validation that names the field, the value and what is allowed, and
writes that readers never see half done. One home for each, so that error messages read the same everywhere."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


# Validation ----------------------------------------------------------------------------------------------------
def is_number(value: Any) -> bool:
    """A finite int or float, and not a bool (True would otherwise pass as 1)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_int(name: str, value: Any, lowest: int = 1) -> None:
    """Raise a ValueError naming `name` unless `value` is an int >= `lowest` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        allowed = "a positive integer" if lowest == 1 else f"an integer >= {lowest}"
        raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}")


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    check_int(name, value, 0 if allow_zero else 1)


def check_positive_float(name: str, value: Any) -> None:
    if not is_number(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number > 0")


def check_nonnegative(name: str, value: Any) -> None:
    if not is_number(value) or value < 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number >= 0")


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
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_bytes(obj: Any) -> bytes:
    """Human-readable, diff-friendly JSON (sorted keys, indented, final newline)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the complete folder `src` to `dst`; an old `dst` is moved aside first and deleted only afterwards."""
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
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
