"""Synthesised dialogues in bulk (docs/design.md §5.3), what `longcat-lab synth` writes: `generate` designs N tasks,
solves each with the expert solver and keeps only dialogues that pass their verifier (one JSON-ready record each);
`summarize` and `format_summary` describe the difficulty distribution."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

from longcat_lab._util import check_int
from longcat_lab.synth.agents import AXES, DOMAINS, LEVELS, ExpertSolver, TaskDesigner, to_record, verify


def generate(
    n: int, seed: int = 0, domains: tuple[str, ...] = tuple(DOMAINS), progress: bool = False
) -> Iterator[dict[str, Any]]:
    """N verified records ({"messages", "tools", "difficulty", "task_id"}), the same for the same seed. A dialogue
    that fails its verifier would be a bug; it raises rather than being skipped, so the count is always N."""
    check_int("n", n, 1)
    designer = TaskDesigner(seed, domains)
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


__all__ = ["format_summary", "generate", "summarize"]
