"""Tests of the speedrun's time-to-target rule (benchmarks/speedrun.py) and of the main job's report card
(`cli.train.report_card`) on hand-made metrics rows.

Run: `python -m pytest -q tests/experiments/test_speedrun.py`.
"""

import importlib.util
from pathlib import Path

import pytest

from longcat_lab.cli.train import report_card

SPEEDRUN = Path(__file__).parents[2] / "benchmarks" / "speedrun.py"


def _rows():
    train = [
        {"kind": "train", "step": s, "time_s": 2.0 * s, "tokens_seen": 100 * s, "tokens_per_s": tps, "mfu": mfu}
        | {"ffn_experts_per_token": ffn, "target_ffn_experts": 2.0}
        for s, tps, mfu, ffn in [(1, 40.0, 0.1, 3.0), (2, 50.0, 0.2, 2.5), (3, 60.0, 0.3, 2.1), (4, 70.0, 0.4, 1.9)]
    ]
    unigram = {"a": 4.0, "b": 4.0}
    bpb = [
        {"kind": "eval_bpb", "step": 2, "bits_per_byte": {"a": 3.0, "b": 2.6}, "unigram_bits_per_byte": unigram},
        {"kind": "eval_bpb", "step": 4, "bits_per_byte": {"a": 2.4, "b": 2.0}, "unigram_bits_per_byte": unigram},
    ]
    return train[:2] + bpb[:1] + train[2:] + bpb[1:]


def _speedrun():
    spec = importlib.util.spec_from_file_location("speedrun", SPEEDRUN)
    speedrun = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speedrun)
    return speedrun


def test_time_to_target():
    speedrun = _speedrun()
    rows = _rows()
    assert speedrun.time_to_target(rows, 2.8) == 4.0  # step 2's mean (3.0 + 2.6) / 2 reaches it
    # Between step 2 (2.8 at 4 s) and step 4 (2.2 at 8 s) the curve is taken as linear: 2.5 is half-way, at 6 s.
    assert speedrun.time_to_target(rows, 2.5) == pytest.approx(6.0)
    assert speedrun.time_to_target(rows, 2.2) == pytest.approx(8.0)
    assert speedrun.time_to_target(rows, 1.0) is None
    assert speedrun.final_bpb(rows) == pytest.approx(2.2)


def test_a_recipe_may_not_change_the_task():
    speedrun = _speedrun()
    same = {"baseline": ("bias_controller=paper",), "candidate": ("lr_scale=2", "rg_every=50", "batch_size=8")}
    assert speedrun.task_changes("tiny", 4, same, 2) == []
    other = {"baseline": (), "candidate": ("eval_windows=4", "max_bytes_per_domain=20000")}
    assert speedrun.task_changes("tiny", 4, other, 2) == ["data", "eval_windows"]


def test_report_card():
    lines = report_card(_rows(), {"a": 1.5, "b": 1.2}, {"a": 3.0, "b": 2.9})
    text = "\n".join(lines)
    assert "1.5000 [3.0000]" in text and "2.4000 [4.0000]" in text  # the last evaluation, beside unigram
    assert "time 8 s in this run, 400 tokens" in text
    assert "55 tokens/s" in text and "MFU 0.250" in text  # medians of four steps
    assert "FFN experts per token 1.900 (last quarter) against the target 2.000" in text


def test_a_finished_run_is_read_back_not_trained(tmp_path):
    speedrun = _speedrun()
    out = tmp_path / "seed0"
    rows = speedrun.run_recipe("tiny", 2, (), 0, 2, out)
    metrics = (out / "metrics.jsonl").read_bytes()
    assert speedrun.run_recipe("tiny", 2, (), 0, 2, out) == rows
    assert (out / "metrics.jsonl").read_bytes() == metrics  # no new start row: nothing was built or trained
    # A run with other configs is not this recipe's run, even where they differ only in a field a resume may change.
    mc, tc = speedrun.configs("tiny", 2, ("rg_every=1", "eval_every=2", "ckpt_every=0"), speedrun.SEED0)
    assert speedrun.finished_rows(out, mc, tc) is None
    # A run that has not reached its last step is not finished.
    assert speedrun.finished_rows(tmp_path / "none", mc, tc) is None
