"""An OpenAI chat-completions request, checked (docs/design.md §7.2): `parse_request` turns a JSON body into a
`ChatRequest` (the prompt rendered with the chat template and tokenized, the sampling settings) or raises
`BadRequest` naming the field; `Result` is what a finished generation returns.

Structured outputs go through the agents' constrained decoder (`inference.structured`), one constraint per request
in its `logits_mask`: `tool_choice` "auto" constrains a call once the model opens one, "required" or a named
function makes the whole reply one call (to an offered tool, or to that one), and `response_format` `json_object`
or `json_schema` makes it a JSON object or a value of the schema (or, with tools on "auto", a call instead). A reply
cut off by `max_tokens` may be unfinished JSON; its finish_reason is then "length".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from longcat_lab.chat import encode_chat, render
from longcat_lab.chat.template import ChatFormatError
from longcat_lab.inference.structured import ToolCallDecoder, row_hook

MAX_STOP = 4  # as the OpenAI API


class BadRequest(ValueError):
    """A request the server refuses (HTTP 400, or `status`), with a message naming the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class ChatRequest:
    """A checked request: the prompt's token ids and the sampling settings."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    tools: list[dict] | None
    stream: bool
    include_usage: bool
    # Constrained decoding's hook (structured outputs): masks this request's logits row before each token is drawn,
    # given the ids drawn so far (`inference.batch.LogitsMask`).
    logits_mask: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None


@dataclass
class Result:
    """A finished generation: the raw text, its parsed content and tool calls, why it ended, token counts."""

    text: str
    content: str
    tool_calls: list[dict]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (low < v if low_open else low <= v) and v <= high
    if not ok:
        side = "(" if low_open else "["
        raise BadRequest(f"{name}={v!r} is not allowed: it must be a number in {side}{low:g}, {high:g}]", name)
    return float(v)


def _text_content(content: Any, i: int) -> str | None:
    """A message's content as a string: a string, None, or OpenAI's list of text parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)  # text parts: {"type": "text", "text": ...}
    raise BadRequest(f"messages[{i}].content is not allowed: it must be a string or a list of text parts", "messages")


def _messages(raw: Any) -> list[dict]:
    """OpenAI messages in the form `chat.render` takes: text content, call arguments as objects."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages is not allowed: it must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}]={m!r} is not allowed: each message must be an object", "messages")
        msg = {"role": m.get("role"), "content": _text_content(m.get("content"), i)}
        if msg["content"] is None and not (m.get("role") == "assistant" and m.get("tool_calls")):
            raise BadRequest(f"messages[{i}].content is missing: only an assistant message with tool_calls may omit it")
        calls = []
        for j, call in enumerate(m.get("tool_calls") or []):
            f = call.get("function") if isinstance(call, dict) else None
            args = f.get("arguments") if isinstance(f, dict) else None
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                args = None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(args, dict):
                raise BadRequest(
                    f"messages[{i}].tool_calls[{j}] is not allowed: it needs function.name and function.arguments, "
                    "a JSON object (or a string holding one)",
                    "messages",
                )
            calls.append({"type": "function", "function": {"name": f["name"], "arguments": args}})
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _stop(raw: Any) -> list[str]:
    stop = [raw] if isinstance(raw, str) else (raw or [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"stop={raw!r} is not allowed: it must be a string or a list of up to 4 non-empty strings")
    return stop


def _tool_name(tool: dict) -> str | None:
    f = tool.get("function", tool)  # OpenAI's {"type": "function", "function": {...}} or a flat spec
    return f.get("name") if isinstance(f, dict) else None


def _tool_choice(choice: Any, tools: list[dict] | None) -> str | None:
    """The tool `tool_choice` names ({"type": "function", "function": {"name": ...}}), else None; BadRequest for a
    value that is not one of OpenAI's or that needs tools the request lacks."""
    if choice in (None, "auto", "none"):
        return None
    offered = [_tool_name(t) for t in tools or []]
    if isinstance(choice, dict):
        f = choice.get("function") if choice.get("type") == "function" else None
        named = f.get("name") if isinstance(f, dict) else None
        if isinstance(named, str):
            if named not in offered:
                raise BadRequest(
                    f"tool_choice names {named!r}: it is not one of the offered tools {offered}", "tool_choice"
                )
            return named
    elif choice == "required":
        if not offered:
            raise BadRequest("tool_choice='required' is not allowed without tools", "tool_choice")
        return None
    raise BadRequest(
        f"tool_choice={choice!r} is not allowed: it must be 'auto', 'none', 'required' or "
        '{"type": "function", "function": {"name": <an offered tool>}}',
        "tool_choice",
    )


def _response_schema(fmt: Any) -> dict | None:
    """The JSON schema `response_format` asks the reply to satisfy, or None for free text."""
    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "object"}
    spec = fmt.get("json_schema") if kind == "json_schema" else None
    if isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("schema", {}), dict):
        return spec.get("schema", {})
    raise BadRequest(
        f"response_format={fmt!r} is not allowed: it must be {{'type': 'text'}}, {{'type': 'json_object'}} or "
        "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}",
        "response_format",
    )


def _constraint(body: dict, tools: list[dict] | None, decoder: ToolCallDecoder | None):
    """The request's logits hook for structured outputs (`inference.structured.row_hook`), or None."""
    choice = body.get("tool_choice")
    named = _tool_choice(choice, tools)
    schema = _response_schema(body.get("response_format"))
    whole = named is not None or choice == "required"  # the reply is one call
    if whole and schema is not None:
        raise BadRequest(
            f"response_format is not allowed with tool_choice={choice!r}: the reply is a tool call", "response_format"
        )
    if schema is None and not tools:
        return None
    if decoder is None:
        if schema is None and not whole:
            return None  # "auto" without the constrained decoder: calls are parsed, as without it
        field = "response_format" if schema is not None else "tool_choice"
        raise BadRequest(f"{field} is not available on this server: constrained decoding is off (speculative)", field)
    if named is not None:
        tools = [t for t in tools if _tool_name(t) == named]
    try:
        if schema is None and not whole:
            return row_hook(decoder.constraint(tools))
        return row_hook(decoder.reply_constraint(schema, tools))
    except ValueError as err:
        raise BadRequest(str(err), "response_format" if str(err).startswith("schema=") else "tools") from None


def parse_request(body: Any, name: str, tokenizer, context: int, decoder: ToolCallDecoder | None = None) -> ChatRequest:
    """Check an OpenAI chat-completions body for the model served as `name` (with `context` positions); raise
    BadRequest naming the first field that is wrong. `decoder` constrains structured outputs (without it only
    "auto" and "none" tool choices and free-text replies are served)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if not isinstance(body.get("model"), str):
        raise BadRequest(f"model={body.get('model')!r} is not allowed: name the served model, {name!r}", "model")
    if body["model"] != name:
        raise BadRequest(f"model={body.get('model')!r} is not served here: this server serves {name!r}", "model", 404)
    if body.get("n", 1) != 1:
        raise BadRequest(f"n={body.get('n')!r} is not allowed: this server returns one choice (n=1)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise BadRequest(f"{name}={body.get(name)!r} is not supported: only 0", name)
    if body.get("logprobs"):
        raise BadRequest("logprobs=true is not supported", "logprobs")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise BadRequest("tools is not allowed: it must be a list of function tools", "tools")
    tools = None if body.get("tool_choice") == "none" else (tools or None)
    logits_mask = _constraint(body, tools, decoder)
    try:
        prompt = render(_messages(body.get("messages")), tools)
    except ChatFormatError as err:
        raise BadRequest(str(err), "messages" if "messages" in str(err) else "tools") from None
    ids = encode_chat(tokenizer, prompt).ids  # only the template's markers are special tokens
    room = context - len(ids)
    if room < 1:
        raise BadRequest(
            f"the prompt is {len(ids)} tokens: the model's context is {context}; shorten the conversation",
            "messages",
        )
    raw_max = body.get("max_completion_tokens", body.get("max_tokens"))
    if raw_max is None:
        max_tokens = room
    elif isinstance(raw_max, int) and not isinstance(raw_max, bool) and 1 <= raw_max <= room:
        max_tokens = raw_max
    else:
        raise BadRequest(
            f"max_tokens={raw_max!r} is not allowed: it must be an integer in [1, {room}] (the context left after "
            f"the {len(ids)}-token prompt)",
            "max_tokens",
        )
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise BadRequest(f"seed={seed!r} is not allowed: it must be an integer in [0, 2**63)", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream={stream!r} is not allowed: it must be true or false", "stream")
    options = body.get("stream_options") or {}
    return ChatRequest(
        prompt_ids=ids,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=seed,
        stop=_stop(body.get("stop")),
        tools=tools,
        stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        logits_mask=logits_mask,
    )


__all__ = ["MAX_STOP", "BadRequest", "ChatRequest", "Result", "parse_request"]
