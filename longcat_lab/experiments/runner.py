"""Running a sweep: `plan` (every variant x seed as an ordinary run folder with its configs), `compute_table` and
`check_matched` (the matched-compute rule), `run_sweep` (runs what is not finished, `jobs` at a time in their own
processes, with a progress bar over the whole sweep, then writes and returns the summary).

Layout under OUT/NAME: `runs/VARIANT/seedK/` (a run folder: metrics.jsonl, checkpoints/, and `result.json` written
last, atomically, which marks the run finished), and `summary.json`. A re-run skips finished runs and resumes
half-finished ones from their newest checkpoint (the trainer's resume). Seed k of every variant uses train seed
SEED0 + k, so variants see the same data order and, where shapes allow, the same initial weights. Every run uses one
torch thread, so its numbers do not depend on `--jobs`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from longcat_lab._util import atomic_write_bytes, check_int, json_bytes
from longcat_lab.experiments.summary import max_hidden, run_metrics, summarise
from longcat_lab.experiments.sweeps import METRIC_DIRECTION, Sweep, get
from longcat_lab.model import presets
from longcat_lab.model.accounting import activated_params, flops_per_token
from longcat_lab.model.config import ModelConfig
from longcat_lab.parallel.launch import die_with_parent
from longcat_lab.train import apply_overrides, train, train_preset
from longcat_lab.train.config import TrainConfig
from longcat_lab.train.control import resolve_target

SEED0 = 1000
TOLERANCE = 0.05  # relative spread of activated params, FLOPs per token and tokens seen allowed between variants
RESULT = "result.json"


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


def _configs(preset: str, steps: int | None, sets: tuple[str, ...], seed: int):
    tc = train_preset(preset)
    if steps is not None:
        tc = tc.with_steps(steps)
    return apply_overrides(presets.get(preset), tc, [*sets, f"train.seed={seed}", "num_threads=1"])


def plan(sweep: Sweep | str, out: Path, seeds: int = 3, steps: int | None = None, preset: str = "mini") -> list[Run]:
    """Every run of the sweep, in variant-major order (no work is done)."""
    sweep = get(sweep) if isinstance(sweep, str) else sweep
    check_int("seeds", seeds, 1)
    runs = []
    for variant, sets in sweep.variants.items():
        for k in range(seeds):
            mc, tc = _configs(preset, steps, sets, SEED0 + k)
            d = Path(out) / "runs" / variant / f"seed{k}"
            half = None
            if variant in sweep.grow_from_half:
                half_mc = mc.replace(num_layers=max(1, mc.num_layers // 2))
                half_tc = dataclasses.replace(tc, stop_after=max(1, tc.total_steps // 2))
                half = {"model_config": half_mc.to_dict(), "train_config": half_tc.to_dict(), "dir": str(d / "half")}
                tc = dataclasses.replace(tc, init_from=str(d / "half"), init_keep_state=True)
            runs.append(Run(variant, k, d, mc.to_dict(), tc.to_dict(), half))
    return runs


def compute_table(sweep: Sweep, runs: list[Run]) -> dict[str, dict]:
    """Per variant: activated parameters (at the controller's FFN-expert target), training FLOPs per token and
    tokens seen; growth variants count their half-depth first half."""
    out = {}
    for r in runs:
        if r.variant in out:
            continue
        mc, tc = ModelConfig.from_dict(r.model_config), TrainConfig.from_dict(r.train_config)
        k = None if mc.layer_style == "dense" else resolve_target(tc.controller, mc)
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
        }
    return out


def check_matched(sweep: Sweep, table: dict[str, dict], tolerance: float = TOLERANCE) -> None:
    """ComputeMismatchError unless every variant not in `sweep.compute_varies` is within `tolerance` (relative to
    the baseline) in activated parameters, FLOPs per token and tokens seen."""
    base = table[sweep.baseline]
    for variant, c in table.items():
        if c["varies"]:
            continue
        for key in ("activated_params", "flops_per_token", "tokens_seen"):
            rel = abs(c[key] - base[key]) / max(abs(base[key]), 1e-12)
            if rel > tolerance:
                raise ComputeMismatchError(
                    f"sweep {sweep.name!r}: variant {variant!r} has {key}={c[key]:,.0f} against the baseline "
                    f"{sweep.baseline!r}'s {base[key]:,.0f} ({rel:.1%} apart, more than the {tolerance:.0%} allowed); "
                    "match the compute or list the variant in compute_varies"
                )


def execute(run: Run) -> dict:
    """Train one run (resuming a half-finished one), measure it, and write result.json last. In its own process
    under `run_sweep(jobs > 1)`."""
    torch.set_num_threads(1)
    if run.half and not (Path(run.half["dir"]) / RESULT).is_file():
        half_tc = TrainConfig.from_dict(run.half["train_config"])
        train(ModelConfig.from_dict(run.half["model_config"]), half_tc, run.half["dir"], resume=True, progress=False)
        atomic_write_bytes(Path(run.half["dir"]) / RESULT, json_bytes({"half": True}))
    mc, tc = ModelConfig.from_dict(run.model_config), TrainConfig.from_dict(run.train_config)
    result = train(mc, tc, run.dir, resume=True, progress=False)
    peaks = max_hidden(result.model, result.dataset, tc.eval_seq_len or tc.stages[0].seq_len)
    metrics = run_metrics(result.rows(), peaks)
    atomic_write_bytes(run.dir / RESULT, json_bytes(metrics))
    return metrics


def _provenance() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        if commit and dirty:
            commit += " (with uncommitted changes)"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "machine": f"{platform.platform()}; {platform.processor() or platform.machine()}; "
        f"{multiprocessing.cpu_count()} logical CPUs",
    }


def run_sweep(
    sweep: Sweep | str,
    out: str | Path,
    seeds: int = 3,
    jobs: int = 1,
    steps: int | None = None,
    preset: str = "mini",
    progress: bool = True,
    command: str = "",
) -> dict:
    """Plan, check compute, run what is not finished and summarise; returns the summary (also OUT/NAME/summary.json,
    with the command, date, commit and machine)."""
    sweep = get(sweep) if isinstance(sweep, str) else sweep
    check_int("jobs", jobs, 1)
    folder = Path(out) / sweep.name
    runs = plan(sweep, folder, seeds, steps, preset)
    table = compute_table(sweep, runs)
    check_matched(sweep, table)
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
    tc0 = runs[0].train_config
    summary = {
        "sweep": sweep.name,
        "command": command
        or f"longcat-lab sweep {sweep.name} --seeds {seeds} --preset {preset}" + (f" --steps {steps}" if steps else ""),
        **_provenance(),
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
        "verdict_rule": "better/worse when the 95% Student-t interval of the mean paired difference excludes 0",
        "skipped_finished_runs": len(runs) - len(todo),
        "runs": {v: {str(k): m for k, m in by.items()} for v, by in results.items()},
        "rows": summarise(results, sweep.baseline, sweep.metrics, METRIC_DIRECTION),
    }
    summary["path"] = str(folder / "summary.json")
    atomic_write_bytes(folder / "summary.json", json_bytes(summary))
    return summary


__all__ = [
    "ComputeMismatchError",
    "Run",
    "RESULT",
    "SEED0",
    "TOLERANCE",
    "check_matched",
    "compute_table",
    "execute",
    "plan",
    "run_sweep",
]
