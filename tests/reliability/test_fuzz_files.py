"""Property-based fuzzing (hypothesis) of two more files the library reads but may not have written: a
tokenizer.json (`data.tokenizer.read_tokenizer`) and a fine-tuning JSONL of synth records (`data.sft.load_records`).
Either gives a result that works (a tokenizer that encodes; records that render, encode and hash) or one
ValueError of one line naming the file (and, for JSONL, the line), never a traceback of another kind
(docs/design.md §9). Each failure hypothesis found is kept as an `@example`.

Run: `bash tools/test.sh tests/reliability/test_fuzz_files.py`; fuzz: `bash tools/fuzz.sh tests/reliability`.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from longcat_lab.data.config import EOT
from longcat_lab.data.sft import encode_dialogue, load_records, records_digest
from longcat_lab.data.tokenizer import read_tokenizer, train_tokenizer
from longcat_lab.testing import SFT_MESSAGES, SFT_TOOLS

FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([(2, 32), (2, 64), (10, 400)]).map(lambda p: p[0] ** p[1]),  # past u32, u64, a float
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
)
json_values = st.recursive(
    values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
)
paths = st.lists(st.integers(0, 10**6), max_size=6)


def one_line(err: Exception) -> None:
    assert str(err) and "\n" not in str(err), repr(err)


def replaced(doc, path: list[int], value):
    """A copy of the JSON `doc` with the node that `path` leads to (each step picks a key or an item by index,
    modulo their count) replaced by `value`."""
    doc = copy.deepcopy(doc)
    parent, key, node = None, None, doc
    for step in path:
        if isinstance(node, dict) and node:
            key = sorted(node)[step % len(node)]
        elif isinstance(node, list) and node:
            key = step % len(node)
        else:
            break
        parent, node = node, node[key]
    if parent is None:
        return value
    parent[key] = value
    return doc


TOOLS = SFT_TOOLS
MESSAGES = SFT_MESSAGES[:-1]  # ends with the assistant's answer
RECORD = {"messages": MESSAGES, "tools": TOOLS, "difficulty": {}, "task_id": "bank-000001"}


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(m["content"] for m in MESSAGES) + " balance account holds support agent look tool call"
    return train_tokenizer([text] * 20, 320)


# tokenizer.json ------------------------------------------------------------------------------------------------
@FUZZ
@given(
    how=st.sampled_from(["json", "truncate", "flip", "replace"]),
    path=paths,
    value=json_values,
    where=st.floats(0, 1),
    blob=st.binary(max_size=64),
)
@example(how="json", path=[], value=[], where=0.0, blob=b"")  # tokenizers raises a bare Exception
@example(how="flip", path=[], value=None, where=0.0, blob=b"")  # not UTF-8
@example(how="json", path=[0], value=[{"id": 2**40, "content": "x"}], where=0.0, blob=b"")  # added_tokens id > u32
# model.continuing_subword_prefix="00": a Rust panic (pyo3's PanicException, a BaseException) in Tokenizer.from_str
@example(how="json", path=[2, 1], value="00", where=0.0, blob=b"")
@example(how="json", path=[2, 9, 5], value=10**6, where=0.0, blob=b"")  # a token id past vocab_size
def test_tokenizer_json(tokenizer, tmp_path, how, path, value, where, blob):
    file = tmp_path / "tokenizer.json"
    data = tokenizer.to_str().encode()
    cut = int(where * len(data))
    if how == "json":
        file.write_text(json.dumps(replaced(json.loads(data), path, value)))
    elif how == "truncate":
        file.write_bytes(data[:cut])
    elif how == "flip":
        file.write_bytes(data[:cut] + bytes([data[min(cut, len(data) - 1)] ^ 0xFF]) + data[cut + 1 :])
    else:
        file.write_bytes(blob)
    try:
        tok = read_tokenizer(file, 320)
    except ValueError as err:
        one_line(err)
        assert str(file) in str(err)
    else:
        ids = tok.encode(f"Account A7 holds 120.{EOT}").ids
        assert all(0 <= i < 320 for i in ids)


def test_tokenizer_without_the_special_tokens_is_named(tokenizer, tmp_path):
    doc = json.loads(tokenizer.to_str())
    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] != EOT]
    doc["model"]["vocab"].pop(EOT, None)
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(
        ValueError, match=r"tokenizer\.json: the tokenizer lacks the special token\(s\) \['<\|endoftext"
    ):
        read_tokenizer(tmp_path / "tokenizer.json")


# Fine-tuning JSONL ---------------------------------------------------------------------------------------------
lines = st.one_of(
    st.tuples(paths, json_values).map(lambda pv: json.dumps(replaced(RECORD, *pv)).encode()),
    st.tuples(paths, json_values).map(lambda pv: json.dumps(replaced(RECORD, *pv), ensure_ascii=False).encode()),
    st.binary(max_size=30),
    st.just(json.dumps(RECORD).encode()),
)


@FUZZ
@given(data=st.lists(lines, min_size=1, max_size=3).map(b"\n".join))
@example(data=json.dumps(replaced(RECORD, [1, 2, 2], 5)).encode())  # tool_calls: 5 -> TypeError in render
@example(data=json.dumps(replaced(RECORD, [3, 0, 0, 0], 5)).encode())  # a tool's description: 5 -> TypeError
@example(data=json.dumps(replaced(RECORD, [1, 4, 0], "\ud800")).encode())  # a lone surrogate -> UnicodeEncodeError
@example(data=json.dumps(replaced(RECORD, [1], "x")).encode())  # messages not a list
@example(data=json.dumps(replaced(RECORD, [1, 1, 0], [5])).encode())  # content not a string
@example(data=json.dumps(replaced(RECORD, [1, 4, 0], "a\u2028b"), ensure_ascii=False).encode())  # splitlines cut it
@example(data=b'{"messages": ' + b"1" * 5000 + b"}")  # ValueError of int() past 4300 digits, no file named
@example(data=b"[" * 100_000)  # RecursionError
@example(data=json.dumps(RECORD).encode() + b"\n\xff")  # UnicodeDecodeError, no file named
def test_sft_jsonl(tokenizer, tmp_path, data):
    file = tmp_path / "sft.jsonl"
    file.write_bytes(data)
    try:
        records = load_records(file)
    except ValueError as err:
        one_line(err)
        assert str(file) in str(err)
        return
    assert records_digest(records)
    for record in records:
        dialogue = encode_dialogue(record, tokenizer)
        assert dialogue.trained.any()


@pytest.mark.parametrize(
    "path, value, message",
    [
        ([1, 2, 2], 5, r"sft\.jsonl:2\.messages\[2\]\.tool_calls=5 is not allowed: it must be a list"),
        ([1], {"role": "user"}, r"sft\.jsonl:2 is not allowed: a record must be an object with a 'messages' list"),
        ([1, 1, 0], [5], r"sft\.jsonl:2: messages\[1\]\.content=\[5\] is not allowed: it must be a string"),
        ([1, 2, 0], 7, r"sft\.jsonl:2: messages\[2\]\.content=7 is not allowed: it must be a string"),
        ([3, 0, 0, 0], 5, r"sft\.jsonl:2\.tools\[0\]\.description=5 is not allowed: it must be a string"),
        ([1, 4, 0], "\ud800", r"sft\.jsonl:2 is not allowed: it holds a lone surrogate"),
    ],
)
def test_sft_records_of_the_wrong_type_name_the_line_and_field(tmp_path, path, value, message):
    file = tmp_path / "sft.jsonl"
    file.write_text(json.dumps(RECORD) + "\n" + json.dumps(replaced(RECORD, path, value)) + "\n")
    with pytest.raises(ValueError, match=message) as caught:
        load_records(file)
    one_line(caught.value)
