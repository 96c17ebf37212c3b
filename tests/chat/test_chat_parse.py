"""`parse_assistant`: the call variants serving parsers accept, one readable error per malformed call, and (by
property-based fuzzing) that no string makes it raise or execute anything.

Run: `bash tools/test.sh tests/chat/test_chat_parse.py`.
"""

import builtins

from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_lab.chat import END_OF_TURN, SPECIAL_TOKENS, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, parse_assistant

OPEN, CLOSE = TOOL_CALL_OPEN, TOOL_CALL_CLOSE
A = '{"name": "a", "arguments": {"x": 1}}'
B = '{"name": "b", "arguments": {}}'


def names(turn):
    return [c["name"] for c in turn.tool_calls]


def test_plain_text():
    turn = parse_assistant("  Hello there.  </longcat_s> leftovers")
    assert (turn.content, turn.tool_calls, turn.errors) == ("Hello there.", [], [])


def test_variants():
    assert names(parse_assistant(f"Sure.{OPEN}\n{A}\n{CLOSE}")) == ["a"]
    assert names(parse_assistant(f"{OPEN}{A}{CLOSE}{OPEN}{B}{CLOSE}")) == ["a", "b"]  # consecutive, no newlines
    assert names(parse_assistant(f"{OPEN}\n{A}\n{CLOSE}\n\n {OPEN}\r\n\t{B} \n{CLOSE}")) == ["a", "b"]
    assert names(parse_assistant(f"{OPEN}\n{A}\n{CLOSE}{OPEN}\n{B}")) == ["a", "b"]  # unterminated last call
    turn = parse_assistant(f"Let me look.{OPEN}\n{A}\n{CLOSE}{END_OF_TURN}")
    assert turn.ok and turn.content == "Let me look."
    assert turn.to_message() == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [{"type": "function", "function": {"name": "a", "arguments": {"x": 1}}}],
    }


def test_malformed_calls_are_reported_one_each():
    turn = parse_assistant(
        f"{OPEN}{{bad json{CLOSE}{OPEN}[1, 2]{CLOSE}{OPEN}"
        '{"name": "a", "arguments": "{\\"x\\": 1}"}'
        f'{CLOSE}{OPEN}{{"arguments": {{}}}}{CLOSE}{OPEN}{B}{CLOSE}{OPEN}{A}{CLOSE}',
        tools=["a"],
    )
    assert names(turn) == ["a"]
    assert len(turn.errors) == 5, turn.errors
    assert "invalid JSON" in turn.errors[0] and "bad json" in turn.errors[0]
    assert "got list" in turn.errors[1]
    assert "'arguments'" in turn.errors[2] and "JSON object" in turn.errors[2]
    assert "'name'" in turn.errors[3]
    assert "unknown tool 'b'" in turn.errors[4]
    assert [e.split(":")[0].split(" (")[0] for e in turn.errors] == [f"tool call {i}" for i in (1, 2, 3, 4, 5)]
    # `rest` (what a server returns as content) keeps every malformed block where it stood, only the call to a is cut.
    assert turn.rest.startswith(f"{OPEN}{{bad json{CLOSE}{OPEN}[1, 2]{CLOSE}")
    assert turn.rest.endswith(f"{OPEN}{B}{CLOSE}") and A not in turn.rest


def test_cut_off_call_and_stray_close():
    turn = parse_assistant(f'{OPEN}{{"name": "a"{OPEN}{A}{CLOSE} done {CLOSE}')
    assert names(turn) == ["a"]
    assert "not closed" in turn.errors[0] and "stray" in turn.errors[1]
    assert turn.content == "done"


def test_non_strings_do_not_raise():
    for value in (None, 3, b"bytes", ["x"]):
        turn = parse_assistant(value)
        assert turn.tool_calls == [] and len(turn.errors) == 1


FRAGMENTS = st.sampled_from(
    [*SPECIAL_TOKENS, A, B, "{", "}", "[", '"', '"name"', '"arguments"', ":", ",", "\n", " ", "null", "1e999",
     "__import__('os').system('touch PWNED')", "[" * 3000, '{"a":' * 2000]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(st.one_of(FRAGMENTS, st.text(max_size=5)), max_size=30).map("".join)))
def test_fuzz_never_raises_or_executes(text):
    called = []
    real = builtins.eval, builtins.exec
    builtins.eval = builtins.exec = lambda *a, **k: called.append(a)
    try:
        turn = parse_assistant(text, tools=["a", "b"])
    finally:
        builtins.eval, builtins.exec = real
    assert not called
    assert isinstance(turn.content, str) and all(isinstance(e, str) for e in turn.errors)
    for c in turn.tool_calls:
        assert c["name"] in ("a", "b") and isinstance(c["arguments"], dict)
    assert OPEN not in turn.content and CLOSE not in turn.content
    if not turn.tool_calls:  # nothing was cut out: the whole reply comes back as content
        assert turn.rest == text.split(END_OF_TURN, 1)[0]
