"""Speedrun: time to reach a fixed bits-per-byte target on a fixed task, over paired seeds, for a baseline recipe and
a candidate, judged by the sweep verdict rule (docs/design.md §3.6).

The task is fixed: the preset's built-in data (its domains and byte caps, data seed 0), the trainer's frozen
validation windows (`data.eval_windows`, the same for every run), bits per byte averaged over domains, evaluated
every `--eval-every` steps. A run's time to target is the trainer's `time_s` (one torch thread, evaluations
included) at which its mean bits per byte reaches `--target-bpb`, the evaluated curve taken as linear between
evaluations (the first evaluation at or below the target and the one before it); a run that never gets there within
`--steps` counts as not reached. Seed k of both recipes uses train seed 1000 + k (the sweeps'
pairing); the candidate is better only when the paired 95% t-interval of (candidate - baseline) seconds excludes 0.

Recipes are sweep overrides (`--set` pairs and `lr_scale=X`, `experiments.runner.configs`): `--candidate
lr_scale=2` tries twice the preset's learning rate.

A recipe that ends at a lower loss in the same time is the other way to win: with `--steps` equal for both recipes
the runs take the same time per step, and the paired difference of the final mean bits per byte is judged by the
same rule.

The target should be one the main job's small preset reaches today; it has to be measured first (a run of this
script with `--target-bpb 0` prints each seed's final bits per byte). Times are the trainer's own clock on one
thread; `--jobs 2` trains a seed's two recipes at once, side by side under the same load, one core each. Run folders
stay in `--out`, and a finished run is read back, not retrained: an interrupted speedrun resumes, and a second target
can be judged on the same runs. The result (with command, date, commit and machine) goes to OUT/speedrun.json and,
with `--results`, to a committed copy; the figures go to benchmarks/RESULTS.md.

Run: `.venv/bin/python benchmarks/speedrun.py --preset small --seeds 4 --jobs 2 --target-bpb 1.76 --baseline
     bias_controller=paper rg_every=10 --candidate bias_controller=pid rg_every=50 --out runs/speedrun`
     `.venv/bin/python benchmarks/speedrun.py --smoke` (tiny preset, 4 steps, 2 seeds: checks the machinery)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import sys
import tempfile
from pathlib import Path

from longcat_lab import checkpoint
from longcat_lab._util import atomic_write_bytes, json_bytes, provenance
from longcat_lab.experiments.runner import SEED0, configs
from longcat_lab.experiments.stats import compare
from longcat_lab.train import train
from longcat_lab.train.resume import config_diffs
from longcat_lab.train.telemetry import read_metrics


def _mean_bpb(row: dict) -> float:
    return sum(row["bits_per_byte"].values()) / len(row["bits_per_byte"])


def time_to_target(rows: list[dict], target: float) -> float | None:
    """Seconds at which mean bits per byte reaches `target` (None: never), on the evaluated curve taken as linear
    between evaluations, so that the answer is not rounded up to the next evaluation."""
    seconds = {r["step"]: r["time_s"] for r in rows if r.get("kind") == "train"}
    before = None  # (seconds, mean bits per byte) of the previous evaluation
    for r in rows:
        if r.get("kind") != "eval_bpb" or r["step"] not in seconds:
            continue
        now = (seconds[r["step"]], _mean_bpb(r))
        if now[1] <= target:
            if before is None or before[1] <= now[1]:
                return now[0]
            return before[0] + (before[1] - target) / (before[1] - now[1]) * (now[0] - before[0])
        before = now
    return None


def final_bpb(rows: list[dict]) -> float | None:
    """The mean bits per byte of the run's last evaluation."""
    evals = [r for r in rows if r.get("kind") == "eval_bpb"]
    return _mean_bpb(evals[-1]) if evals else None


def finished_rows(out: Path, model_config, train_config) -> list | None:
    """The metrics rows of a finished run in `out`, read from its metrics.jsonl without building data or model:
    its newest checkpoint verifies, was written with exactly these configs, and its last step was evaluated. None
    otherwise (no run, a killed one, or other configs, which `train` then resumes or refuses)."""
    ckpt, _ = checkpoint.newest_verified(out) if out.is_dir() else (None, [])
    if ckpt is None or config_diffs(ckpt, model_config, train_config, strict=True):
        return None
    rows = read_metrics(out)
    last = train_config.total_steps
    return rows if any(r.get("kind") == "eval_bpb" and r.get("step") == last for r in rows) else None


def run_recipe(preset: str, steps: int | None, sets: tuple[str, ...], seed: int, eval_every: int, out: Path) -> list:
    """One run's metrics rows; a finished run in `out` is read back, a killed one resumes."""
    mc, tc = configs(preset, steps, (*sets, f"eval_every={eval_every}", "ckpt_every=0"), SEED0 + seed)
    rows = finished_rows(out, mc, tc)
    return rows if rows is not None else train(mc, tc, out, resume=True, progress=False).rows()


def task_changes(preset: str, steps: int | None, recipes: dict[str, tuple[str, ...]], eval_every: int) -> list[str]:
    """What the recipes' overrides change of the fixed task (data, tokenizer, validation windows, evaluation
    cadence): the names that differ between the recipes; empty when they measure the same thing."""
    tasks = []
    for sets in recipes.values():
        mc, tc = configs(preset, steps, (*sets, f"eval_every={eval_every}"), SEED0)
        seq_len = tc.eval_seq_len or tc.stages[0].seq_len
        tasks.append(
            {"data": tc.data, "eval_windows": tc.eval_windows, "eval_seq_len": seq_len, "eval_every": tc.eval_every}
        )
    return [k for k in tasks[0] if any(t[k] != tasks[0][k] for t in tasks[1:])]


def judge(name: str, candidate: list, baseline: list, unit: str) -> dict | None:
    """The paired rule on the seeds where both recipes have a value; prints one line."""
    pairs = [(c, b) for c, b in zip(candidate, baseline) if c is not None and b is not None]
    if len(pairs) < 2:
        print(f"{name}: fewer than 2 seeds have a value for both recipes ({len(pairs)}): no verdict")
        return None
    row = compare([c for c, _ in pairs], [b for _, b in pairs], "lower")
    lo, hi = row["t_interval"]
    mde = f" (MDE {row['mde']:.4g} {unit})" if row["verdict"] == "unresolved" else ""
    print(
        f"{name}, candidate - baseline: {row['mean']:+.4g} {unit} (median {row['median']:+.4g}, 95% "
        f"[{lo:+.4g}, {hi:+.4g}], n={row['n']}): {row['verdict']}{mde}"
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=("tiny", "mini", "small"))
    p.add_argument("--steps", type=int, help="most optimizer steps per run (default: the preset's)")
    p.add_argument("--target-bpb", type=float, help="mean bits per byte to reach (required unless --smoke)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--baseline", nargs="*", default=[], help="the baseline recipe's overrides (default: none)")
    p.add_argument("--candidate", nargs="*", default=[], help="the candidate recipe's overrides")
    p.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="2: a seed's two recipes at once")
    p.add_argument("--out", type=Path, help="run folders (default: a temporary folder)")
    p.add_argument("--results", type=Path, help="also write the result to this JSON file (the committed copy)")
    p.add_argument("--smoke", action="store_true", help="tiny preset, 4 steps, 2 seeds, a target every run reaches")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.steps, args.seeds, args.eval_every = "tiny", 4, 2, 2
        args.target_bpb = 1e9 if args.target_bpb is None else args.target_bpb
        args.candidate = args.candidate or ["lr_scale=2"]
    if args.target_bpb is None:
        p.error("--target-bpb is required (measure it first: --target-bpb 0 prints each run's final bits per byte)")
    recipes = {"baseline": tuple(args.baseline), "candidate": tuple(args.candidate)}
    changed = task_changes(args.preset, args.steps, recipes, args.eval_every)
    if changed:
        p.error(f"the recipes differ in the fixed task ({', '.join(changed)}): only the training recipe may differ")
    out = args.out or Path(tempfile.mkdtemp(prefix="speedrun-"))
    times: dict[str, list] = {name: [] for name in recipes}
    final: dict[str, list] = {name: [] for name in recipes}
    ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can deadlock
    with cf.ProcessPoolExecutor(args.jobs, ctx) as pool:
        # Every run at once, in seed order: with --jobs 2 a seed's two recipes train side by side.
        futures = {
            (k, name): pool.submit(
                run_recipe, args.preset, args.steps, sets, k, args.eval_every, out / name / f"seed{k}"
            )
            for k in range(args.seeds)
            for name, sets in recipes.items()
        }
        for (k, name), future in futures.items():
            rows = future.result()
            times[name].append(time_to_target(rows, args.target_bpb))
            final[name].append(final_bpb(rows))
            shown = "not reached" if times[name][-1] is None else f"{times[name][-1]:.1f} s"
            print(f"seed {k} {name:9s} {shown:>12s}  (final mean bits per byte {final[name][-1]:.4f})", flush=True)
    result = {
        "command": " ".join(["python benchmarks/speedrun.py", *sys.argv[1:]]),
        **provenance(),
        "preset": args.preset,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "target_bpb": args.target_bpb,
        "baseline": args.baseline,
        "candidate": args.candidate,
        "times": times,
        "final_bpb": final,
        "time_to_target": judge("seconds to the target", times["candidate"], times["baseline"], "s"),
        "final_bits_per_byte": judge("final mean bits per byte", final["candidate"], final["baseline"], "bits"),
    }
    for path in (out / "speedrun.json", args.results):
        if path is not None:
            atomic_write_bytes(path, json_bytes(result, flat_lists=True))
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
