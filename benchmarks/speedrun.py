"""Speedrun: time to reach a fixed bits-per-byte target on a fixed task, over paired seeds, for a baseline recipe and
a candidate, judged by the sweep verdict rule (docs/design.md §3.6).

The task is fixed: the preset's built-in data (its domains and byte caps, data seed 0), the trainer's frozen
validation windows (`data.eval_windows`, the same for every run), bits per byte averaged over domains, evaluated
every `--eval-every` steps. A run's time to target is the trainer's `time_s` (one torch thread, evaluations
included) at the first evaluation whose mean bits per byte is at or below `--target-bpb`; a run that never gets
there within `--steps` counts as not reached. Seed k of both recipes uses train seed 1000 + k (the sweeps'
pairing); the candidate is better only when the paired 95% t-interval of (candidate - baseline) seconds excludes 0.

Recipes are sweep overrides (`--set` pairs and `lr_scale=X`, `experiments.runner.configs`): `--candidate
lr_scale=2` tries twice the preset's learning rate.

The target should be one the main job's small preset reaches today; it has to be measured first (a run of this
script with `--target-bpb 0` prints each seed's final bits per byte). Times are wall-clock on one thread: on a
shared machine they are indicative only, and the figures go to benchmarks/RESULTS.md with command, date, commit and
machine.

Run: `.venv/bin/python benchmarks/speedrun.py --preset small --target-bpb 2.3 --seeds 8 --candidate lr_scale=2`
     `.venv/bin/python benchmarks/speedrun.py --smoke` (tiny preset, 4 steps, 2 seeds: checks the machinery)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from longcat_lab.experiments.runner import SEED0, configs
from longcat_lab.experiments.stats import compare
from longcat_lab.train import train


def time_to_target(rows: list[dict], target: float) -> tuple[float | None, float | None]:
    """(seconds at the first evaluation with mean bits per byte <= target or None, the last mean bits per byte)."""
    seconds = {r["step"]: r["time_s"] for r in rows if r.get("kind") == "train"}
    last = None
    for r in rows:
        if r.get("kind") != "eval_bpb":
            continue
        last = sum(r["bits_per_byte"].values()) / len(r["bits_per_byte"])
        if last <= target:
            return seconds.get(r["step"]), last
    return None, last


def run_recipe(preset: str, steps: int, sets: tuple[str, ...], seed: int, eval_every: int, out: Path) -> list[dict]:
    mc, tc = configs(preset, steps, (*sets, f"eval_every={eval_every}", "ckpt_every=0"), SEED0 + seed)
    return train(mc, tc, out, progress=False).rows()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=("tiny", "mini", "small"))
    p.add_argument("--steps", type=int, help="most optimizer steps per run (default: the preset's)")
    p.add_argument("--target-bpb", type=float, help="mean bits per byte to reach (required unless --smoke)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--candidate", nargs="*", default=[], help="the candidate recipe's overrides")
    p.add_argument("--out", type=Path, help="run folders (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny preset, 4 steps, 2 seeds, a target every run reaches")
    args = p.parse_args()
    if args.smoke:
        args.preset, args.steps, args.seeds, args.eval_every = "tiny", 4, 2, 2
        args.target_bpb = 1e9 if args.target_bpb is None else args.target_bpb
        args.candidate = args.candidate or ["lr_scale=2"]
    if args.target_bpb is None:
        p.error("--target-bpb is required (measure it first: --target-bpb 0 prints each run's final bits per byte)")
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="speedrun-"))
    steps = args.steps
    recipes = {"baseline": (), "candidate": tuple(args.candidate)}
    times: dict[str, list] = {name: [] for name in recipes}
    for k in range(args.seeds):
        for name, sets in recipes.items():
            rows = run_recipe(args.preset, steps, sets, k, args.eval_every, out / name / f"seed{k}")
            seconds, last = time_to_target(rows, args.target_bpb)
            times[name].append(seconds)
            shown = "not reached" if seconds is None else f"{seconds:.1f} s"
            print(f"seed {k} {name:9s} {shown:>12s}  (last mean bits per byte {last:.4f})")
    paired = [(c, b) for c, b in zip(times["candidate"], times["baseline"]) if c is not None and b is not None]
    result = {"preset": args.preset, "target_bpb": args.target_bpb, "candidate": args.candidate, "times": times}
    if len(paired) >= 2:
        row = compare([c for c, _ in paired], [b for _, b in paired], "lower")
        result["comparison"] = row
        lo, hi = row["t_interval"]
        mde = f" (MDE {row['mde']:.1f} s)" if row["verdict"] == "unresolved" else ""
        print(
            f"candidate - baseline: {row['mean']:+.1f} s (median {row['median']:+.1f}, 95% [{lo:+.1f}, {hi:+.1f}], "
            f"n={row['n']}): {row['verdict']}{mde}"
        )
    else:
        print(f"fewer than 2 seeds reached the target with both recipes ({len(paired)}): no verdict")
    (out / "speedrun.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out / 'speedrun.json'}")


if __name__ == "__main__":
    main()
