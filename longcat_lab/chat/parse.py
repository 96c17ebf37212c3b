"""Parsing an assistant reply in the LongCat format into content and tool calls (docs/design.md §5.2).

`parse_assistant(text)` never raises and never executes anything: it finds the `<longcat_tool_call>` blocks with
`str.find` and reads each body with `json.loads`. It accepts what the serving parsers accept: consecutive blocks,
with or without whitespace between them and around the JSON, newline or not after the open marker, and an
unterminated last block (vLLM's rule). Each malformed call becomes one readable string in `.errors` and is left out
of `.tool_calls`; the rest of the reply still parses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from longcat_lab.chat.template import END_OF_TURN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# How much of an offending body an error message quotes.
QUOTE_CHARS = 80


@dataclass
class ParsedTurn:
    """One parsed assistant reply: the text outside the call blocks, the well-formed calls ({"name", "arguments"})
    in order, one message per malformed call, and `rest`: the reply untrimmed with only the well-formed calls cut
    out (a malformed call's text kept where it stood), what a server returns as content so that nothing is lost."""

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rest: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_message(self) -> dict[str, Any]:
        """The reply as an OpenAI-style assistant message (what `chat.render` takes back)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": dict(c)} for c in self.tool_calls]
        return message


def _quote(body: str) -> str:
    return repr(body if len(body) <= QUOTE_CHARS else body[:QUOTE_CHARS] + "...")


def _read_call(body: str, n: int, names: set[str] | None) -> tuple[dict | None, str | None]:
    """The call in one block body, or the reason it is malformed."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as err:
        return None, f"tool call {n}: invalid JSON ({err}): {_quote(body.strip())}"
    if not isinstance(data, dict):
        return None, f"tool call {n}: expected a JSON object with 'name' and 'arguments', got {type(data).__name__}"
    name, arguments = data.get("name"), data.get("arguments")
    if not isinstance(name, str) or not name:
        return None, f"tool call {n}: 'name'={name!r} must be a non-empty string"
    if not isinstance(arguments, dict):
        return None, f"tool call {n} ({name}): 'arguments'={arguments!r} must be a JSON object"
    if names is not None and name not in names:
        return None, f"tool call {n}: unknown tool {name!r}; known: {sorted(names)}"
    return {"name": name, "arguments": arguments}, None


def _tool_names(tools: Iterable[Any] | None) -> set[str] | None:
    """Names from tool specs (OpenAI or flat dicts) or plain strings; None means any name is accepted."""
    if tools is None:
        return None
    names = set()
    for t in tools:
        if isinstance(t, str):
            names.add(t)
        elif isinstance(t, dict):
            f = t.get("function", t)
            if isinstance(f, dict) and isinstance(f.get("name"), str):
                names.add(f["name"])
    return names


def parse_assistant(text: Any, tools: Iterable[Any] | None = None) -> ParsedTurn:
    """Parse one assistant reply. `tools` (specs or names), when given, makes calls to other names errors.

    The reply ends at the first `</longcat_s>`: whatever follows belongs to no turn and is dropped."""
    if not isinstance(text, str):
        return ParsedTurn("", [], [f"reply must be a string, got {type(text).__name__}"])
    try:
        names = _tool_names(tools)
    except Exception as err:  # a caller's odd iterable must not make parsing raise
        return ParsedTurn("", [], [f"tools could not be read: {type(err).__name__}"], text)
    text = text.split(END_OF_TURN, 1)[0]
    content, calls, errors, rest = [], [], [], []
    pos, n = 0, 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start < 0:
            content.append(text[pos:])
            rest.append(text[pos:])
            break
        content.append(text[pos:start])
        rest.append(text[pos:start])
        n += 1
        body_start = start + len(TOOL_CALL_OPEN)
        close = text.find(TOOL_CALL_CLOSE, body_start)
        reopen = text.find(TOOL_CALL_OPEN, body_start)
        if reopen >= 0 and (close < 0 or reopen < close):
            errors.append(f"tool call {n}: not closed before the next {TOOL_CALL_OPEN}: {_quote(text[start:reopen])}")
            rest.append(text[start:reopen])
            pos = reopen
            continue
        end = len(text) if close < 0 else close  # an unterminated last call runs to the end
        call, error = _read_call(text[body_start:end], n, names)
        pos = len(text) if close < 0 else close + len(TOOL_CALL_CLOSE)
        if call is not None:
            calls.append(call)
        else:
            errors.append(error)
            rest.append(text[start:pos])
    outside = "".join(content)
    stray = outside.count(TOOL_CALL_CLOSE)
    if stray:
        errors.append(f"{stray} stray {TOOL_CALL_CLOSE} without an open marker (removed from the content)")
        outside = outside.replace(TOOL_CALL_CLOSE, "")
    return ParsedTurn(outside.strip(), calls, errors, "".join(rest))
