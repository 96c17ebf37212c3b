"""Tests of `longcat_lab.experiments`: the verdict rule, the matched-compute refusal, every named sweep's plan, and
the resume of a half-finished sweep (tiny preset, a few steps)."""

import dataclasses
import json

import pytest

from longcat_lab.experiments import runner, stats
from longcat_lab.experiments.summary import format_summary, settle_step
from longcat_lab.experiments.sweeps import SWEEPS, Sweep
from longcat_lab.model.config import ModelConfig
from longcat_lab.train import train
from longcat_lab.train.config import TrainConfig


def test_paired_difference_and_verdict_rule():
    p = stats.paired([1.0, 2.0, 3.5], [1.5, 2.4, 4.0])
    assert p["diffs"] == pytest.approx([-0.5, -0.4, -0.5])
    assert p["mean"] == pytest.approx(-1.4 / 3)
    # sd of (-0.5, -0.4, -0.5) with n - 1: sqrt(((1/30)^2 * 2 + (2/30)^2) / 2) = sqrt(1/300); se = sd / sqrt(3)
    assert p["se"] == pytest.approx((1 / 300) ** 0.5 / 3**0.5)
    # |mean| = 0.467 > t(0.975, 2) = 4.303 * 0.0333 = 0.143: better (lower is better), worse when higher is.
    assert stats.verdict(p["mean"], p["se"], 3, "lower") == "better"
    assert stats.verdict(p["mean"], p["se"], 3, "higher") == "worse"
    # The same mean with a larger spread (4.303 * 0.2 = 0.86 > 0.467): within noise.
    assert stats.verdict(p["mean"], 0.2, 3) == "within noise"
    assert stats.verdict(-5.0, float("nan"), 1) == "one seed"
    assert stats.t_critical(11) == stats.t_critical(10) and stats.t_critical(100) == 1.96
    with pytest.raises(ValueError, match="direction='up' is not allowed"):
        stats.verdict(1.0, 0.1, 3, "up")
    with pytest.raises(ValueError, match="same non-zero count"):
        stats.paired([1.0], [1.0, 2.0])


def test_settle_step():
    series = [4.0, 3.0, 2.5] + [2.0] * 30
    assert settle_step(series, 2.0, window=1) == 4
    assert settle_step([3.0] * 20, 2.0) == 20  # never settles: the run's length


def test_named_sweeps_are_matched_at_the_mini_preset(tmp_path):
    assert set(SWEEPS) == {"layer", "zero_experts", "controller", "z_loss", "adam_eps", "growth", "mla_scale"}
    for sweep in SWEEPS.values():
        runs = runner.plan(sweep, tmp_path / sweep.name, seeds=2)
        assert len(runs) == 2 * len(sweep.variants)
        seeds = {
            r.variant: [TrainConfig.from_dict(r.train_config).seed for r in runs if r.variant == v]
            for v in sweep.variants
            for r in runs
            if r.variant == v
        }
        assert len({tuple(s) for s in seeds.values()}) == 1  # paired: the same seeds for every variant
        runner.check_matched(sweep, runner.compute_table(sweep, runs))  # raises if not matched
    growth = runner.compute_table(SWEEPS["growth"], runner.plan("growth", tmp_path / "g", 1))
    assert growth["growth"]["flops_per_token"] < growth["scratch"]["flops_per_token"] and growth["growth"]["varies"]


def test_a_sweep_with_unmatched_compute_is_refused(tmp_path):
    sweep = Sweep("wider", {"narrow": ("hidden_size=64",), "wide": ("hidden_size=128",)}, ("val_loss",), "", "")
    with pytest.raises(runner.ComputeMismatchError, match="variant 'wide' has activated_params="):
        runner.run_sweep(sweep, tmp_path, seeds=1, steps=2, preset="tiny", progress=False)
    assert not (tmp_path / "wider" / "runs").exists()  # refused before any run started
    longer = Sweep("longer", {"a": ("batch_size=8",), "b": ("batch_size=16",)}, ("val_loss",), "", "")
    with pytest.raises(runner.ComputeMismatchError, match="tokens_seen"):
        runner.run_sweep(longer, tmp_path, seeds=1, steps=2, preset="tiny", progress=False)
    allowed = dataclasses.replace(sweep, compute_varies=("wide",))
    runner.check_matched(allowed, runner.compute_table(allowed, runner.plan(allowed, tmp_path, 1, 2, "tiny")))


@pytest.mark.slow
def test_a_half_finished_sweep_resumes_and_a_finished_one_is_skipped(tmp_path, one_thread):
    sweep = Sweep("scale", {"on": ("mla_scale=true",), "off": ("mla_scale=false",)}, ("val_loss", "grad_rms"), "", "")
    steps = 4
    runs = runner.plan(sweep, tmp_path / "scale", seeds=2, steps=steps, preset="tiny")
    first = runs[0]
    # Interrupt the first run half-way, as a killed sweep would leave it: checkpoint at step 2, no result.json.
    half = dataclasses.replace(TrainConfig.from_dict(first.train_config), stop_after=2)
    train(ModelConfig.from_dict(first.model_config), half, first.dir, progress=False)
    assert not first.finished
    summary = runner.run_sweep(sweep, tmp_path, seeds=2, steps=steps, preset="tiny", progress=False)
    assert summary["skipped_finished_runs"] == 0 and all(r.finished for r in runs)
    starts = [json.loads(line) for line in (first.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed_from"] for r in starts if r["kind"] == "start"] == [None, 2]
    assert [r["step"] for r in starts if r["kind"] == "train"] == [1, 2, 3, 4]
    row = next(r for r in summary["rows"] if r["metric"] == "val_loss")
    assert row["variant"] == "off" and row["n"] == 2 and row["verdict"] in stats.VERDICTS
    assert row["mean"] == pytest.approx(row["variant_mean"] - row["baseline_mean"])
    saved = json.loads((tmp_path / "scale" / "summary.json").read_text())
    assert saved["commit"] and saved["machine"] and saved["runs"]["on"]["1"]["steps"] == steps
    assert "paired difference variant - on" in format_summary(summary)
    again = runner.run_sweep(sweep, tmp_path, seeds=2, steps=steps, preset="tiny", progress=False)
    assert again["skipped_finished_runs"] == 4 and again["rows"] == summary["rows"]
