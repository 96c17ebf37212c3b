"""`longcat-lab synth --n N --out FILE.jsonl --seed S` (docs/design.md §5): design N tasks, solve each with the
expert solver, keep only dialogues that pass their verifier, write one JSON record per line, and print a summary of
the difficulty distribution (`synth.generate`, `synth.summarize` from Python)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from longcat_lab._util import atomic_write_bytes, check_file_target, check_int
from longcat_lab.synth import DOMAINS, format_summary, generate, summarize

# The records are held in memory until the one atomic write, so --n is bounded to keep that well under a gigabyte
# (a record is tens of kilobytes).
N_LIMIT = 20_000


def add_parser(subparsers) -> argparse.ArgumentParser:
    sy = subparsers.add_parser("synth", help="synthesise verified tool-use dialogues on three difficulty axes")
    sy.add_argument("--n", type=int, required=True, help=f"number of dialogues (1 to {N_LIMIT:,})")
    sy.add_argument("--out", type=Path, required=True, help="output .jsonl file (one record per line)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--domains", nargs="*", default=list(DOMAINS), help=f"any of {', '.join(DOMAINS)}")
    sy.add_argument("--no-progress", action="store_true", help="no progress bar")
    return sy


def run(args: argparse.Namespace) -> None:
    check_int("--n", args.n)
    if args.n > N_LIMIT:
        raise ValueError(
            f"--n={args.n} is not allowed: it must be from 1 to {N_LIMIT:,} (split larger sets into files)"
        )
    check_file_target(args.out, "--out")  # before the work, not after it
    parent = args.out.absolute().parent
    while not parent.exists() and parent != parent.parent:  # the nearest part of the path that exists
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out={str(args.out)!r} is not allowed: {parent} is not a folder this user may write to")
    records = list(generate(args.n, args.seed, tuple(args.domains), progress=not args.no_progress))
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(args.out, body.encode())
    print(format_summary(summarize(records)))
    print(f"[longcat-lab] wrote {args.out}")


__all__ = ["add_parser", "run"]
