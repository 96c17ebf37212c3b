"""What the subcommands share: the decoding switches of `sample` and `serve`, the sampling checks, the `--out` check,
and `run_command`, which turns bad input into one line on stderr."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path

from longcat_lab._util import check_int, check_nonnegative, check_seed, check_top_p, os_error_line
from longcat_lab.checkpoint import CheckpointError
from longcat_lab.inference.options import QUANTIZE, load_for_decoding
from longcat_lab.train import TrainingError

# Where an OSError of each command most likely points; the one-line message names it.
OS_ERROR_ARGUMENT = {"train": "--out", "sft": "--out", "sweep": "--out", "synth": "--out", "arithmetic": "--out"}


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """`--quantize`, `--compile` and `--speculative` (docs/design.md §6.2 for the MTP draft, §16 for int8 and
    compile); `load_decoding_model` applies them."""
    parser.add_argument("--quantize", choices=QUANTIZE, default="none", help="int8: weight-only, per channel")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding attention and dense FFNs (slower on the CPUs measured; minutes to build)",
    )
    parser.add_argument(
        "--speculative",
        action="store_true",
        help="decode with the checkpoint's MTP module as the draft (batch 1; needs an MTP checkpoint)",
    )


def load_decoding_model(args: argparse.Namespace):
    """(model, tokenizer, meta) of `args.ckpt` with the decoding switches of `add_decoding_arguments` applied."""
    return load_for_decoding(args.ckpt, args.quantize, args.compile, args.speculative)


def check_sampling(args: argparse.Namespace, lowest_new_tokens: int = 1) -> None:
    """`--max-new-tokens`, `--temperature`, `--top-p` and `--seed`, each refused in one line when out of range."""
    check_int("--max-new-tokens", args.max_new_tokens, lowest_new_tokens)
    check_nonnegative("--temperature", args.temperature)
    check_top_p("--top-p", args.top_p)
    check_seed("--seed", args.seed)


def check_out_dir(out: str) -> Path:
    """`--out` as a Path, refused (one line) unless a run folder can be made or written there: checked before any
    work, so that a bad path never costs a training run."""
    if not out.strip():
        raise ValueError(f"--out={out!r} is not allowed: it must name a run folder, e.g. --out runs/tiny")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out={out!r} is not allowed: it is a file; choose a folder")
    probe = path
    while not probe.exists() and probe != probe.parent:  # the nearest part of the path that exists
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--out={out!r} is not allowed: {probe} is a file, so no folder can be made under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out={out!r} is not allowed: {probe} is not writable; choose a folder you may write to")
    return path


def run_command(args: argparse.Namespace, runner: Callable[[argparse.Namespace], None]) -> int:
    """Run one subcommand; bad input (a field, a value, a file) becomes one line on stderr and exit code 2, since
    tracebacks are for bugs, not for bad input."""
    try:
        runner(args)
    except (ValueError, TrainingError, CheckpointError) as err:
        line = str(err)
    except OSError as err:  # a full disk, a read-only place, a file where a folder should be
        line = os_error_line(err, OS_ERROR_ARGUMENT.get(args.command, "--ckpt"))
        if args.command in ("train", "sft") and err.errno in (errno.ENOSPC, errno.EDQUOT):
            line += " with --resume (the checkpoints already written are kept)"
    else:
        return 0
    print(f"longcat-lab {args.command}: error: {line}", file=sys.stderr)
    return 2


__all__ = [
    "OS_ERROR_ARGUMENT",
    "add_decoding_arguments",
    "check_out_dir",
    "check_sampling",
    "load_decoding_model",
    "run_command",
]
