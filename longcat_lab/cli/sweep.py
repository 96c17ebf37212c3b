"""`longcat-lab sweep NAME`: run a named sweep (`experiments.sweeps`) and print its paired summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from longcat_lab._util import atomic_write_bytes, json_bytes
from longcat_lab.experiments.runner import run_growing, run_sweep
from longcat_lab.experiments.summary import format_summary
from longcat_lab.experiments.sweeps import SWEEPS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sweep", help="a named ablation: variants x paired seeds at matched compute")
    p.add_argument("name", choices=sorted(SWEEPS), help="the sweep (docs/design.md §3.6)")
    p.add_argument("--seeds", type=int, default=8, help="paired seeds per variant to start with (default 8)")
    p.add_argument(
        "--max-seeds",
        type=int,
        help="add --seed-step seeds at a time while a verdict is unresolved, up to this many (default: --seeds, "
        "no growth; docs/design.md §3.6 uses 24)",
    )
    p.add_argument("--seed-step", type=int, default=4, help="seeds added per round (default 4)")
    p.add_argument(
        "--allow-drift",
        action="store_true",
        help="report variants whose measured FFN experts per token drift from their target instead of refusing",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    p.add_argument("--out", type=Path, default=Path("runs/sweeps"), help="sweeps folder; the sweep uses OUT/NAME")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    p.add_argument("--preset", choices=("tiny", "mini", "ablation", "small"), default="ablation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--results", type=Path, help="also copy the summary to RESULTS/NAME.json (the committed results)")
    return p


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this sweep's summary (what it records as `command`)."""
    growing = args.max_seeds is not None and args.max_seeds > args.seeds
    return " ".join(
        [f"longcat-lab sweep {args.name} --seeds {args.seeds}"]
        + ([f"--max-seeds {args.max_seeds} --seed-step {args.seed_step}"] if growing else [])
        + [f"--preset {args.preset}"]
        + ([f"--steps {args.steps}"] if args.steps else [])
        + (["--allow-drift"] if args.allow_drift else [])
    )


def run(args: argparse.Namespace) -> None:
    common = dict(
        command=command_line(args),
        jobs=args.jobs,
        steps=args.steps,
        preset=args.preset,
        progress=not args.no_progress,
        on_drift="report" if args.allow_drift else "refuse",
    )
    if args.max_seeds is not None and args.max_seeds > args.seeds:
        summary = run_growing(args.name, args.out, args.seeds, args.max_seeds, args.seed_step, **common)
    else:
        summary = run_sweep(args.name, args.out, seeds=args.seeds, **common)
    print(format_summary(summary))
    print(f"[longcat-lab] wrote {summary['path']}")
    if args.results:
        path = args.results / f"{args.name}.json"
        atomic_write_bytes(path, json_bytes({k: v for k, v in summary.items() if k != "path"}, flat_lists=True))
        print(f"[longcat-lab] wrote {path}")


__all__ = ["add_parser", "command_line", "run"]
