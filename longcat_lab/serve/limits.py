"""What the server accepts before a request reaches the engine, and what it returns as a reply's content
(docs/design.md §9.7).

- `read_body(raw, limits)`: the request body, at most `max_body_bytes`, as a JSON object whose every string is
  valid Unicode; then `check_fields` refuses, with a 400 naming the field, what would otherwise fail deep inside
  rendering or tokenising (a non-list `tool_calls`, a non-string tool `description`, too many or too large tools),
  and applies OpenAI's rule for the two spellings of the reply length: `max_completion_tokens` wins unless it is
  null, then `max_tokens` counts.
- `check_prompt(prompt_tokens, limits)`: the rendered prompt's length against `max_prompt_tokens`.
- `reply_content(text, tools)`: the reply with only its well-formed, offered tool calls cut out, so the text of a
  malformed or unoffered call, and text after a call, reaches the client as content instead of vanishing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from longcat_lab._util import check_int
from longcat_lab.chat import parse_assistant
from longcat_lab.serve.engine import BadRequest


@dataclass(frozen=True)
class Limits:
    """The server's request limits (`longcat-lab serve` uses the defaults)."""

    max_body_bytes: int = 1 << 20  # 1 MiB: a lab model's context is a few thousand tokens, ~4 bytes each
    max_prompt_tokens: int | None = None  # None: the model's context (the engine refuses longer prompts anyway)
    max_tools: int = 128  # as the OpenAI API
    max_tool_bytes: int = 16_384  # one tool's JSON; its description and schema are rendered into every prompt

    def __post_init__(self):
        check_int("max_body_bytes", self.max_body_bytes, 1)
        check_int("max_tools", self.max_tools, 0)
        check_int("max_tool_bytes", self.max_tool_bytes, 1)
        if self.max_prompt_tokens is not None:
            check_int("max_prompt_tokens", self.max_prompt_tokens, 1)


class BodyTooLarge(BadRequest):
    """A body over `max_body_bytes` (HTTP 413)."""


async def receive_body(chunks: AsyncIterator[bytes], limits: Limits) -> bytes:
    """The body from `request.stream()`, refused (413) as soon as it passes `max_body_bytes`, before it is all read."""
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > limits.max_body_bytes:
            raise BodyTooLarge(
                f"the request body is over max_body_bytes={limits.max_body_bytes} bytes: send a shorter one", None, 413
            )
    return bytes(data)


def read_body(raw: bytes, limits: Limits) -> dict[str, Any]:
    """The request body as a checked JSON object (`check_fields`); BadRequest naming the field otherwise."""
    if len(raw) > limits.max_body_bytes:
        raise BodyTooLarge(
            f"the request body is {len(raw)} bytes: over max_body_bytes={limits.max_body_bytes}", None, 413
        )
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # also an int of over 4300 digits and hostile nesting
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    where = _lone_surrogate(body, "")
    if where is not None:
        raise BadRequest(f"{where} is not allowed: it holds a lone surrogate (an escape such as \\ud800)", where)
    return check_fields(body, limits)


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (or key) that UTF-8 cannot hold, or None. Iterative: the body may nest deep."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return p or "the request body"
        elif isinstance(v, dict):
            stack += [(k, f"{p}.{k!r}") for k in v] + [(x, f"{p}.{k}" if p else str(k)) for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(x, f"{p}[{i}]") for i, x in enumerate(v)]
    return None


def check_fields(body: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """`body` with the reply length under one name (`max_completion_tokens` when not null, else `max_tokens`),
    after refusing the fields the engine would otherwise trip over."""
    tools = body.get("tools")
    if isinstance(tools, list):
        if len(tools) > limits.max_tools:
            raise BadRequest(f"tools has {len(tools)} entries: at most max_tools={limits.max_tools}", "tools")
        for i, tool in enumerate(tools):
            _check_tool(tool, i, limits)
    messages = body.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if calls is not None and not isinstance(calls, list):
            raise BadRequest(
                f"messages[{i}].tool_calls={calls!r} is not allowed: it must be a list of tool calls", "messages"
            )
    body = dict(body)
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BadRequest(f"{name}={value!r} is not allowed: it must be a positive integer", name)
    if body.get("max_completion_tokens") is None:
        body.pop("max_completion_tokens", None)  # null means unset: max_tokens (if any) then decides
    return body


def _check_tool(tool: Any, i: int, limits: Limits) -> None:
    f = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(f, dict):
        raise BadRequest(f"tools[{i}] is not allowed: it must be a function tool object", "tools")
    size = len(json.dumps(tool, ensure_ascii=False).encode())
    if size > limits.max_tool_bytes:
        raise BadRequest(f"tools[{i}] is {size} bytes of JSON: at most max_tool_bytes={limits.max_tool_bytes}", "tools")
    for key, kind, allowed in (
        ("name", str, "a string"),
        ("description", str, "a string"),
        ("parameters", dict, "a JSON schema object"),
    ):
        value = f.get(key)
        if (value is not None or key == "name") and not isinstance(value, kind):
            raise BadRequest(f"tools[{i}].function.{key}={value!r} is not allowed: it must be {allowed}", "tools")


def check_prompt(prompt_tokens: int, limits: Limits) -> None:
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        raise BadRequest(
            f"the prompt is {prompt_tokens} tokens: at most max_prompt_tokens={limits.max_prompt_tokens}; "
            "shorten the conversation or the tools",
            "messages",
        )


def reply_content(text: str, tools: list[dict] | None) -> str:
    """The reply's text with only its well-formed calls to offered tools cut out (untrimmed): the content returned
    to the client, which keeps a malformed or unoffered call and any text after a call."""
    return parse_assistant(text, tools).rest if tools else text


__all__ = ["BodyTooLarge", "Limits", "check_fields", "check_prompt", "read_body", "receive_body", "reply_content"]
