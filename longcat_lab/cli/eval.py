"""`longcat-lab eval --ckpt RUN`: the evaluator on a checkpoint (or a run folder's newest), printed as a table and
written as `eval.json` inside the checkpoint folder. With `--agentic`, the agentic evaluation instead
(docs/design.md §5.5): pass^k on held-out synthesised tasks for the checkpoint, the `--base` model, the
random-valid-call baseline and the expert, and arithmetic with and without the calculator (`agentic.json`);
`--structured both` plays each model with its tool calls constrained to the schemas and free, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from longcat_lab._util import check_int, check_seed
from longcat_lab.eval.agentic import STRUCTURED, evaluate_agentic_checkpoint, format_agentic
from longcat_lab.eval.suite import evaluate_checkpoint, format_table


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="bits per byte, arithmetic, code and routing metrics of a checkpoint")
    p.add_argument("--ckpt", type=Path, required=True, help="a checkpoint folder or a run folder (its newest)")
    p.add_argument("--level", choices=("full", "cheap"), default="full", help="cheap: bits per byte and routing only")
    p.add_argument("--arithmetic", type=int, default=32, metavar="N", help="held-out problems to solve")
    p.add_argument("--code", type=int, default=24, metavar="N", help="held-out functions to complete")
    p.add_argument("--no-write", action="store_true", help="print only; do not write eval.json")
    ag = p.add_argument_group("agentic evaluation (--agentic)")
    ag.add_argument("--agentic", action="store_true", help="pass^k on held-out tool-use tasks instead")
    ag.add_argument(
        "--base",
        type=Path,
        help="the pre-trained checkpoint to compare with (default: the one --ckpt was fine-tuned from)",
    )
    ag.add_argument("--per-cell", type=int, default=1, metavar="N", help="tasks per difficulty cell")
    ag.add_argument(
        "--cells",
        nargs="+",
        metavar="I-T-U",
        help="difficulty cells to evaluate, levels of information-toolset-user (default: all 27), e.g. 1-1-1 3-1-1",
    )
    ag.add_argument("--k", type=int, default=2, help="trials per task: pass^1..pass^k")
    ag.add_argument("--temperature", type=float, default=0.5, help="sampling temperature of the models' trials")
    ag.add_argument("--max-new-tokens", type=int, default=96, metavar="N", help="longest reply")
    ag.add_argument("--max-turns", type=int, default=20, metavar="N", help="assistant turns before an episode stops")
    ag.add_argument("--seed", type=int, default=1, help="designer seed of the evaluation tasks")
    ag.add_argument("--sft-data", type=Path, help="fine-tuning JSONL: refuse tasks that also appear in it")
    ag.add_argument("--no-progress", action="store_true", help="no progress bars")
    ag.add_argument(
        "--structured",
        choices=STRUCTURED,
        default="on",
        help="the models' tool calls constrained to the tools' JSON schemas (on), free (off), or both side by side",
    )
    return p


def run(args: argparse.Namespace) -> None:
    if args.agentic:
        return run_agentic(args)
    check_int("--arithmetic", args.arithmetic)
    check_int("--code", args.code)
    result, path = evaluate_checkpoint(args.ckpt, args.level, args.arithmetic, args.code, write=not args.no_write)
    print(f"[longcat-lab] evaluation of {result['checkpoint']} (step {result['step']}, {result['seconds']:.0f} s)")
    print(format_table(result))
    if path:
        print(f"[longcat-lab] wrote {path}")


def run_agentic(args: argparse.Namespace) -> None:
    for name in ("per_cell", "k", "max_new_tokens", "max_turns"):
        check_int("--" + name.replace("_", "-"), getattr(args, name))
    check_int("--arithmetic", args.arithmetic)
    check_seed("--seed", args.seed)
    result, path = evaluate_agentic_checkpoint(
        args.ckpt,
        base=args.base,
        per_cell=args.per_cell,
        cells=args.cells,
        k=args.k,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        max_turns=args.max_turns,
        arithmetic_n=args.arithmetic,
        sft_data=args.sft_data,
        seed=args.seed,
        write=not args.no_write,
        progress=not args.no_progress,
        structured=args.structured,
    )
    ckpt = result["models"]["fine-tuned"]["checkpoint"]
    print(f"[longcat-lab] agentic evaluation of {ckpt} ({result['seconds']:.0f} s)")
    print(format_agentic(result))
    if path:
        print(f"[longcat-lab] wrote {path}")


__all__ = ["add_parser", "run", "run_agentic"]
