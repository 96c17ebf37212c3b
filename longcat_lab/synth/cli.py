"""`longcat-lab synth --n N --out FILE.jsonl --seed S` (docs/design.md §7): design N tasks, solve each with the
expert solver, keep only dialogues that pass their verifier, write one JSON record per line, and print a summary of
the difficulty distribution. `generate` and `summarize` are the same from Python."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longcat_lab._util import atomic_write_bytes, check_int
from longcat_lab.synth.agents import AXES, DOMAINS, LEVELS, ExpertSolver, TaskDesigner, to_record, verify


def generate(
    n: int, seed: int = 0, domains: tuple[str, ...] = tuple(DOMAINS), progress: bool = False
) -> Iterator[dict[str, Any]]:
    """N verified records ({"messages", "tools", "difficulty", "task_id"}), the same for the same seed. A dialogue
    that fails its verifier would be a bug; it raises rather than being skipped, so the count is always N."""
    check_int("n", n, 1)
    designer = TaskDesigner(seed, domains)
    from tqdm.auto import tqdm

    for i in tqdm(range(n), desc="synth", disable=not progress, dynamic_ncols=True):
        task = designer.design(i)
        messages = ExpertSolver(task).run()
        verdict = verify(task, messages)
        if not verdict.passed:
            raise RuntimeError(f"{task.task_id}: the reference dialogue fails its verifier: {verdict.reasons}")
        yield to_record(task, messages)


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per level of each axis, per domain, and measured means (turns, tool calls, tools offered)."""
    calls = [sum(len(m.get("tool_calls") or []) for m in r["messages"]) for r in records]
    parallel = sum(any(len(m.get("tool_calls") or []) > 1 for m in r["messages"]) for r in records)
    return {
        "records": len(records),
        "levels": {a: {lvl: sum(r["difficulty"][a] == lvl for r in records) for lvl in LEVELS} for a in AXES},
        "domains": dict(Counter(r["task_id"].split("-")[0] for r in records)),
        "mean_messages": sum(len(r["messages"]) for r in records) / max(len(records), 1),
        "mean_tool_calls": sum(calls) / max(len(records), 1),
        "mean_tools_offered": sum(len(r["tools"]) for r in records) / max(len(records), 1),
        "with_parallel_calls": parallel,
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"{summary['records']} verified dialogues; domains {summary['domains']}"]
    for axis, counts in summary["levels"].items():
        lines.append(f"  {axis:12s} " + "  ".join(f"level {lvl}: {c}" for lvl, c in counts.items()))
    lines.append(
        f"  per dialogue: {summary['mean_messages']:.1f} messages, {summary['mean_tool_calls']:.1f} tool calls, "
        f"{summary['mean_tools_offered']:.1f} tools offered; {summary['with_parallel_calls']} with parallel calls"
    )
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    sy = subparsers.add_parser("synth", help="synthesise verified tool-use dialogues on three difficulty axes")
    sy.add_argument("--n", type=int, required=True, help="number of dialogues")
    sy.add_argument("--out", type=Path, required=True, help="output .jsonl file (one record per line)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--domains", nargs="*", default=list(DOMAINS), help=f"any of {', '.join(DOMAINS)}")
    sy.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    records = list(generate(args.n, args.seed, tuple(args.domains), progress=not args.no_progress))
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(args.out, body.encode())
    print(format_summary(summarize(records)))
    print(f"[longcat-lab] wrote {args.out}")
