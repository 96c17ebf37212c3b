"""Tests of streamed decoding as text (`longcat_lab.inference.text`): stop ids and an `ends` rule end the stream, a
UTF-8 character split over byte tokens is held back until complete, the token stream is closed, and `token_stream`
gives what `generate` gives. Run: .venv/bin/python -m pytest tests/inference/test_text.py"""

import torch

from longcat_lab.inference import generate
from longcat_lab.inference.text import TextStream, token_stream
from longcat_lab.testing import random_model

STOP = 256


class ByteTokenizer:
    """One token per byte; id 256 is a stop marker."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tokens(data: bytes, tail=()):
    return (torch.tensor([[t]]) for t in [*data, *tail])


def test_a_split_character_waits_for_its_last_byte_and_a_stop_id_ends_the_stream():
    stream = TextStream(ByteTokenizer(), tokens("aé€".encode(), [STOP, ord("x")]), stop_ids={STOP})
    assert list(stream) == ["a", None, "aé", None, None, "aé€"]
    assert stream.stopped and stream.text == "aé€" and len(stream.ids) == 6


def test_follow_hands_on_complete_pieces_and_the_unfinished_end():
    pieces = []
    data = "hé".encode() + "€".encode()[:2]  # the stream ends inside a character
    text = TextStream(ByteTokenizer(), tokens(data)).follow(pieces.append)
    assert pieces == ["h", "é", "\ufffd"] and text == "hé\ufffd"


def test_an_ends_rule_stops_before_the_token_and_the_source_is_closed():
    source = tokens(b"abcabc")
    stream = TextStream(ByteTokenizer(), source, ends=lambda kept, t: len(kept) == 4)
    assert stream.follow() == "abca"
    assert stream.stopped and source.gi_frame is None  # closed


def test_token_stream_is_generate():
    model = random_model(seed=3)
    idx = torch.tensor([[1, 2, 3]])
    streamed = torch.cat(list(token_stream(model, idx, 5)), dim=1)
    assert torch.equal(streamed, generate(model, idx, 5)[:, 3:])
