"""Tools as typed Python functions (docs/design.md §5.2): `Tool.from_function` derives the JSON schema from the
signature and the docstring, and a `Registry` checks each call's arguments against that schema with `jsonschema`,
runs it under a time limit and returns a `ToolResult` (ok with content, or an error) — never an exception.

A function becomes a tool when every parameter has a type hint (str, int, float, bool, list[...], dict, Literal[...],
or X | None) and it has a docstring: the first paragraph describes the tool, and an `Args:` section gives one line
per parameter (`name: what it is`). Parameters without a default are required; unknown arguments are refused.
"""

from __future__ import annotations

import functools
import inspect
import json
import threading
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# Long enough for any lab tool, short enough that a runaway call does not stall a dialogue.
DEFAULT_TIMEOUT_S = 2.0
_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


class ToolError(Exception):
    """Raised by a tool for a refusal the caller should read (a policy rule, a missing record): the registry turns
    it into an error result with this message."""


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call: `ok` with JSON-serialisable `content`, or not ok with a one-line `error`."""

    ok: bool
    content: Any = None
    error: str = ""

    def to_text(self) -> str:
        """What a `tool` message carries back to the model."""
        return json.dumps(self.content, ensure_ascii=False, sort_keys=True) if self.ok else f"Error: {self.error}"


def type_schema(hint: Any, where: str) -> dict[str, Any]:
    """The JSON schema of one type hint; ValueError naming `where` for a hint that has none."""
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return {"anyOf": [type_schema(rest[0], where), {"type": "null"}]}
    if origin is list:
        return {"type": "array", "items": type_schema(args[0], where)} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    raise ValueError(f"{where}: type hint {hint!r} has no JSON schema; use str, int, float, bool, list, dict, Literal")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a docstring with an optional Google-style `Args:` section."""
    doc = inspect.cleandoc(doc)
    head, _, rest = doc.partition("\nArgs:\n")
    description = " ".join(head.split("\n\n")[0].split())
    params: dict[str, str] = {}
    last = None
    for line in rest.splitlines():
        if line and not line[0].isspace():
            break  # the next section (Returns:, Raises:, ...)
        name, sep, text = line.strip().partition(":")
        if sep and name.split(" (")[0].isidentifier() and line.startswith(("    ", "\t")) and not line[4:5].isspace():
            last = name.split(" (")[0]
            params[last] = text.strip()
        elif last and line.strip():
            params[last] += " " + line.strip()
    return description, params


@dataclass(frozen=True)
class Tool:
    """A named function with its JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., Any] = field(repr=False, compare=False)

    @classmethod
    def from_function(cls, function: Callable[..., Any], name: str | None = None) -> Tool:
        name = name or function.__name__
        if not function.__doc__:
            raise ValueError(f"tool {name!r} has no docstring: its first paragraph is the tool's description")
        description, docs = parse_docstring(function.__doc__)
        hints = typing.get_type_hints(function)
        properties, required = {}, []
        for p in inspect.signature(function).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ValueError(f"tool {name!r}: *{p.name} cannot be described by a JSON schema")
            if p.name not in hints:
                raise ValueError(f"tool {name!r}: parameter {p.name!r} has no type hint")
            schema = type_schema(hints[p.name], f"tool {name!r} parameter {p.name!r}")
            if p.name in docs:
                schema["description"] = docs[p.name]
            if p.default is p.empty:
                required.append(p.name)
            else:
                schema["default"] = p.default
            properties[p.name] = schema
        parameters = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
        return cls(name, description, parameters, function)

    def spec(self) -> dict[str, Any]:
        """The OpenAI-style function spec that `chat.render` lists in the tools block."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def tool(function: Callable[..., Any]) -> Tool:
    """Decorator form of `Tool.from_function`."""
    return Tool.from_function(function)


def _run_with_limit(function: Callable[[], Any], timeout_s: float | None) -> tuple[str, Any]:
    """("ok", value), ("error", exception) or ("timeout", None). The limit runs the call in a daemon thread: Python
    cannot stop a thread, so a call past its limit is abandoned (its result discarded), not killed."""
    if timeout_s is None:
        try:
            return "ok", function()
        except Exception as err:
            return "error", err
    box: list[tuple[str, Any]] = []

    def target() -> None:
        try:
            box.append(("ok", function()))
        except Exception as err:
            box.append(("error", err))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return box[0] if box else ("timeout", None)


@functools.lru_cache(maxsize=1024)
def _validator(schema_json: str):
    """A checked validator per distinct schema: checking a schema costs milliseconds and registries are built per
    dialogue. (jsonschema itself takes seconds to import, once, which is why it is imported here.)"""
    import jsonschema

    schema = json.loads(schema_json)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


class Registry:
    """Tools by name. `call(name, arguments)` validates, runs under `timeout_s` (None: no limit, no thread) and
    returns a ToolResult; nothing it is given makes it raise."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = (), timeout_s: float | None = DEFAULT_TIMEOUT_S):
        self.tools: dict[str, Tool] = {}
        self._validators: dict[str, Any] = {}
        self.timeout_s = timeout_s
        for t in tools:
            self.add(t)

    def add(self, t: Tool | Callable[..., Any]) -> Tool:
        t = t if isinstance(t, Tool) else Tool.from_function(t)
        if t.name in self.tools:
            raise ValueError(f"tool name {t.name!r} is already registered")
        self._validators[t.name] = _validator(json.dumps(t.parameters, sort_keys=True))
        self.tools[t.name] = t
        return t

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        return [self.tools[n].spec() for n in (self.tools if names is None else names)]

    def call(self, name: Any, arguments: Any) -> ToolResult:
        if not isinstance(name, str) or name not in self.tools:
            return ToolResult(False, error=f"unknown tool {name!r}; known: {sorted(self.tools)}")
        if not isinstance(arguments, dict):
            return ToolResult(False, error=f"{name}: arguments must be a JSON object, got {type(arguments).__name__}")
        errors = sorted(self._validators[name].iter_errors(arguments), key=lambda e: list(e.path))
        if errors:
            where = ".".join(str(p) for p in errors[0].path) or "arguments"
            return ToolResult(False, error=f"{name}: {where}: {errors[0].message}")
        status, value = _run_with_limit(lambda: self.tools[name].function(**arguments), self.timeout_s)
        if status == "timeout":
            return ToolResult(False, error=f"{name}: did not finish within {self.timeout_s} s")
        if status == "error":
            kind = "" if isinstance(value, ToolError) else f"{type(value).__name__}: "
            return ToolResult(False, error=f"{name}: {kind}{value}")
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            return ToolResult(False, error=f"{name}: returned a {type(value).__name__}, which is not JSON data")
        return ToolResult(True, value)
