"""How one agent episode is scored beyond pass or fail (docs/design.md §5.5), for `eval.agentic`: the first failure
category that describes it (`failure_category`, one of CATEGORIES), the errors it got back by kind (`error_kinds`),
and partial credit, how far short of a pass it fell (`partial_credit`).
"""

from __future__ import annotations

from collections import Counter

from longcat_lab.agent.loop import Episode
from longcat_lab.synth.agents import ENVIRONMENTS
from longcat_lab.synth.env import Task

CATEGORIES = (
    "passed",
    "context full",
    "turn limit",
    "never called a tool",
    "only malformed calls",
    "calls refused",
    "wrong end state",
    "facts not told",
)


def failure_category(episode: Episode) -> str:
    """The first of CATEGORIES that describes the episode (read off its counts and the verifier's reasons)."""
    if episode.passed:
        return "passed"
    if episode.stop_reason != "user_stop":
        return "context full" if episode.stop_reason == "context_full" else "turn limit"
    if not episode.tool_calls:
        return "only malformed calls" if episode.malformed else "never called a tool"
    if any("end state" in r for r in episode.reasons):
        return "calls refused" if episode.tool_errors else "wrong end state"
    return "facts not told"


# How an error message starts -> its kind; the first match wins (messages from chat.parse and tools.Registry).
ERROR_KINDS = (
    ("invalid JSON", "malformed: invalid JSON"),
    ("unknown tool", "malformed: unknown tool"),
    ("must be a JSON object", "malformed: arguments not an object"),
    ("expected a JSON object", "malformed: not a call object"),
    ("must be a non-empty string", "malformed: no tool name"),
    ("not closed", "malformed: unclosed block"),
    ("stray", "malformed: stray close marker"),
    ("is not verified", "refused: identity not verified"),
    ("does not match", "refused: wrong PIN or postcode"),
    ("not allowed", "refused: outside the policy's limits"),
    ("is outside", "refused: outside the policy's limits"),
    ("cannot be", "refused: outside the policy's limits"),
    ("only processing", "refused: outside the policy's limits"),
    ("no ", "refused: no such record"),
)


def error_kinds(episode: Episode) -> Counter:
    """The errors the agent got back in one episode, by kind (ERROR_KINDS; a schema violation or anything else is
    "refused: schema" or "other")."""
    out: Counter = Counter()
    for m in episode.messages:
        text = m.get("content") or ""
        if m.get("role") != "tool" or not text.startswith("Error: "):
            continue
        detail = text.split(": ", 2)[-1] if not m.get("malformed") else text
        kind = next((k for key, k in ERROR_KINDS if key in detail), None)
        if kind is None:
            kind = "refused: schema" if not m.get("malformed") and "'" in detail else "other"
        out[kind] += 1
    return out


def partial_credit(task: Task, episode: Episode) -> dict[str, float]:
    """How far one episode got, step by step, for models that pass nothing yet: the share of its call blocks that
    parsed into a call of an offered tool (`valid_calls`; 0 without any block), whether its first write call (a
    tool that changes the database) names the reference's first write tool (`right_write_tool`) and also has its
    arguments (`right_write_arguments`), whether the database ended as the reference leaves it (`right_end_state`,
    the verifier's check), and the assistant turns used (`turns`)."""
    writes = ENVIRONMENTS[task.domain].write_tools
    calls = [c.get("function", c) for m in episode.messages for c in m.get("tool_calls") or []]
    first = next((c for c in calls if c["name"] in writes), None)
    reference = next((a for a in task.actions if a["name"] in writes), None)
    blocks = episode.tool_calls + episode.malformed
    right_tool = first is not None and reference is not None and first["name"] == reference["name"]
    return {
        "valid_calls": episode.tool_calls / blocks if blocks else 0.0,
        "right_write_tool": float(right_tool),
        "right_write_arguments": float(right_tool and first["arguments"] == reference["arguments"]),
        "right_end_state": float(not any(r.startswith("end state differs") for r in episode.reasons)),
        "turns": float(episode.turns),
    }


__all__ = ["CATEGORIES", "ERROR_KINDS", "error_kinds", "failure_category", "partial_credit"]
