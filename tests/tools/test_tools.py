"""Tools: schemas from signatures and docstrings, registry validation (`jsonschema`), structured results with no
exception reaching the caller, the per-call time limit, and the `ast` calculator with its limits, fuzzed with
`hypothesis` (no input crashes it, none executes code).

Run: `bash tools/test.sh tests/tools/test_tools.py`.
"""

import builtins
import os
import threading
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_lab.tools import CALCULATOR, CalculatorError, Registry, Tool, ToolError, ToolResult, calculate


def transfer(amount: float, to: str, currency: Literal["EUR", "USD"] = "EUR", memo: str | None = None) -> dict:
    """Send money to an account.

    Args:
        amount: how much to send, more than zero
        to: the receiving account id
            (as shown on the statement)
        currency: the currency of `amount`

    Returns:
        the receipt
    """
    if amount <= 0:
        raise ToolError(f"amount={amount} must be more than zero")
    return {"sent": amount, "to": to, "currency": currency, "memo": memo}


def test_schema_from_signature_and_docstring():
    t = Tool.from_function(transfer)
    assert t.name == "transfer" and t.description == "Send money to an account."
    props = t.parameters["properties"]
    assert props["amount"] == {"type": "number", "description": "how much to send, more than zero"}
    assert props["to"]["description"] == "the receiving account id (as shown on the statement)"
    assert props["currency"] == {"enum": ["EUR", "USD"], "description": "the currency of `amount`", "default": "EUR"}
    assert props["memo"]["anyOf"] == [{"type": "string"}, {"type": "null"}] and "description" not in props["memo"]
    assert t.parameters["required"] == ["amount", "to"] and t.parameters["additionalProperties"] is False
    assert t.spec()["function"]["name"] == "transfer"


def test_functions_that_cannot_be_tools():
    def untyped(x):
        """Doc."""

    def undocumented(x: int):
        pass

    def odd(x: set):
        """Doc."""

    for f, words in ((untyped, "type hint"), (undocumented, "docstring"), (odd, "no JSON schema")):
        with pytest.raises(ValueError, match=words):
            Tool.from_function(f)


def test_registry_results():
    reg = Registry([transfer, CALCULATOR])
    assert reg.call("transfer", {"amount": 5, "to": "A1"}) == ToolResult(
        True, {"sent": 5, "to": "A1", "currency": "EUR", "memo": None}
    )
    bad = [
        ("nope", {}, "unknown tool 'nope'"),
        ("transfer", "amount=5", "must be a JSON object"),
        ("transfer", {"to": "A1"}, "'amount' is a required property"),
        ("transfer", {"amount": "5", "to": "A1"}, "amount: '5' is not of type 'number'"),
        ("transfer", {"amount": 5, "to": "A1", "extra": 1}, "Additional properties"),
        ("transfer", {"amount": 5, "to": "A1", "currency": "GBP"}, "currency: 'GBP' is not one of"),
        ("transfer", {"amount": -1, "to": "A1"}, "transfer: amount=-1 must be more than zero"),
        ("calculator", {"expression": "1/0"}, "division by zero"),
    ]
    for name, args, words in bad:
        result = reg.call(name, args)
        assert not result.ok and words in result.error, (name, args, result)
        assert result.to_text().startswith("Error: ")
    assert reg.call("calculator", {"expression": "(3 + 4) * 2"}).to_text() == "14"


def test_registry_turns_bugs_and_bad_returns_into_errors():
    def crash() -> int:
        """Divide by zero."""
        return 1 // 0

    def opaque() -> dict:
        """Return something that is not JSON."""
        return {"x": object()}

    reg = Registry([crash, opaque])
    assert reg.call("crash", {}).error == "crash: ZeroDivisionError: integer division or modulo by zero"
    assert "not JSON data" in reg.call("opaque", {}).error


def test_time_limit():
    release = threading.Event()

    def slow() -> str:
        """Wait until released."""
        release.wait(30)
        return "late"

    reg = Registry([slow], timeout_s=0.05)
    try:
        result = reg.call("slow", {})
    finally:
        release.set()
    assert not result.ok and "did not finish within 0.05 s" in result.error


def test_calculator_values_and_refusals():
    assert calculate("(3 + 4) * 2 / 7") == 2.0
    assert calculate("-2 ** 10 + 7 // 2 % 5") == -1021
    assert calculate("2 ** -1") == 0.5
    refusals = {
        "9**9**9": "exponent 387420489 exceeds",
        "10 ** 101": "would exceed",
        "1e99 * 1e99": "exceeds the limit",
        "__import__('os').system('true')": "Call is not allowed",
        "x + 1": "Name is not allowed",
        "'a' * 3": "Constant is not allowed",
        "(-8) ** 0.5": "not a real number",
        "1 +": "not an arithmetic expression",
        "1" * 201: "the limit is 200",
        "[1, 2]": "List is not allowed",
        "True + 1": "Constant is not allowed",
    }
    for expr, words in refusals.items():
        with pytest.raises(CalculatorError, match=words.replace("(", r"\(")):
            calculate(expr)


EXPRESSION_PIECES = st.sampled_from(
    ["1", "9", "0", "2.5", "1e308", "+", "-", "*", "/", "//", "%", "**", "(", ")", " ", "__import__", "os", ".",
     "system", "'touch PWNED'", "lambda", ":", ",", "[", "]", "x", "open", "1j", "_", "\x00"]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=220), st.lists(EXPRESSION_PIECES, max_size=60).map("".join)))
def test_fuzz_calculator_never_crashes_or_executes(text):
    called = []
    real = builtins.eval, builtins.exec
    builtins.eval = builtins.exec = lambda *a, **k: called.append(a)
    try:
        value = calculate(text)
    except CalculatorError as err:
        assert str(err)
    else:
        assert type(value) in (int, float) and abs(value) <= 1e100
    finally:
        builtins.eval, builtins.exec = real
    assert not called and not os.path.exists("PWNED")
