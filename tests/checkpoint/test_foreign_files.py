"""Checkpoint files we did not write: a meta.json, config.json or trainer_state.pt whose checksums agree but whose
values have the wrong type (a string for the step, a number for `files`, a list where an object belongs) is a
one-line CheckpointError naming the file and the field, never an AttributeError, TypeError or KeyError. No
training: a tiny model is saved directly.

Run: `.venv/bin/python -m pytest tests/checkpoint/test_foreign_files.py -q`.
"""

import io
import json

import pytest
import torch

from longcat_lab import checkpoint
from longcat_lab.checkpoint import CheckpointError, RNGState
from longcat_lab.data import train_tokenizer
from longcat_lab.model import presets
from longcat_lab.testing import random_model, rewrite_checkpoint_file


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n", "Shall I compare thee to a summer's day?"] * 20, 300)


@pytest.fixture
def ckpt(tmp_path, tokenizer):
    states = {"rng": RNGState(torch.device("cpu")), "note": {"n": 1}}
    return checkpoint.save(tmp_path, 3, random_model(presets.tiny(), 0), tokenizer, {"seed": 1}, states)


def rewrite_meta(ckpt, change):
    meta = json.loads((ckpt / "meta.json").read_text())
    change(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def one_line_error(call, *words):
    with pytest.raises(CheckpointError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: m.__setitem__("step", "x"), "'step'"),
        (lambda m: m.__setitem__("step", True), "'step'"),
        (lambda m: m.__setitem__("files", 5), "'files'"),
        (lambda m: m.__setitem__("files", ["config.json"]), "'files'"),
        (lambda m: m.__setitem__("layout", 5), "'layout'"),
        (lambda m: m["files"].__setitem__("config.json", [572, "abc"]), "config.json"),
    ],
)
def test_meta_with_wrong_types(ckpt, change, field):
    rewrite_meta(ckpt, change)
    one_line_error(lambda: checkpoint.verify(ckpt), "meta.json", field)
    one_line_error(lambda: checkpoint.load(ckpt), "meta.json", field)


def test_meta_that_is_not_an_object(ckpt):
    (ckpt / "meta.json").write_text("[1, 2, 3]")
    one_line_error(lambda: checkpoint.verify(ckpt), "meta.json")


@pytest.mark.parametrize("config", [[1, 2], {"hidden_size": "wide"}, {"num_layers": [2]}, {"bogus": 1}])
def test_model_config_with_wrong_types(ckpt, config):
    rewrite_checkpoint_file(ckpt, "config.json", json.dumps(config).encode())
    one_line_error(lambda: checkpoint.load(ckpt), "config.json")


def test_trainer_state_that_is_not_a_dict(ckpt):
    rewrite_checkpoint_file(ckpt, "trainer_state.pt", saved_bytes([1, 2]))
    one_line_error(lambda: checkpoint.read_trainer_state(ckpt), "trainer_state.pt", "not a dict")


@pytest.mark.parametrize(
    "entry, words",
    [
        (None, ("has no 'rng' entry",)),
        ([1, 2], ("'rng'",)),
        ({"torch": "x"}, ("'rng'", "uint8 tensor")),
    ],
)
def test_states_with_wrong_types(ckpt, entry, words):
    saved = checkpoint.read_trainer_state(ckpt)
    if entry is None:
        del saved["rng"]
    else:
        saved["rng"] = entry
    rewrite_checkpoint_file(ckpt, "trainer_state.pt", saved_bytes(saved))
    states = {"rng": RNGState(torch.device("cpu"))}
    one_line_error(lambda: checkpoint.load_states(ckpt, states), "trainer_state.pt", *words)
