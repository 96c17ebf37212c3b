"""One tool-call turn (docs/design.md §5.5), the same in the agent loop, the terminal chat and the arithmetic
evaluation.

The assistant's text is parsed with `chat.parse_assistant` against the offered tools and appended as an assistant
message. Each well-formed call is validated and run by the `Registry` and its result appended as a `tool` message;
each malformed call is appended as a `tool` message `Error: ...` marked `"malformed": True` (the model reads why,
the verifier skips it, nothing raises). A reply with a call block of either kind leaves the assistant to go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longcat_lab.chat import ParsedTurn, parse_assistant
from longcat_lab.tools import Registry, ToolResult


@dataclass
class Turn:
    """One assistant turn: the parsed reply, each call that ran with its result, and the malformed calls."""

    reply: ParsedTurn
    results: list[tuple[dict[str, Any], ToolResult]] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return self.reply.errors

    @property
    def called(self) -> bool:
        """Whether the reply held a call block (run or malformed): tool messages follow, and the assistant goes on."""
        return bool(self.reply.tool_calls or self.reply.errors)


def tool_turn(text: str, registry: Registry, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> Turn:
    """Parse `text` against `tools` (default: the registry's), run its calls and append the assistant message and
    every tool message to `messages` (module docstring)."""
    parsed = parse_assistant(text, registry.specs() if tools is None else tools)
    messages.append(parsed.to_message())
    turn = Turn(parsed)
    for call in parsed.tool_calls:
        result = registry.call(call["name"], call["arguments"])
        turn.results.append((call, result))
        messages.append({"role": "tool", "content": result.to_text()})
    for error in parsed.errors:
        messages.append({"role": "tool", "content": f"Error: {error}", "malformed": True})
    return turn


__all__ = ["Turn", "tool_turn"]
