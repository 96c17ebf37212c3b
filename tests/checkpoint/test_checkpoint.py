"""Tests of checkpoint folders (longcat_lab.checkpoint): round trip, newest-of-a-run, keep-last-N, atomic writes,
and one-line errors that name the bad file for truncated, corrupted or missing files. No training: a tiny model
and a small tokenizer are saved directly, so the file runs in a second or two.

Run: `bash tools/test.sh tests/checkpoint/test_checkpoint.py`.
"""

import json

import pytest
import torch

from longcat_lab import checkpoint
from longcat_lab.checkpoint import CheckpointError
from longcat_lab.data import train_tokenizer
from longcat_lab.model import presets
from longcat_lab.testing import random_model


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def f(x):\n    return x + 1\n", "Shall I compare thee to a summer's day?"] * 20, 300)


def tiny_model(seed=0):
    return random_model(presets.tiny(), seed, train=True)


def save(run, step, model, tokenizer, keep=3):
    state = {"step": step, "note": torch.arange(3)}
    return checkpoint.save(run, step, model, tokenizer, {"seed": 1}, state, {"val_loss": {"python": 1.5}}, keep=keep)


def test_round_trip(tmp_path, tokenizer):
    model = tiny_model()
    model.moe_blocks()[0].router.e_score_correction_bias.fill_(0.25)  # the persistent bias travels too
    path = save(tmp_path, 7, model, tokenizer)
    assert path.name == "step_000007" and sorted(p.name for p in path.iterdir()) == sorted(
        checkpoint.FILES + (checkpoint.META,)
    )
    loaded, tok, meta = checkpoint.load(path)
    assert not loaded.training and meta["step"] == 7 and meta["val_loss"] == {"python": 1.5}
    assert meta["versions"]["torch"] == torch.__version__
    idx = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    assert torch.equal(loaded(idx).logits, model(idx).logits)
    assert torch.equal(loaded.moe_blocks()[0].router.e_score_correction_bias, torch.full((6,), 0.25))
    assert tok.to_str() == tokenizer.to_str()
    assert torch.equal(checkpoint.read_trainer_state(path)["note"], torch.arange(3))


def test_run_folder_gives_newest_and_keeps_last_n(tmp_path, tokenizer):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, tiny_model(step), tokenizer, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    _, _, meta = checkpoint.load(tmp_path)
    assert meta["step"] == 4
    assert not list((tmp_path / "checkpoints").glob(".*")), "no temporary folders left behind"


def test_same_step_is_replaced_whole(tmp_path, tokenizer):
    save(tmp_path, 5, tiny_model(0), tokenizer)
    save(tmp_path, 5, tiny_model(1), tokenizer)
    loaded, _, _ = checkpoint.load(tmp_path)
    assert torch.equal(loaded.lm_head.weight, tiny_model(1).lm_head.weight)


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])), "corrupted"),
        (lambda p: p.unlink(), "missing"),
    ],
)
@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt", "tokenizer.json"])
def test_damaged_file_is_named(tmp_path, tokenizer, name, damage, words):
    path = save(tmp_path, 3, tiny_model(), tokenizer)
    damage(path / name)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(tmp_path)
    message = str(err.value)
    assert "\n" not in message and name in message and words in message


def test_damaged_meta_is_named(tmp_path, tokenizer):
    path = save(tmp_path, 3, tiny_model(), tokenizer)
    (path / "meta.json").write_text('{"step": 3, "fil')
    with pytest.raises(CheckpointError, match="meta.json"):
        checkpoint.verify(path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="meta.json: missing"):
        checkpoint.load(path)


def test_non_finite_model_never_replaces_the_last_good_one(tmp_path, tokenizer):
    good = save(tmp_path, 2, tiny_model(), tokenizer)
    before = (good / "meta.json").read_text()
    bad = tiny_model()
    with torch.no_grad():
        bad.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        save(tmp_path, 3, bad, tokenizer)
    with pytest.raises(CheckpointError):
        save(tmp_path, 2, bad, tokenizer)  # not even over the same step
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000002"]
    assert (good / "meta.json").read_text() == before
    checkpoint.verify(good)


def test_crash_during_save_leaves_previous_checkpoints(tmp_path, tokenizer, monkeypatch):
    save(tmp_path, 1, tiny_model(), tokenizer)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, tiny_model(), tokenizer)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert json.loads((tmp_path / "checkpoints/step_000001/meta.json").read_text())["step"] == 1


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a run folder"):
        checkpoint.load(tmp_path)
