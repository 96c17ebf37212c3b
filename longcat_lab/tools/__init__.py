"""Tools a model can call (docs/design.md §5.2): typed Python functions with JSON schemas from their signatures and
docstrings, a `Registry` that validates arguments (`jsonschema`), enforces a time limit and returns a `ToolResult`,
and an `ast`-based `calculator` that never executes text."""

from longcat_lab.tools.calculator import CALCULATOR, CalculatorError, calculate, calculator
from longcat_lab.tools.registry import (
    DEFAULT_TIMEOUT_S,
    Registry,
    Tool,
    ToolError,
    ToolResult,
    parse_docstring,
    tool,
    type_schema,
)

__all__ = [
    "CALCULATOR",
    "DEFAULT_TIMEOUT_S",
    "CalculatorError",
    "Registry",
    "Tool",
    "ToolError",
    "ToolResult",
    "calculate",
    "calculator",
    "parse_docstring",
    "tool",
    "type_schema",
]
