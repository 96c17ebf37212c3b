"""Tests of `longcat_lab.experiments`: the matched-compute refusal (on the target and on the measured FFN experts per
token), the refusal to reuse work done with another configuration, every named sweep's plan, the seed-growing loop
and the resume of a half-finished sweep (tiny preset, a few steps). The statistics are in test_stats.py.

Run: `python -m pytest -q tests/experiments` (`-m "not slow"` skips the two that train)."""

import dataclasses
import json

import pytest

from longcat_lab._util import json_bytes
from longcat_lab.cli import parser
from longcat_lab.cli.sweep import command_line
from longcat_lab.experiments import reuse, runner, stats
from longcat_lab.experiments.summary import format_summary, settle_step
from longcat_lab.experiments.sweeps import SWEEPS, Sweep
from longcat_lab.model.config import ModelConfig
from longcat_lab.train import train
from longcat_lab.train.config import TrainConfig


def test_summaries_write_plain_lists_on_one_line_and_leave_strings_alone():
    obj = {"curve": [1, 2.5, None, True], "nested": [[1, 2], [3]], "texts": ["a, b", "[\n c]"], "s": "see [ 1, 2 ]"}
    text = json_bytes(obj, flat_lists=True).decode()
    assert json.loads(text) == obj
    assert '"curve": [1, 2.5, null, true]' in text and "[1, 2]" in text and '"s": "see [ 1, 2 ]"' in text
    assert '"a, b"' in text and len(text) < len(json_bytes(obj))


def test_settle_step():
    series = [4.0, 3.0, 2.5] + [2.0] * 30
    assert settle_step(series, 2.0, window=1) == 4
    assert settle_step([3.0] * 20, 2.0) == 20  # never settles: the run's length


def test_named_sweeps_are_matched_at_the_mini_preset(tmp_path):
    old = {"layer", "zero_experts", "controller", "z_loss", "adam_eps", "growth", "mla_scale"}
    assert set(SWEEPS) == old | {"zero_count", "controller_rate", "adam_eps_ladder", "lr"}
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
    lr = runner.plan("lr", tmp_path / "lr", 1)
    by = {r.variant: TrainConfig.from_dict(r.train_config).stages for r in lr}
    assert [s.lr for s in by["lr_x4"]] == pytest.approx([4 * s.lr for s in by["lr_x1"]])
    with pytest.raises(ValueError, match="lr_scale must be a number > 0"):
        runner.plan(Sweep("bad", {"a": ("lr_scale=0",)}, ("val_loss",), "", ""), tmp_path / "bad", 1)
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


def test_compute_is_checked_on_the_measured_ffn_experts(tmp_path):
    sweep = Sweep(
        "ctl", {"paper": ("bias_controller=paper",), "none": ("bias_controller=none",)}, ("val_loss",), "", ""
    )
    runs = runner.plan(sweep, tmp_path, 1, 2, "tiny")
    target = runner.compute_table(sweep, runs)["none"]["target_ffn_experts"]
    runner.check_matched(sweep, runner.compute_table(sweep, runs, {"paper": target, "none": 1.03 * target}))
    measured = runner.compute_table(sweep, runs, {"paper": target, "none": 0.65 * target})
    # The activated-parameter check alone passes (routed experts are a small share of tiny's parameters) ...
    assert measured["none"]["activated_params"] < measured["paper"]["activated_params"]
    with pytest.raises(runner.ComputeMismatchError, match=rf"variant 'none' ran at {0.65 * target:.3f} FFN experts"):
        runner.check_matched(sweep, measured)
    # ... and "report" keeps the compute at what ran and returns one line per drifting variant.
    lines = runner.check_matched(sweep, measured, on_drift="report")
    assert len(lines) == 1 and "'none'" in lines[0] and f"target {target:.3f}" in lines[0]
    with pytest.raises(ValueError, match="on_drift='fix' is not allowed"):
        runner.check_matched(sweep, measured, on_drift="fix")
    # At the ablation preset experts carry 31% of the activated parameters: the drift opens a compute gap, which
    # "report" returns as lines too (the summary says what ran) while the planned compute is still refused.
    big = runner.plan(sweep, tmp_path / "big", 1, 2, "ablation")
    k_e = runner.compute_table(sweep, big)["none"]["target_ffn_experts"]
    gap = runner.compute_table(sweep, big, {"paper": k_e, "none": 0.65 * k_e})
    lines = runner.check_matched(sweep, gap, on_drift="report")
    assert [line.split(" has ")[-1].split("=")[0] for line in lines[1:]] == ["activated_params", "flops_per_token"]
    assert all("at the FFN experts per token it ran at" in line for line in lines[1:])


def test_a_run_folder_is_reused_only_with_its_configuration(tmp_path):
    sweep = SWEEPS["z_loss"]
    done = runner.plan(sweep, tmp_path, 1, 6, "tiny")
    for r in done:  # what execute() writes before it trains
        r.dir.mkdir(parents=True)
        (r.dir / runner.PLAN).write_text(json.dumps({"model_config": r.model_config, "train_config": r.train_config}))
    runner.check_reusable(runner.plan(sweep, tmp_path, 1, 6, "tiny"))  # the same plan: reusable
    with pytest.raises(
        ValueError, match=r"seed0 was made with another configuration \(model.expert_ffn_hidden_size 32"
    ):
        runner.check_reusable(runner.plan(sweep, tmp_path, 1, None, "mini"))
    with pytest.raises(ValueError, match=r"train.stages"):
        runner.check_reusable(runner.plan(sweep, tmp_path, 1, 8, "tiny"))
    (done[0].dir / runner.PLAN).unlink()
    (done[0].dir / runner.RESULT).write_text("{}")
    with pytest.raises(ValueError, match="holds work with no recorded configuration"):
        runner.check_reusable(runner.plan(sweep, tmp_path, 1, 6, "tiny"))


def test_a_run_another_sweep_finished_with_the_same_configuration_is_adopted(tmp_path):
    eps = runner.plan(SWEEPS["adam_eps"], tmp_path / "adam_eps", 1, 6, "tiny")  # eps_1e-16: the default config
    scale = runner.plan(SWEEPS["mla_scale"], tmp_path / "mla_scale", 1, 6, "tiny")  # scale_on: the same config
    assert reuse.adopt_twins(scale, tmp_path) == {}  # nothing finished yet
    done = eps[0]
    done.dir.mkdir(parents=True)
    planned = {"model_config": done.model_config, "train_config": done.train_config}
    (done.dir / runner.PLAN).write_bytes(json_bytes(planned))  # as execute() writes it: keys sorted
    (done.dir / runner.RESULT).write_text('{"val_loss": 3.5}')
    assert reuse.adopt_twins(scale, tmp_path) == {"scale_on/seed0": str(done.dir)}
    assert scale[0].finished and not scale[1].finished  # scale_off differs in mla_scale: trained, not adopted
    assert (scale[0].dir / runner.RESULT).read_text() == '{"val_loss": 3.5}'
    runner.check_reusable(scale)  # the adopted folder carries its plan
    assert reuse.adopt_twins(scale, tmp_path) == {}  # already there
    longer = runner.plan(SWEEPS["mla_scale"], tmp_path / "longer", 1, 8, "tiny")
    assert reuse.adopt_twins(longer, tmp_path) == {}  # another step count is another configuration


def test_seeds_grow_until_every_verdict_resolves_or_the_cap(tmp_path, monkeypatch):
    calls = []

    def fake(sweep, out, seeds, **kw):
        calls.append(seeds)
        verdict = "better" if seeds >= 12 else "unresolved"
        return {"rows": [{"verdict": verdict}], "path": str(tmp_path / "summary.json")}

    monkeypatch.setattr(runner, "run_sweep", fake)
    assert runner.run_growing("z_loss", tmp_path, 8, 24)["seed_rounds"][-1] == {"seeds": 12, "unresolved": 0}
    assert calls == [8, 12]
    calls.clear()
    capped = runner.run_growing("z_loss", tmp_path, 2, 3, 4)
    assert calls == [2, 3] and capped["seed_rounds"][-1]["unresolved"] == 1
    with pytest.raises(ValueError, match="max_seeds"):
        runner.run_growing("z_loss", tmp_path, 8, 4)


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
    summary = runner.run_sweep(sweep, tmp_path, seeds=2, steps=steps, preset="tiny", progress=False, on_drift="report")
    assert summary["skipped_finished_runs"] == 0 and all(r.finished for r in runs)
    starts = [json.loads(line) for line in (first.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed_from"] for r in starts if r["kind"] == "start"] == [None, 2]
    assert [r["step"] for r in starts if r["kind"] == "train"] == [1, 2, 3, 4]
    row = next(r for r in summary["rows"] if r["metric"] == "val_loss")
    assert row["variant"] == "off" and row["n"] == 2 and row["verdict"] in stats.VERDICTS
    assert row["margin"] == 0.02 and row["mde"] > 0 and row["t_interval"][0] <= row["mean"] <= row["t_interval"][1]
    grad = next(r for r in summary["rows"] if r["metric"] == "grad_rms")
    assert grad["verdict"] in stats.VERDICTS and grad["margin"] == pytest.approx(0.1 * grad["baseline_mean"])
    curves = summary["runs"]["on"]["0"]["curves"]
    assert len(curves["router_entropy"]) == steps and all(v > 0 for v in curves["step_max_hidden"])
    assert row["mean"] == pytest.approx(row["variant_mean"] - row["baseline_mean"])
    saved = json.loads((tmp_path / "scale" / "summary.json").read_text())
    assert saved["commit"] and saved["machine"] and saved["runs"]["on"]["1"]["steps"] == steps
    assert "paired difference variant - on" in format_summary(summary)
    # Two seeds: the outlier rule needs three.
    assert {v: (b["outliers"], b["runs"]) for v, b in summary["basin"].items()} == {"on": (0, 2), "off": (0, 2)}
    again = runner.run_sweep(sweep, tmp_path, seeds=2, steps=steps, preset="tiny", progress=False, on_drift="report")
    assert again["skipped_finished_runs"] == 4 and again["rows"] == summary["rows"]


def test_a_sweep_records_the_command_that_reproduces_it():
    args = parser().parse_args(["sweep", "zero_experts", "--max-seeds", "24", "--allow-drift", "--jobs", "2"])
    assert command_line(args) == (
        "longcat-lab sweep zero_experts --seeds 8 --max-seeds 24 --seed-step 4 --preset ablation --allow-drift"
    )
    args = parser().parse_args(["sweep", "z_loss", "--seeds", "3", "--preset", "tiny", "--steps", "4"])
    assert command_line(args) == "longcat-lab sweep z_loss --seeds 3 --preset tiny --steps 4"
