"""Tests of the fine-tuning data (longcat_lab.data.sft): the loss mask covers exactly the assistant's replies (tool
calls and end-of-turn included), pieces cover every target once, packing keeps pieces apart (segments, targets),
the held-out split, record checks, and the sampler's pre-training ratio and resumable position.

A BPE trained on a few sentences stands in for the real tokenizer (the masking logic is the same). Run:
`.venv/bin/python -m pytest tests/data/test_sft_data.py -q`.
"""

import json

import numpy as np
import pytest
import torch

from longcat_lab.chat.template import END_OF_TURN, SPECIAL_TOKENS, tool_call_block
from longcat_lab.data.mixture import MixtureSampler
from longcat_lab.data.sft import (
    PAD_SEGMENT,
    Dialogue,
    SFTSampler,
    encode_dialogue,
    load_records,
    pack,
    split_held_out,
    split_pieces,
)
from longcat_lab.data.tokenizer import train_tokenizer
from longcat_lab.model.config import IGNORE_INDEX
from longcat_lab.testing import SFT_MESSAGES, SFT_TOOLS

TOOLS, MESSAGES = SFT_TOOLS, SFT_MESSAGES
REPLIES = [
    "Let me look." + tool_call_block("get_balance", {"account": "A7"}) + END_OF_TURN,
    "Account A7 holds 120." + END_OF_TURN,
]


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(m["content"] for m in MESSAGES) + " balance account holds support agent look tool call"
    return train_tokenizer([text] * 20, 320)


def record(i: int = 0) -> dict:
    return {"messages": MESSAGES, "tools": TOOLS, "difficulty": {}, "task_id": f"bank-{i:06d}"}


def test_mask_is_exactly_the_assistant_replies(tokenizer):
    d = encode_dialogue(record(), tokenizer)
    assert tokenizer.decode(d.ids[d.trained].tolist(), skip_special_tokens=False) == "".join(REPLIES)
    untrained = tokenizer.decode(d.ids[~d.trained].tolist(), skip_special_tokens=False)
    for m in MESSAGES:
        if m["role"] != "assistant":
            assert m["content"] in untrained  # system, user and tool text are context only
    assert untrained.count("ASSISTANT:") == 2  # the prefix belongs to the prompt
    # The ids are those of the whole rendered string (as a prompt is encoded at inference).
    from longcat_lab.chat.template import render

    assert d.ids.tolist() == tokenizer.encode(render(MESSAGES, TOOLS, add_generation_prompt=False)).ids
    # Tool calls are trained through their markers, which are single tokens.
    marker_ids = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS[:3]}
    assert marker_ids <= set(d.ids[d.trained].tolist())


def test_pieces_cover_every_target_once_and_drop_untrained():
    ids = np.arange(100, 123)
    trained = np.zeros(23, dtype=bool)
    trained[[3, 4, 5, 20, 21]] = True  # tokens 6..19 have no trained target
    pieces = split_pieces(Dialogue(ids, trained), seq_len=5)
    starts = [int(p[0][0]) - 100 for p in pieces]
    assert starts == [0, 15, 20]  # [5, 10] and [10, 15] are dropped: no trained target
    assert all(len(p[0]) <= 6 for p in pieces)
    seen = [int(t) for p_ids, p_tr in pieces for t, keep in zip(p_ids[1:], p_tr[1:]) if keep]
    assert seen == [103, 104, 105, 120, 121]


def random_pieces(n: int, seq_len: int, seed: int = 0):
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(g.integers(1, seq_len + 1))
        out.append((np.full(k + 1, 1000 * (i + 1)) + np.arange(k + 1), g.random(k + 1) < 0.5))
    return out


def test_pack_keeps_pieces_apart():
    seq_len = 16
    pieces = random_pieces(40, seq_len)
    rows = pack(pieces, seq_len, pad_id=7)
    found = []
    for r in range(len(rows)):
        x, y, seg = rows.x[r].numpy(), rows.y[r].numpy(), rows.segment_ids[r].numpy()
        assert np.all(np.diff(seg[seg != PAD_SEGMENT]) >= 0)  # segments are contiguous, in order
        assert np.all(x[seg == PAD_SEGMENT] == 7) and np.all(y[seg == PAD_SEGMENT] == IGNORE_INDEX)
        for s in np.unique(seg[seg != PAD_SEGMENT]):
            xs, ys = x[seg == s], y[seg == s]
            # Inputs of one piece only (its ids run consecutively); each target is the next id of the same piece.
            assert np.all(np.diff(xs) == 1) and len({v // 1000 for v in xs}) == 1
            assert np.all((ys == IGNORE_INDEX) | (ys == xs + 1))
            found.append((int(xs[0]), len(xs), [int(v) for v in ys]))
    want = [
        (int(ids[0]), len(ids) - 1, [int(t) if keep else IGNORE_INDEX for t, keep in zip(ids[1:], tr[1:])])
        for ids, tr in pieces
    ]
    assert sorted(found) == sorted(want)  # every piece exactly once, with its mask
    assert rows.targets == sum(int(tr[1:].sum()) for _, tr in pieces)
    assert len(rows) < len(pieces)  # short pieces share rows


def test_pack_refuses_a_piece_longer_than_a_row():
    with pytest.raises(ValueError, match="pieces\\[0\\] has 10 tokens"):
        pack([(np.arange(10), np.ones(10, dtype=bool))], seq_len=8)


def test_held_out_split_is_stable_and_sized():
    records = [record(i) for i in range(10)]
    train, held = split_held_out(records, 3)
    train2, held2 = split_held_out(records[::-1], 3)
    assert len(held) == 3 and len(train) == 7
    assert {r["task_id"] for r in held} == {r["task_id"] for r in held2}
    assert not {r["task_id"] for r in held} & {r["task_id"] for r in train}
    with pytest.raises(ValueError, match="sft_val_dialogues=10 is not allowed"):
        split_held_out(records, 10)


def test_load_records_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record()) + "\n{not json\n")
    with pytest.raises(ValueError, match="d.jsonl:2 is not allowed: not JSON"):
        load_records(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="no assistant message"):
        load_records(path)
    with pytest.raises(ValueError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    assert load_records([record()]) == [record()]


def sampler(tokenizer, ratio: float, seed: int = 3) -> SFTSampler:
    dialogues = [encode_dialogue(record(i), tokenizer) for i in range(5)]
    stream = torch.arange(5000, dtype=torch.int32) % 300
    pretrain = MixtureSampler({"shakespeare": stream, "python": stream, "reasoning": stream}, seed=seed)
    return SFTSampler(dialogues, pretrain, ratio, seed, pad_id=0)


MIX = {"shakespeare": 1.0}


def test_sampler_ratio_is_exact_and_pretrain_rows_are_whole(tokenizer):
    s = sampler(tokenizer, 0.3)
    before = 0
    for k in range(1, 8):
        x, y, seg = s.batch(MIX, 4, 32)
        assert s.counts["pretrain_rows"] == int(0.3 * 4 * k + 1e-9)  # floor(ratio * rows so far)
        n_pre, before = s.counts["pretrain_rows"] - before, s.counts["pretrain_rows"]
        if n_pre:  # pre-training windows come last: one segment, every position a target
            assert (seg[-n_pre:] == 0).all() and (y[-n_pre:] != IGNORE_INDEX).all()
        assert (y[: 4 - n_pre] == IGNORE_INDEX).any()  # dialogue rows train only the assistant's tokens
    assert s.epoch > 0  # dialogue rows were reused: a new epoch began


def test_sampler_resumes_at_the_same_position(tokenizer):
    a = sampler(tokenizer, 0.25)
    for _ in range(5):
        a.batch(MIX, 4, 32)
    state = a.state_dict()
    b = sampler(tokenizer, 0.25)
    b.load_state_dict(state)
    for _ in range(6):
        for t1, t2 in zip(a.batch(MIX, 4, 32), b.batch(MIX, 4, 32)):
            assert torch.equal(t1, t2)
    assert a.counts == b.counts


def test_sampler_reshuffles_every_epoch(tokenizer):
    s = sampler(tokenizer, 0.0)
    assert not torch.equal(s.epoch_rows(0, 32).x, s.epoch_rows(1, 32).x)
    assert torch.equal(s.epoch_rows(0, 32).x, sampler(tokenizer, 0.0).epoch_rows(0, 32).x)
    with pytest.raises(ValueError, match="sft_pretrain_ratio=1 is not allowed"):
        sampler(tokenizer, 1)
