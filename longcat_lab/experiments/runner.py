"""Running a sweep: `plan` (every variant x seed as an ordinary run folder with its configs), `compute_table` and
`check_matched` (the matched-compute rule, on the target before the runs and on the measured FFN experts per token
after them), the reuse of finished work (`experiments.reuse`: a run folder only for the configuration it was made
with; a run another sweep finished with the same configuration copied in, not trained again), `run_sweep`
(runs what is not finished, `jobs` at a time in their own processes, with a progress bar over the whole sweep,
then writes and returns the summary) and `run_growing` (adds seeds until every verdict resolves or a cap).

Layout under OUT/NAME: `runs/VARIANT/seedK/` (a run folder: metrics.jsonl, checkpoints/, and `result.json` written
last, atomically, which marks the run finished; `plan.json`, the configs it was started with), and
`summary.json`. A re-run skips finished runs and resumes half-finished ones from their newest checkpoint (the
trainer's resume), but only when the folder was made with the planned configuration. Seed k of every variant uses
train seed SEED0 + k, so variants see the same data order and validation windows and, where shapes allow, the same
initial weights. Every run uses one torch thread, so its numbers do not depend on `--jobs`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from longcat_lab._util import atomic_write_bytes, check_choice, check_int, json_bytes, provenance
from longcat_lab.experiments.diagnose import basin_study, outlier_runs
from longcat_lab.experiments.reuse import PLAN, RESULT, adopt_twins, check_reusable
from longcat_lab.experiments.stats import RESOLVED
from longcat_lab.experiments.summary import max_hidden, mean_validation_se, run_metrics, summarise, validation_se
from longcat_lab.experiments.sweeps import METRIC_DIRECTION, Sweep, get, margin
from longcat_lab.model import presets
from longcat_lab.model.accounting import activated_params, flops_per_token
from longcat_lab.model.config import ModelConfig
from longcat_lab.parallel.launch import die_with_parent
from longcat_lab.train import apply_overrides, train, train_preset
from longcat_lab.train.config import TrainConfig
from longcat_lab.train.control import resolve_target

SEED0 = 1000
TOLERANCE = 0.05  # relative spread of activated params, FLOPs per token and tokens seen allowed between variants
# and relative gap between a variant's measured FFN experts per token and its target
DRIFT = ("refuse", "report")


class ComputeMismatchError(ValueError):
    """The variants of a sweep spend different compute and the sweep does not say compute is the variable."""


@dataclass
class Run:
    variant: str
    seed_index: int
    dir: Path
    model_config: dict
    train_config: dict
    half: dict | None = None  # growth: the half-depth run's (model_config, train_config, dir)

    @property
    def finished(self) -> bool:
        return (self.dir / RESULT).is_file()


def configs(preset: str, steps: int | None, sets: tuple[str, ...], seed: int):
    """The (ModelConfig, TrainConfig) of one run: the preset, `steps` steps, the overrides `sets` (with
    `lr_scale=X`), train seed `seed`, one torch thread."""
    tc = train_preset(preset)
    if steps is not None:
        tc = tc.with_steps(steps)
    scales = [s for s in sets if s.startswith("lr_scale=")]
    for s in scales:
        scale = float(s.split("=", 1)[1])
        if not scale > 0:
            raise ValueError(f"{s!r} is not allowed: lr_scale must be a number > 0")
        tc = dataclasses.replace(tc, stages=[dataclasses.replace(g, lr=g.lr * scale) for g in tc.stages])
    rest = [s for s in sets if s not in scales]
    return apply_overrides(presets.get(preset), tc, [*rest, f"train.seed={seed}", "num_threads=1"])


def plan(sweep: Sweep | str, out: Path, seeds: int = 3, steps: int | None = None, preset: str = "mini") -> list[Run]:
    """Every run of the sweep, in variant-major order (no work is done)."""
    sweep = get(sweep) if isinstance(sweep, str) else sweep
    check_int("seeds", seeds, 1)
    runs = []
    for variant, sets in sweep.variants.items():
        for k in range(seeds):
            mc, tc = configs(preset, steps, sets, SEED0 + k)
            d = Path(out) / "runs" / variant / f"seed{k}"
            half = None
            if variant in sweep.grow_from_half:
                half_mc = mc.replace(num_layers=max(1, mc.num_layers // 2))
                half_tc = dataclasses.replace(tc, stop_after=max(1, tc.total_steps // 2))
                half = {"model_config": half_mc.to_dict(), "train_config": half_tc.to_dict(), "dir": str(d / "half")}
                tc = dataclasses.replace(tc, init_from=str(d / "half"), init_keep_state=True)
            runs.append(Run(variant, k, d, mc.to_dict(), tc.to_dict(), half))
    return runs


def compute_table(sweep: Sweep, runs: list[Run], measured: dict[str, float] | None = None) -> dict[str, dict]:
    """Per variant: activated parameters and training FLOPs per token at the controller's FFN-expert target, or,
    for the variants in `measured` (variant -> mean measured FFN experts per token), at what the runs measured;
    tokens seen; growth variants count their half-depth first half."""
    out = {}
    for r in runs:
        if r.variant in out:
            continue
        mc, tc = ModelConfig.from_dict(r.model_config), TrainConfig.from_dict(r.train_config)
        target = None if mc.layer_style == "dense" else resolve_target(tc.controller, mc)
        got = (measured or {}).get(r.variant)
        k = target if got is None or target is None else got
        act = activated_params(mc, k)["mean"]
        flops = flops_per_token(mc, tc.stages[0].seq_len, k)
        tokens = sum(n * s.steps for n, s in zip(tc.tokens_per_step, tc.stages))
        if r.half:
            hm = ModelConfig.from_dict(r.half["model_config"])
            share = TrainConfig.from_dict(r.half["train_config"]).stop_after / tc.total_steps
            act = share * activated_params(hm, k)["mean"] + (1 - share) * act
            flops = share * flops_per_token(hm, tc.stages[0].seq_len, k) + (1 - share) * flops
        out[r.variant] = {
            "activated_params": act,
            "flops_per_token": flops,
            "tokens_seen": tokens,
            "varies": r.variant in sweep.compute_varies,
            "target_ffn_experts": target,
            "measured_ffn_experts": got,
        }
    return out


def check_matched(
    sweep: Sweep, table: dict[str, dict], tolerance: float = TOLERANCE, on_drift: str = "refuse"
) -> list[str]:
    """ComputeMismatchError unless every variant not in `sweep.compute_varies` is within `tolerance` (relative to
    the baseline) in activated parameters, FLOPs per token and tokens seen, and (a table with measured values,
    every variant) its measured FFN experts per token is within `tolerance` of its target. A drift from the target
    raises (`on_drift="refuse"`) or is returned as one line per variant (`"report"`: the table already holds the
    compute at the measured value, so the summary states what ran, and a compute gap that the drift opened is
    returned as a line too)."""
    check_choice("on_drift", on_drift, DRIFT)
    drift = []
    for variant, c in table.items():
        got, target = c.get("measured_ffn_experts"), c.get("target_ffn_experts")
        if got is not None and target and abs(got - target) / target > tolerance:
            drift.append(
                f"sweep {sweep.name!r}: variant {variant!r} ran at {got:.3f} FFN experts per token against its "
                f"target {target:.3f} ({abs(got - target) / target:.1%} apart, more than the {tolerance:.0%} allowed)"
            )
    if drift and on_drift == "refuse":
        raise ComputeMismatchError(drift[0] + "; pass on_drift='report' (--allow-drift) to report it instead")
    base = table[sweep.baseline]
    for variant, c in table.items():
        if c["varies"]:
            continue
        for key in ("activated_params", "flops_per_token", "tokens_seen"):
            rel = abs(c[key] - base[key]) / max(abs(base[key]), 1e-12)
            if rel > tolerance:
                line = (
                    f"sweep {sweep.name!r}: variant {variant!r} has {key}={c[key]:,.0f} against the baseline "
                    f"{sweep.baseline!r}'s {base[key]:,.0f} ({rel:.1%} apart, more than the {tolerance:.0%} allowed)"
                )
                measured = c.get("measured_ffn_experts") is not None or base.get("measured_ffn_experts") is not None
                if on_drift == "report" and measured and key != "tokens_seen":
                    drift.append(line + " at the FFN experts per token it ran at")
                    continue
                raise ComputeMismatchError(line + "; match the compute or list the variant in compute_varies")
    return drift


def execute(run: Run) -> dict:
    """Train one run (resuming a half-finished one), measure it, and write result.json last. In its own process
    under `run_sweep(jobs > 1)`."""
    torch.set_num_threads(1)
    for folder, mc, tc in [(run.dir, run.model_config, run.train_config)] + (
        [(Path(run.half["dir"]), run.half["model_config"], run.half["train_config"])] if run.half else []
    ):
        if not (folder / PLAN).is_file():
            atomic_write_bytes(folder / PLAN, json_bytes({"model_config": mc, "train_config": tc}))
    if run.half and not (Path(run.half["dir"]) / RESULT).is_file():
        half_tc = TrainConfig.from_dict(run.half["train_config"])
        train(ModelConfig.from_dict(run.half["model_config"]), half_tc, run.half["dir"], resume=True, progress=False)
        atomic_write_bytes(Path(run.half["dir"]) / RESULT, json_bytes({"half": True}))
    mc, tc = ModelConfig.from_dict(run.model_config), TrainConfig.from_dict(run.train_config)
    result = train(mc, tc, run.dir, resume=True, progress=False)
    seq_len = tc.eval_seq_len or tc.stages[0].seq_len
    metrics = run_metrics(result.rows(), max_hidden(result.model, result.dataset, seq_len))
    metrics["val_loss_se"] = validation_se(result.model, result.dataset, seq_len, tc.eval_windows)
    atomic_write_bytes(run.dir / RESULT, json_bytes(metrics, flat_lists=True))
    return metrics


def run_sweep(
    sweep: Sweep | str,
    out: str | Path,
    seeds: int = 3,
    jobs: int = 1,
    steps: int | None = None,
    preset: str = "mini",
    progress: bool = True,
    command: str = "",
    on_drift: str = "refuse",
) -> dict:
    """Plan, check compute and the reuse of finished work, run what is not finished, check the compute that ran
    (`check_matched`, `on_drift`) and summarise; returns the summary (also OUT/NAME/summary.json, with the command,
    date, commit and machine)."""
    sweep = get(sweep) if isinstance(sweep, str) else sweep
    check_int("jobs", jobs, 1)
    check_choice("on_drift", on_drift, DRIFT)
    folder = Path(out) / sweep.name
    runs = plan(sweep, folder, seeds, steps, preset)
    table = compute_table(sweep, runs)
    check_matched(sweep, table)
    check_reusable(runs)
    twins = adopt_twins(runs, Path(out))
    todo = [r for r in runs if not r.finished]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"sweep {sweep.name}", disable=not progress)
    try:
        if jobs == 1:
            for r in todo:
                execute(r)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can deadlock
            # The workers end with this process (kill -9 included): none trains on, holding a run's lock.
            with cf.ProcessPoolExecutor(jobs, ctx, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                for f in cf.as_completed([pool.submit(execute, r) for r in todo]):
                    f.result()
                    bar.update(1)
    finally:
        bar.close()
    results: dict[str, dict[int, dict]] = {}
    for r in runs:
        results.setdefault(r.variant, {})[r.seed_index] = json.loads((r.dir / RESULT).read_text())
    measured = {}
    for v, by in results.items():
        got = [m["ffn_experts_per_token"] for m in by.values() if m.get("ffn_experts_per_token") is not None]
        if got:
            measured[v] = sum(got) / len(got)
    table = compute_table(sweep, runs, measured)
    drift = check_matched(sweep, table, on_drift=on_drift)
    tc0 = runs[0].train_config
    summary = {
        "sweep": sweep.name,
        "command": command
        or f"longcat-lab sweep {sweep.name} --seeds {seeds} --preset {preset}" + (f" --steps {steps}" if steps else ""),
        **provenance(),
        "preset": preset,
        "seeds": seeds,
        "steps": sum(s["steps"] for s in tc0["stages"]),
        "baseline": sweep.baseline,
        "claim": sweep.claim,
        "lab_caveat": sweep.lab_caveat,
        "variants": {v: list(s) for v, s in sweep.variants.items()},
        "variant_order": list(sweep.variants),  # the baseline first (JSON files sort their keys)
        "compute": table,
        "tolerance": TOLERANCE,
        "compute_drift": drift,
        "verdict_rule": "better/worse when the 95% Student-t interval of the mean paired difference excludes 0; "
        "equivalent when TOST (90% t-interval) lies inside the metric's margin; else unresolved (see mde)",
        "skipped_finished_runs": len(runs) - len(todo) - len(twins),
        "twin_runs": twins,
        "runs": {v: {str(k): m for k, m in by.items()} for v, by in results.items()},
        "rows": summarise(results, sweep.baseline, sweep.metrics, METRIC_DIRECTION, margin),
        "val_loss_se": mean_validation_se(results),
        "outlier_runs": outlier_runs(results, sweep.baseline),
    }
    # How often each variant ends in the slow basin, with an interval, and whether the early overshoot predicts
    # the end loss (the controller sweep over 20+ seeds answers this per mode).
    summary["basin"] = basin_study(results)
    summary["path"] = str(folder / "summary.json")
    atomic_write_bytes(folder / "summary.json", json_bytes(summary, flat_lists=True))
    return summary


def run_growing(
    sweep: Sweep | str, out: str | Path, seeds: int = 8, max_seeds: int = 24, seed_step: int = 4, **kw
) -> dict:
    """`run_sweep` with `seeds` seeds, then `seed_step` more at a time while any row's verdict is unresolved and
    fewer than `max_seeds` ran (finished runs are reused, so each round trains only the new seeds). The summary
    says how many rounds it took in `seed_rounds`."""
    check_int("seeds", seeds, 2)
    check_int("max_seeds", max_seeds, seeds)
    check_int("seed_step", seed_step, 1)
    rounds, n = [], seeds
    while True:
        summary = run_sweep(sweep, out, seeds=n, **kw)
        open_rows = [r for r in summary["rows"] if r["verdict"] not in RESOLVED]
        rounds.append({"seeds": n, "unresolved": len(open_rows)})
        if not open_rows or n >= max_seeds:
            break
        n = min(max_seeds, n + seed_step)
    summary["seed_rounds"] = rounds
    summary["max_seeds"] = max_seeds
    atomic_write_bytes(Path(summary["path"]), json_bytes(summary, flat_lists=True))
    return summary


__all__ = [
    "ComputeMismatchError",
    "DRIFT",
    "PLAN",
    "check_reusable",
    "run_growing",
    "Run",
    "RESULT",
    "SEED0",
    "TOLERANCE",
    "check_matched",
    "compute_table",
    "configs",
    "execute",
    "plan",
    "run_sweep",
]
