"""Hostile inputs that must end in one line with nothing lost or left behind (docs/design.md §9): bytes that are
not UTF-8 on `chat`'s stdin, writers aimed at device nodes or folders, an over-long SFT JSONL line, and the
clean-up of a refused fine-tuning run.

Run: `python -m pytest -q -p no:cacheprovider tests/reliability/test_hostile_inputs.py`.
"""

from __future__ import annotations

import io
import json
import os

import pytest

from longcat_lab._util import atomic_write_bytes, check_text
from longcat_lab.agent.chat import converse
from longcat_lab.data.sft import LINE_LIMIT, load_records
from longcat_lab.tools import Registry
from longcat_lab.train.lock import LOCK_NAME
from longcat_lab.train.sft import cleanup_on_refusal


def test_a_non_utf8_line_on_chat_stdin_costs_one_line_and_the_conversation_goes_on():
    stdin = io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe oops\nagain\n"), encoding="utf-8")
    out = io.StringIO()
    prompts = []

    def reply(prompt: str) -> str:
        prompts.append(prompt)
        out.write("ok")
        return "ok"

    converse(reply, Registry(), None, stdin, out)
    text = out.getvalue()
    assert text.count("byte 0xff at character 0 is not UTF-8") == 1
    assert len(prompts) == 2  # both good lines answered, in one conversation
    assert "hello" in prompts[1] and "again" in prompts[1]


def test_check_text_names_the_byte():
    check_text("x", "plain ünïcode")
    with pytest.raises(ValueError, match="x is not allowed: byte 0x80 at character 1"):
        check_text("x", b"a\x80".decode("utf-8", "surrogateescape"))


def test_the_atomic_writer_writes_only_regular_files(tmp_path):
    # Device nodes through a link, so that a writer without the check replaces the link, never /dev/null itself.
    link = tmp_path / "link"
    link.symlink_to("/dev/null")
    with pytest.raises(ValueError, match=f"path='{link}' is not allowed: it is a device node"):
        atomic_write_bytes(link, b"x")
    assert link.is_symlink()
    with pytest.raises(ValueError, match="it is a folder"):
        atomic_write_bytes(tmp_path, b"x")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe")
        with pytest.raises(ValueError, match="it is a pipe"):
            atomic_write_bytes(tmp_path / "pipe", b"x")
    atomic_write_bytes(tmp_path / "f.txt", b"one")
    atomic_write_bytes(tmp_path / "f.txt", b"two")
    assert (tmp_path / "f.txt").read_bytes() == b"two"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_overlong_sft_line_is_refused_naming_the_line(tmp_path):
    record = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = tmp_path / "d.jsonl"
    big = dict(record, messages=[record["messages"][0], {"role": "assistant", "content": "z" * LINE_LIMIT}])
    path.write_text(json.dumps(record) + "\n" + json.dumps(big) + "\n")
    with pytest.raises(ValueError, match=f"d.jsonl:2 is not allowed: the line has .* at most {LINE_LIMIT:,}"):
        load_records(path)


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"tool_calls": 5}, "messages\\[1\\].tool_calls=5 is not allowed: it must be a list"),
        ({"content": 7}, "d.jsonl:2"),
    ],
)
def test_sft_record_errors_name_the_line(tmp_path, bad, words):
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    wrong = {"messages": [good["messages"][0], {**good["messages"][1], **bad}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(wrong) + "\n")
    with pytest.raises(ValueError, match=words) as info:
        load_records(path)
    assert "d.jsonl:2" in str(info.value) and "\n" not in str(info.value)


def test_cleanup_on_refusal(tmp_path):
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError), cleanup_on_refusal(fresh):
        fresh.mkdir()
        (fresh / "sft_data.jsonl").write_text("{}\n")
        raise ValueError("refused")
    assert not fresh.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("x")
    with pytest.raises(ValueError), cleanup_on_refusal(kept):
        (kept / "sft_data.jsonl").write_text("{}\n")
        (kept / LOCK_NAME).write_text("")
        raise ValueError("refused")
    assert sorted(p.name for p in kept.iterdir()) == sorted(["mine.txt", LOCK_NAME])
    with cleanup_on_refusal(kept):  # no error: nothing is touched
        (kept / "new.txt").write_text("y")
    assert (kept / "new.txt").exists()
