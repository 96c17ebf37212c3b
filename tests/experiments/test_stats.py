"""Tests of the sweep statistics and the outlier diagnosis (`experiments.stats`, `experiments.diagnose`) on inputs
whose intervals, verdicts and outliers are worked out by hand in the comments, and of the per-step routing
signals the diagnosis reads (`train.metrics.step_routing_stats`).

Run: `python -m pytest -q tests/experiments/test_stats.py`.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from longcat_lab.experiments import diagnose, stats
from longcat_lab.experiments.summary import restate
from longcat_lab.experiments.sweeps import METRIC_DIRECTION, margin
from longcat_lab.testing import random_model
from longcat_lab.train.metrics import step_routing_stats
from longcat_lab.viz.eval import basin_figure, eps_ladder_figure, sweep_curves_figure, sweep_panel


def test_paired_statistics_and_t_interval():
    p = stats.paired([1.0, 2.0, 3.5], [1.5, 2.4, 4.0])
    assert p["diffs"] == pytest.approx([-0.5, -0.4, -0.5]) and p["median"] == pytest.approx(-0.5)
    # sd of (-0.5, -0.4, -0.5) with n - 1 is sqrt(1/300); se = sd / sqrt(3) = 1/30.
    assert p["se"] == pytest.approx(1 / 30)
    lo, hi = stats.t_interval(p["mean"], p["se"], 3)
    assert (lo, hi) == pytest.approx((-1.4 / 3 - 4.303 / 30, -1.4 / 3 + 4.303 / 30))
    lo90, hi90 = stats.t_interval(p["mean"], p["se"], 3, 0.90)
    assert hi90 - lo90 == pytest.approx(2 * 2.920 / 30)
    assert stats.t_critical(11) == 2.201 and stats.t_critical(27) == 2.060 and stats.t_critical(100) == 1.96
    with pytest.raises(ValueError, match="same non-zero count"):
        stats.paired([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite numbers"):
        stats.paired([float("nan"), 1.0], [1.0, 2.0])


def test_bootstrap_interval_is_seeded_and_matches_the_resampling_distribution():
    diffs = [-0.5, -0.4, -0.5]
    # Resampled means: -0.5 with p = (2/3)^3 = 0.30 > 2.5%, so the lower bound is -0.5; -0.4 (all three -0.4)
    # with p = 1/27 = 3.7% > 2.5%, so the upper bound is -0.4.
    assert stats.bootstrap_interval(diffs, seed=0) == pytest.approx((-0.5, -0.4))
    assert stats.bootstrap_interval(diffs, seed=3) == stats.bootstrap_interval(diffs, seed=3)
    assert stats.bootstrap_interval([0.2] * 5) == (0.2, 0.2)
    wide = [0.0, 0.01, -0.01, 0.02, 1.0]  # one seed dominates: the interval reaches past +0.19
    lo, hi = stats.bootstrap_interval(wide, seed=1)
    assert lo < 0.01 and hi > 0.19
    assert all(math.isnan(v) for v in stats.bootstrap_interval([1.0]))


def test_minimum_detectable_effect_and_equivalence():
    assert stats.min_detectable_effect(0.1, 3) == pytest.approx((4.303 + 1.061) * 0.1)
    assert stats.min_detectable_effect(0.1, 24) == pytest.approx((2.069 + 0.858) * 0.1)
    # mean 0.001, se 0.002, n 10: 90% interval 0.001 ± 1.833 * 0.002 = [-0.00267, 0.00467].
    assert stats.equivalent(0.001, 0.002, 10, margin=0.01)
    assert not stats.equivalent(0.001, 0.002, 10, margin=0.004)
    assert stats.verdict(0.001, 0.002, 10, margin=0.01) == "equivalent"
    assert stats.verdict(0.001, 0.002, 10, margin=0.004) == "unresolved"
    assert stats.verdict(0.001, 0.002, 10) == "unresolved"  # no margin stated: never "equivalent"
    # 95% interval -0.4667 ± 4.303 / 30 excludes 0: better when lower is better, worse when higher is.
    assert stats.verdict(-1.4 / 3, 1 / 30, 3, "lower") == "better"
    assert stats.verdict(-1.4 / 3, 1 / 30, 3, "higher") == "worse"
    assert stats.verdict(-5.0, float("nan"), 1) == "one seed"
    with pytest.raises(ValueError, match="direction='up' is not allowed"):
        stats.verdict(1.0, 0.1, 3, "up")
    with pytest.raises(ValueError, match="margin=0 is not allowed"):
        stats.equivalent(0.0, 0.1, 3, 0)


def test_robust_outlier_rule():
    # The issue's z_loss end losses at seeds 0, 1, 2: median 3.092, MAD 0.068, seed 1's modified z is
    # 0.6745 * 0.525 / 0.068 = 5.2 > 3.5.
    assert stats.outliers([3.092, 3.617, 3.024]) == [1]
    eight = [3.09, 3.02, 3.617, 3.05, 3.04, 3.08, 3.06, 3.03]  # MAD 0.025: 3.617 scores 15, the next 0.94
    assert stats.outliers(eight) == [2]
    assert stats.outliers([1.0, 1.0, 1.0, 1.0, 5.0]) == [4]  # MAD 0: mean absolute deviation stands in
    assert stats.outliers([2.0] * 6) == [] and stats.outliers([1.0, 9.0]) == []
    assert stats.outliers([3.0, 3.1, 2.9, 3.05, 2.95]) == []


def test_compare_flags_an_injected_outlier_seed_and_keeps_its_verdict_honest():
    base = [3.0, 3.1, 2.9, 3.05, 2.95, 3.02, 3.08, 2.98]
    shift = [0.010, 0.012, 0.008, 0.011, 0.009, 0.010, 0.012, 0.008]
    variant = [b + s for b, s in zip(base, shift)]
    clean = stats.compare(variant, base, margin=0.02)
    assert clean["verdict"] == "worse" and clean["outliers"] == [] and clean["n"] == 8
    variant[5] += 0.6  # one seed lands in a slow basin
    hit = stats.compare(variant, base, margin=0.02)
    assert hit["outliers"] == [5]
    assert hit["median"] == pytest.approx(0.0105) and hit["mean"] > 0.08
    assert hit["verdict"] == "unresolved" and hit["mde"] > 0.2  # one seed makes the mean's interval wide
    assert hit["bootstrap_interval"] == stats.compare(variant, base, margin=0.02)["bootstrap_interval"]


def test_fork_step_and_outlier_diagnosis():
    twin = [5.0 - 0.01 * i for i in range(60)]
    slow = twin[:9] + [v + 0.3 for v in twin[9:]]  # parts at step 10 and stays 0.3 nats above
    # Smoothed over 5 steps the gap at step 10 is 0.3 / 5 = 0.06 > 0.05, and larger from there on.
    assert diagnose.fork_step(slow, twin) == 10
    assert diagnose.fork_step(twin, twin) is None

    def run(curve, loss, entropy):
        n = len(curve)
        curves = {"loss": curve, "grad_norm": [1.0] * n, "router_entropy": [entropy] * n}
        curves |= {"step_max_hidden": [4.0] * n, "bias_spread": [0.1] * n, "ffn_experts_per_token": [1.5] * n}
        return {"val_loss": loss, "target_ffn_experts": 2.0, "curves": curves}

    results = {
        "off": {0: run(twin, 3.092, 1.3), 1: run(slow, 3.617, 0.9), 2: run(twin, 3.024, 1.3)},
        "on": {0: run(twin, 3.08, 1.3), 1: run(twin, 3.10, 1.3), 2: run(twin, 3.03, 1.3)},
    }
    found = diagnose.outlier_runs(results, "off")
    assert len(found) == 1
    d = found[0]
    assert (d["variant"], d["seed"], d["twin"], d["fork_step"]) == ("off", 1, "on", 10)
    assert d["around"]["router_entropy"] == pytest.approx((0.9, 1.3))
    assert d["around"]["budget_error"] == pytest.approx((0.5, 0.5))
    assert "parts from on seed 1 at step 10" in d["line"] and "router_entropy 0.9 vs 1.3" in d["line"]


def test_rank_correlation_and_frequency_interval():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties share their mean rank: x ranks 1, 2.5, 2.5, 4 against 1, 2, 3, 4 -> 4.5 / sqrt(4.5 * 5) = 0.9487.
    assert stats.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        stats.spearman([1, 2], [1, 2, 3])
    # Wilson at 0 of 20: centre = half = (1.96^2 / 40) / (1 + 1.96^2 / 20) = 0.0806, so (0, 0.161).
    assert stats.wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    lo, hi = stats.wilson_interval(10, 20)
    assert lo == pytest.approx(1 - hi) and lo == pytest.approx(0.2993, abs=1e-4)
    with pytest.raises(ValueError, match="k=21 is not allowed"):
        stats.wilson_interval(21, 20)


def test_basin_study_counts_slow_runs_and_reads_the_early_overshoot():
    def run(loss, peak):  # FFN experts per token overshoot to `peak` at step 3, then settle at the target 2.0
        return {
            "val_loss": loss,
            "target_ffn_experts": 2.0,
            "curves": {"ffn_experts_per_token": [2.2, 2.5, peak] + [2.0] * 30},
        }

    losses = [3.00, 3.02, 3.01, 2.99, 3.60, 3.03, 2.98, 3.00]
    peaks = [2.6, 2.8, 2.7, 2.5, 3.0, 2.9, 2.55, 2.65]  # the slow run (seed 4) overshoots most
    study = diagnose.basin_study({"paper": {k: run(v, p) for k, (v, p) in enumerate(zip(losses, peaks))}})["paper"]
    assert (study["runs"], study["outliers"], study["share"]) == (8, 1, 0.125)
    assert study["interval"] == pytest.approx(list(stats.wilson_interval(1, 8)))
    assert [r["seed"] for r in study["per_run"] if r["outlier"]] == [4]
    assert study["per_run"][4]["early_overshoot"] == pytest.approx(1.0)
    assert study["overshoot_rho"] == pytest.approx(stats.spearman(peaks, losses))
    assert diagnose.early_overshoot({"val_loss": 3.0}) is None  # no target: nothing to overshoot
    flat = diagnose.basin_study({"fixed": {k: run(v, 2.5) for k, v in enumerate(losses)}})["fixed"]
    assert flat["overshoot_rho"] is None  # the same overshoot in every run ranks nothing


def test_step_routing_stats():
    model = random_model(seed=0)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    routing = model(x, return_routing=True).routing
    got = step_routing_stats(routing)
    e = model.config.num_experts
    assert 0 < got["router_entropy"] <= math.log(e) + 1e-9
    assert got["step_max_hidden"] == pytest.approx(routing.last_hidden.abs().max().item())


def test_restated_results_and_the_curves_figure():
    """The committed z_loss summary, restated: max_hidden gets a verdict like every other metric, the loss rows keep
    their stored means, and the figure draws one line per run."""
    stored = json.loads((Path(__file__).parents[2] / "results" / "z_loss.json").read_text())
    again = restate(stored, directions=METRIC_DIRECTION, margin=margin)
    rows = {r["metric"]: r for r in again["rows"]}
    assert rows["max_hidden"]["verdict"] in stats.RESOLVED + ("unresolved",)
    assert rows["val_loss"]["mean"] == pytest.approx(
        next(r for r in stored["rows"] if r["metric"] == "val_loss")["mean"]
    )
    fig = sweep_curves_figure(again)
    assert len(fig.data) == sum(len(by) for by in stored["runs"].values())


def test_basin_and_eps_ladder_figures_draw_every_run():
    def run(loss, peak, grad_rms):
        curves = {"ffn_experts_per_token": [2.3, peak] + [2.0] * 10, "loss": [4.0, 3.5, 3.0]}
        return {"val_loss": loss, "target_ffn_experts": 2.0, "grad_rms": grad_rms, "curves": curves}

    losses = [3.00, 3.02, 3.01, 2.99, 3.60, 3.03]
    runs = {
        "eps_1e-16": {k: run(v, 2.5 + 0.1 * k, 1e-3) for k, v in enumerate(losses)},
        "eps_1e-2": {k: run(v + 0.5, 2.6, 2e-3) for k, v in enumerate(losses)},
    }
    summary = {"sweep": "adam_eps_ladder", "seeds": 6, "preset": "tiny", "runs": runs, "rows": []}
    summary["basin"] = diagnose.basin_study(runs)
    basin = basin_figure(summary)
    assert sum(len(t.x) for t in basin.data) == 12
    assert [t.name for t in basin.data if "outlier" in t.name and "/" not in t.name] == [
        "eps_1e-16 outlier",
        "eps_1e-2 outlier",
    ]
    ladder = eps_ladder_figure(summary)
    assert [t.name for t in ladder.data] == ["eps 1e-16", "eps 0.01"]
    assert list(ladder.data[1].x) == pytest.approx([5.0] * 6)  # 1e-2 / 2e-3
    panel = sweep_panel(summary)
    assert len(panel.data) == 6 + 1 + 12  # a line per seed joining its variants and the means, a curve per run
