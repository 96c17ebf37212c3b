"""The LongCat-Flash chat format (docs/design.md §5.1): the markers, `render` for OpenAI-style messages, and the Jinja
`chat_template` that gives the same string through transformers' `apply_chat_template`.

Every piece of literal text of the format is a constant below, and both `render` and `chat_template()` are built
from these constants, so the Python renderer and the exported Jinja template cannot drift apart (a test renders the
same conversations through both). The tool-response markers are our choice where the official format is
undocumented (docs/design.md §5.1); they are defined here and nowhere else.

Rules, identical in both renderers:
- an optional first `system` message becomes `SYSTEM:{content} `;
- a round is `[Round i] USER:{slot} ASSISTANT:{reply}</longcat_s>`, rounds joined by one space, i from 0;
- a slot holds one user message and/or the results of the previous reply's tool calls, each `tool` message wrapped
  as `<longcat_tool_response>\\n{content}\\n</longcat_tool_response>`, consecutive pieces with no separator;
- a reply is its content followed by one block per call,
  `<longcat_tool_call>\\n{"name": ..., "arguments": {...}}\\n</longcat_tool_call>`, with no separator (the form
  SGLang's detector expects);
- with tools, the tool description block and `\\n\\n## Messages\\n` come before everything else;
- `add_generation_prompt` appends ` ASSISTANT:` when the conversation ends with an open slot.
`render` returns a `ChatText`: the string plus the spans of the markers the template itself wrote. Only those
become special tokens (`chat.tokens.encode_chat`); a marker spelled inside a message, a tool result, a call's
arguments or a tool description stays plain text, so no one can forge a turn, a call or a tool result by typing
its markers (docs/design.md §9).
Malformed input (unknown role, a system message after the first, two user messages in a row, an assistant message
with no slot before it, non-string content, arguments that are not a JSON object) is refused by both.
"""

from __future__ import annotations

import json
from typing import Any

END_OF_TURN = "</longcat_s>"
TOOL_CALL_OPEN = "<longcat_tool_call>"
TOOL_CALL_CLOSE = "</longcat_tool_call>"
# Not documented by the model card; third-party code reports these names for the official template (§7).
TOOL_RESPONSE_OPEN = "<longcat_tool_response>"
TOOL_RESPONSE_CLOSE = "</longcat_tool_response>"
# The markers our tokenizer keeps as single special tokens (data.tokenizer adds them).
SPECIAL_TOKENS = (END_OF_TURN, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)

SYSTEM_PREFIX = "SYSTEM:"
USER_PREFIX = "USER:"
ASSISTANT_PREFIX = " ASSISTANT:"
TOOLS_HEADER = "## Tools\nYou have access to the following tools:\n\n### Tool namespace: function\n"
TOOL_NAME = "\n#### Tool name: "
TOOL_DESCRIPTION = "\n\nDescription: "
TOOL_SCHEMA = "\n\nInputSchema:\n"
TOOL_END = "\n"
TOOLS_FOOTER = (
    "\n**Note**: For each function call, return a json object with function name and arguments within "
    f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags as follows:\n{TOOL_CALL_OPEN}\n"
    '{"name": <function-name>, "arguments": <args-dict>}\n'
    f"{TOOL_CALL_CLOSE}\nWhen several functions are called at once, wrap each call in its own {TOOL_CALL_OPEN} "
    "block and place the blocks one after another."
)
MESSAGES_HEADER = "\n\n## Messages\n"


class ChatFormatError(ValueError):
    """A conversation that the LongCat format cannot express."""


class _Content(str):
    """A piece of text that came from a message or a tool spec, not from the template: its markers stay plain."""


class ChatText(str):
    """A rendered conversation: the string, plus `specials`, the sorted [start, end) spans of the markers that the
    template wrote. Slicing or concatenating gives a plain `str`, whose markers then all encode as plain text (the
    safe side)."""

    specials: tuple[tuple[int, int], ...] = ()


def _assemble(pieces: list[str]) -> ChatText:
    """Join template pieces and `_Content` pieces, recording where the template pieces hold a marker."""
    specials, at = [], 0
    for piece in pieces:
        if not isinstance(piece, _Content):
            for marker in SPECIAL_TOKENS:
                start = piece.find(marker)
                while start >= 0:
                    specials.append((at + start, at + start + len(marker)))
                    start = piece.find(marker, start + len(marker))
        at += len(piece)
    text = ChatText("".join(pieces))
    text.specials = tuple(sorted(specials))
    return text


def _function(entry: Any, what: str) -> dict:
    """The function part of an OpenAI-style tool or tool call (`{"type": "function", "function": {...}}`), or the
    entry itself when it is already flat."""
    if not isinstance(entry, dict):
        raise ChatFormatError(f"{what}={entry!r} is not allowed: it must be a dict")
    f = entry.get("function", entry)
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise ChatFormatError(f"{what}={entry!r} is not allowed: it needs a string 'name'")
    return f


def _call_pieces(name: str, arguments: dict) -> list[str]:
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return [f"{TOOL_CALL_OPEN}\n", _Content(body), f"\n{TOOL_CALL_CLOSE}"]


def _response_pieces(content: str) -> list[str]:
    return [f"{TOOL_RESPONSE_OPEN}\n", _Content(content), f"\n{TOOL_RESPONSE_CLOSE}"]


def _tools_pieces(tools: list[dict]) -> list[str]:
    out = [TOOLS_HEADER]
    for i, tool in enumerate(tools):
        f = _function(tool, f"tools[{i}]")
        schema = json.dumps(f.get("parameters") or {}, ensure_ascii=False, indent=2)
        description = _Content(f.get("description") or "")
        out += [TOOL_NAME, _Content(f["name"]), TOOL_DESCRIPTION, description, TOOL_SCHEMA, _Content(schema), TOOL_END]
    out.append(TOOLS_FOOTER)
    return out


def tool_call_block(name: str, arguments: dict) -> ChatText:
    """One call as the model emits it."""
    return _assemble(_call_pieces(name, arguments))


def tool_response_block(content: str) -> ChatText:
    return _assemble(_response_pieces(content))


def tools_block(tools: list[dict]) -> ChatText:
    """The tool description that precedes `## Messages` (no trailing separator)."""
    return _assemble(_tools_pieces(tools))


def _text(message: dict, i: int) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise ChatFormatError(f"messages[{i}].content={content!r} is not allowed: it must be a string")
    return content


def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> ChatText:
    """The prompt string for `messages` (OpenAI style: roles system, user, assistant with optional `tool_calls`
    whose `arguments` are dicts, tool) and optional `tools` (OpenAI function specs or flat {name, description,
    parameters}). Raises ChatFormatError naming the message for anything the format cannot express. The result is a
    `ChatText`: encode it with `chat.tokens.encode_chat`, which makes only the template's markers special."""
    if not isinstance(messages, list):
        raise ChatFormatError(f"messages={type(messages).__name__} is not allowed: it must be a list of dicts")
    out = [*_tools_pieces(tools), MESSAGES_HEADER] if tools else []
    round_, open_, last = 0, False, ""
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "system":
            if i != 0:
                raise ChatFormatError(f"messages[{i}] is a system message: only the first message may be one")
            out += [SYSTEM_PREFIX, _Content(_text(m, i)), " "]
        elif role in ("user", "tool"):
            if not open_:
                out.append(f"{' ' if round_ else ''}[Round {round_}] {USER_PREFIX}")
                open_ = True
            elif role == "user" and last == "user":
                raise ChatFormatError(f"messages[{i}] is a second user message in a row: merge them into one")
            out += [_Content(_text(m, i))] if role == "user" else _response_pieces(_text(m, i))
        elif role == "assistant":
            if not open_:
                raise ChatFormatError(f"messages[{i}] is an assistant message with no user or tool message before it")
            content = m.get("content")
            if content is not None and not isinstance(content, str):
                raise ChatFormatError(f"messages[{i}].content={content!r} is not allowed: it must be a string")
            out += [ASSISTANT_PREFIX, _Content(content or "")]
            for j, call in enumerate(m.get("tool_calls") or []):
                f = _function(call, f"messages[{i}].tool_calls[{j}]")
                if not isinstance(f.get("arguments"), dict):
                    raise ChatFormatError(
                        f"messages[{i}].tool_calls[{j}].arguments={f.get('arguments')!r} is not allowed: "
                        "it must be a dict (a JSON object), not a JSON string"
                    )
                out += _call_pieces(f["name"], f["arguments"])
            out.append(END_OF_TURN)
            round_, open_ = round_ + 1, False
        else:
            raise ChatFormatError(
                f"messages[{i}].role={role!r} is not allowed: it must be system, user, assistant or tool"
            )
        last = role
    if add_generation_prompt and open_:
        out.append(ASSISTANT_PREFIX)
    return _assemble(out)


def _lit(text: str) -> str:
    """`text` as a Jinja string literal (Jinja unescapes string literals as Python does, so JSON escapes work)."""
    return json.dumps(text)


def chat_template() -> str:
    """The Jinja template for tokenizer_config.json: under transformers' settings (trim_blocks, lstrip_blocks, its
    `tojson` filter and `raise_exception`) `apply_chat_template` renders exactly what `render` does. Every tag trims
    the whitespace around it, so the template's own layout never reaches the output."""

    def fail(message: str) -> str:
        return "{{- raise_exception(" + _lit(message) + ") -}}"

    def need_name(var: str, what: str) -> str:
        return "{%- if " + var + "['name'] is not string -%}" + fail(f"{what} needs a string 'name'") + "{%- endif -%}"

    lines = [
        "{%- set ns = namespace(round=0, open=false, last='') -%}",
        "{%- if tools -%}",
        "{{- " + _lit(TOOLS_HEADER) + " -}}",
        "{%- for tool in tools -%}",
        "{%- set f = tool['function'] if tool['function'] is defined else tool -%}",
        need_name("f", "a tool"),
        "{{- "
        + _lit(TOOL_NAME)
        + " ~ f['name'] ~ "
        + _lit(TOOL_DESCRIPTION)
        + " ~ (f['description'] or '') ~ "
        + _lit(TOOL_SCHEMA)
        + " ~ ((f['parameters'] or {}) | tojson(indent=2)) ~ "
        + _lit(TOOL_END)
        + " -}}",
        "{%- endfor -%}",
        "{{- " + _lit(TOOLS_FOOTER + MESSAGES_HEADER) + " -}}",
        "{%- endif -%}",
        "{%- for m in messages -%}",
        "{%- if m['role'] != 'assistant' and m['content'] is not string -%}"
        + fail("message content must be a string")
        + "{%- endif -%}",
        "{%- if m['role'] == 'system' -%}",
        "{%- if not loop.first -%}" + fail("only the first message may be a system message") + "{%- endif -%}",
        "{{- " + _lit(SYSTEM_PREFIX) + " ~ m['content'] ~ ' ' -}}",
        "{%- elif m['role'] == 'user' or m['role'] == 'tool' -%}",
        "{%- if not ns.open -%}",
        "{{- (' ' if ns.round > 0 else '') ~ '[Round ' ~ ns.round ~ '] ' ~ " + _lit(USER_PREFIX) + " -}}",
        "{%- set ns.open = true -%}",
        "{%- elif m['role'] == 'user' and ns.last == 'user' -%}",
        fail("two user messages in a row"),
        "{%- endif -%}",
        "{%- if m['role'] == 'user' -%}{{- m['content'] -}}{%- else -%}",
        "{{- " + _lit(TOOL_RESPONSE_OPEN + "\n") + " ~ m['content'] ~ " + _lit("\n" + TOOL_RESPONSE_CLOSE) + " -}}",
        "{%- endif -%}",
        "{%- elif m['role'] == 'assistant' -%}",
        "{%- if not ns.open -%}"
        + fail("an assistant message needs a user or tool message before it")
        + "{%- endif -%}",
        "{{- " + _lit(ASSISTANT_PREFIX) + " -}}",
        "{%- if m['content'] is defined and m['content'] is not none -%}",
        "{%- if m['content'] is not string -%}" + fail("message content must be a string") + "{%- endif -%}",
        "{{- m['content'] -}}",
        "{%- endif -%}",
        "{%- for call in (m['tool_calls'] or []) -%}",
        "{%- set f = call['function'] if call['function'] is defined else call -%}",
        need_name("f", "a tool call"),
        "{%- if f['arguments'] is not mapping -%}" + fail("tool call arguments must be a dict") + "{%- endif -%}",
        "{{- "
        + _lit(TOOL_CALL_OPEN + "\n")
        + " ~ ({'name': f['name'], 'arguments': f['arguments']} | tojson) ~ "
        + _lit("\n" + TOOL_CALL_CLOSE)
        + " -}}",
        "{%- endfor -%}",
        "{{- " + _lit(END_OF_TURN) + " -}}",
        "{%- set ns.round = ns.round + 1 -%}{%- set ns.open = false -%}",
        "{%- else -%}",
        fail("message role must be system, user, assistant or tool"),
        "{%- endif -%}",
        "{%- set ns.last = m['role'] -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt and ns.open -%}{{- " + _lit(ASSISTANT_PREFIX) + " -}}{%- endif -%}",
    ]
    return "\n".join(lines)
