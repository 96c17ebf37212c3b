"""Fixtures shared by the training tests: the tokenizer cache folder and one finished tiny run that the recovery and
foreign-state tests copy and damage."""

import pytest

from longcat_lab.model import presets
from longcat_lab.testing import tiny_train_config
from longcat_lab.train import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "longcat_lab_cache")


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4, and its train losses."""
    out = tmp_path_factory.mktemp("finished")
    cfg = tiny_train_config(cache, 4, eval_every=0, eval_windows=2, ckpt_every=2, rg_every=0)
    res = train(presets.tiny(), cfg, out, progress=False)
    return out, [r["loss"] for r in res.rows("train")]
