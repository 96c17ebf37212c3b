"""`longcat-lab arithmetic --n N --out FILE.jsonl [--seed S]`: write 2N fine-tuning records of the reasoning corpus's
word problems, each solved in worked steps and with one calculator call (`agent.arithmetic`, docs/design.md §5.5),
in the JSONL format of `longcat-lab synth`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longcat_lab._util import atomic_write_bytes
from longcat_lab.agent.arithmetic import RECORD_SEED, calculator_records


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("arithmetic", help="write calculator and worked-step fine-tuning records")
    p.add_argument("--n", type=int, required=True, help="problems (two records each)")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    p.add_argument("--seed", type=int, default=RECORD_SEED)
    return p


def run(args: argparse.Namespace) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in calculator_records(args.n, args.seed))
    atomic_write_bytes(args.out, body.encode())
    print(f"[longcat-lab] wrote {2 * args.n} arithmetic records to {args.out}")


__all__ = ["add_parser", "run"]
