"""`longcat-lab eval --ckpt RUN`: the evaluator on a checkpoint (or a run folder's newest), printed as a table and
written as `eval.json` inside the checkpoint folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="bits per byte, arithmetic, code and routing metrics of a checkpoint")
    p.add_argument("--ckpt", type=Path, required=True, help="a checkpoint folder or a run folder (its newest)")
    p.add_argument("--level", choices=("full", "cheap"), default="full", help="cheap: bits per byte and routing only")
    p.add_argument("--arithmetic", type=int, default=32, metavar="N", help="held-out problems to solve")
    p.add_argument("--code", type=int, default=24, metavar="N", help="held-out functions to complete")
    p.add_argument("--no-write", action="store_true", help="print only; do not write eval.json")
    return p


def run(args) -> None:
    from longcat_lab.eval.suite import evaluate_checkpoint, format_table

    result, path = evaluate_checkpoint(args.ckpt, args.level, args.arithmetic, args.code, write=not args.no_write)
    print(f"[longcat-lab] evaluation of {result['checkpoint']} (step {result['step']}, {result['seconds']:.0f} s)")
    print(format_table(result))
    if path:
        print(f"[longcat-lab] wrote {path}")
