"""A resume from checkpoint files we did not write: a trainer_state.pt or train_config.json whose checksums agree
but whose values have the wrong type is a one-line CheckpointError naming the file and the field, never an
AttributeError, TypeError or KeyError; and a trainer_state.pt in the layout written before the run's `Progress` was
an entry of its own (its step and counters at the top level) still resumes bit for bit. Tiny 4-step runs.

Run: `.venv/bin/python -m pytest tests/train/test_foreign_state.py -q`.
"""

import io
import json
import shutil

import pytest
import torch

from longcat_lab import checkpoint
from longcat_lab.checkpoint import CheckpointError
from longcat_lab.model import presets
from longcat_lab.testing import rewrite_checkpoint_file, tiny_train_config
from longcat_lab.train import train
from longcat_lab.train.lock import LOCK_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


def config(cache):
    return tiny_train_config(cache, 4, eval_every=0, eval_windows=2, ckpt_every=2, rg_every=0)


def run(cfg, out, **kwargs):
    return train(presets.tiny(), cfg, out, progress=False, **kwargs)


@pytest.fixture
def at_step_2(finished, tmp_path):
    """A copy of the finished run whose newest checkpoint is step 2's; returns (run folder, that checkpoint)."""
    shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
    (tmp_path / LOCK_NAME).unlink(missing_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "step_000004")
    return tmp_path, tmp_path / "checkpoints" / "step_000002"


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def change_state(ckpt, change):
    saved = checkpoint.read_trainer_state(ckpt)
    change(saved)
    rewrite_checkpoint_file(ckpt, "trainer_state.pt", saved_bytes(saved))


def test_the_layout_before_progress_was_an_entry_still_resumes(at_step_2, finished, cache):
    out, ckpt = at_step_2
    change_state(ckpt, lambda s: s.update(s.pop("trainer")))  # step, scheduler, counters ... at the top level
    assert "step" in checkpoint.read_trainer_state(ckpt)
    res = run(config(cache), out, resume=True)
    assert res.resumed_from == 2 and [r["loss"] for r in res.rows("train")] == finished[1]


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s["trainer"].__setitem__("step", "x"), "trainer.step='x'"),
        (lambda s: s["trainer"].__setitem__("counters", [1, 2]), "trainer.counters="),
        (lambda s: s["trainer"]["counters"].__setitem__("tokens_seen", 1.5), "trainer.counters.tokens_seen=1.5"),
        (lambda s: s["trainer"].__setitem__("val_loss", ["python", 1.0]), "trainer.val_loss="),
        (lambda s: s.__setitem__("trainer", 5), "trainer=int"),
        (lambda s: s.__setitem__("expert_counts", 5), "expert_counts"),
        (lambda s: s["alerts"].__setitem__("seen", "x"), "alerts.seen='x'"),
        (lambda s: s.__setitem__("controller", [1]), "'controller'"),
        (lambda s: s.__setitem__("optimizer", {"state": 5}), "'optimizer'"),
        (lambda s: s.pop("sampler"), "has no 'sampler' entry"),
    ],
)
def test_trainer_state_with_wrong_types_is_one_line(at_step_2, cache, change, words):
    out, ckpt = at_step_2
    change_state(ckpt, change)
    with pytest.raises(CheckpointError) as err:
        run(config(cache), out, resume=True)
    message = str(err.value)
    assert "\n" not in message and "trainer_state.pt" in message and words in message, message


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c.__setitem__("batch_size", "x"), "batch_size='x'"),
        (lambda c: c.__setitem__("stages", [5]), "stages[0]=5"),
        (lambda c: c.__setitem__("stages", 5), "stages=5"),
        (lambda c: c.__setitem__("data", [1]), "data=[1]"),
        (lambda c: c["stages"][0].__setitem__("bogus", 1), "bogus"),
    ],
)
def test_train_config_with_wrong_types_is_one_line(at_step_2, cache, change, words):
    out, ckpt = at_step_2
    saved = json.loads((ckpt / "train_config.json").read_text())
    change(saved)
    rewrite_checkpoint_file(ckpt, "train_config.json", json.dumps(saved).encode())
    with pytest.raises(CheckpointError) as err:
        run(config(cache), out, resume=True)
    message = str(err.value)
    assert "\n" not in message and "train_config.json" in message and words in message, message
