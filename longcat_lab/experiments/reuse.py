"""Which finished work a sweep may reuse: `check_reusable` (a run folder is reused only for the configuration it was
made with) and `adopt_twins` (a run another sweep under the same folder already finished with the identical
configuration is copied in instead of trained again).

Training is deterministic for a given configuration on one thread, so the default configuration at seed k, which is
the baseline of most sweeps, is trained once and shared: the twin's plan.json and result.json are copied (result.json
last, atomically), and the summary names where each adopted run came from.
"""

from __future__ import annotations

import json
from pathlib import Path

from longcat_lab import checkpoint
from longcat_lab._util import atomic_write_bytes

RESULT = "result.json"
PLAN = "plan.json"
# Fields that say where a run stops or what it keeps on disk, not what it trains: a run interrupted by
# `stop_after` resumes to the planned end, so they do not bar reuse.
REUSE_IGNORES = ("train.stop_after", "train.keep_checkpoints")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differences(planned: dict, done: dict) -> list[str]:
    keys = (planned.keys() | done.keys()) - set(REUSE_IGNORES)
    return sorted(k for k in keys if planned.get(k) != done.get(k))


def _ran_with(folder: Path) -> dict | None:
    """The configs a run folder was made with: its plan.json, else its newest checkpoint's config files (a run
    started by hand); None when nothing was made there yet."""
    if (folder / PLAN).is_file():
        return json.loads((folder / PLAN).read_text())
    ckpt = checkpoint.latest(folder) if (folder / checkpoint.CHECKPOINTS).is_dir() else None
    if ckpt is not None:
        return {
            "model_config": checkpoint.read_json(ckpt / "config.json"),
            "train_config": checkpoint.read_json(ckpt / "train_config.json"),
        }
    if (folder / RESULT).is_file() or (folder / "metrics.jsonl").is_file():
        return {}  # work was done there, with a configuration nobody recorded
    return None


def check_reusable(runs: list) -> None:
    """ValueError (one line naming the folder and the differing fields) when a run folder holds work done with
    another model, train or data configuration than the one planned for it, so a sweep never reuses it."""
    for r in runs:
        folders = [(r.dir, r.model_config, r.train_config)]
        if r.half:
            folders.append((Path(r.half["dir"]), r.half["model_config"], r.half["train_config"]))
        for folder, mc, tc in folders:
            ran = _ran_with(folder)
            if ran is None:
                continue
            if not ran:
                raise ValueError(
                    f"run folder {folder} holds work with no recorded configuration: remove it or use another --out"
                )
            planned = _flat({"model": mc, "train": tc})
            done = _flat({"model": ran["model_config"], "train": ran["train_config"]})
            diff = _differences(planned, done)
            if diff:
                shown = ", ".join(f"{k} {done.get(k)!r} -> {planned.get(k)!r}" for k in diff[:4])
                more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
                raise ValueError(
                    f"run folder {folder} was made with another configuration ({shown}{more}): "
                    "remove it or use another --out"
                )


def adopt_twins(runs: list, root: Path) -> dict[str, str]:
    """For every unfinished run (growth runs excepted) with no work in its folder, copy in a finished run from
    ROOT/*/runs/*/* made with the identical configuration. Returns {"VARIANT/seedK": the twin's folder}."""
    finished: dict[str, Path] = {}
    for result in sorted(Path(root).glob(f"*/runs/*/*/{RESULT}")):
        folder = result.parent
        if (folder / PLAN).is_file():
            plan = json.loads((folder / PLAN).read_text())
            key = _key(plan["model_config"], plan["train_config"])
            finished.setdefault(key, folder)
    adopted = {}
    for r in runs:
        if r.half or (r.dir / RESULT).is_file() or _ran_with(r.dir) is not None:
            continue
        twin = finished.get(_key(r.model_config, r.train_config))
        if twin is None or twin.resolve() == r.dir.resolve():
            continue
        atomic_write_bytes(r.dir / PLAN, (twin / PLAN).read_bytes())
        atomic_write_bytes(r.dir / RESULT, (twin / RESULT).read_bytes())
        adopted[f"{r.variant}/seed{r.seed_index}"] = str(twin)
    return adopted


def _key(model_config: dict, train_config: dict) -> str:
    """A configuration as one string: nested keys sorted (plan.json is written with sorted keys, a plan in memory
    is not), the fields that do not change what a run trains left out."""
    flat = {k: v for k, v in _flat({"model": model_config, "train": train_config}).items() if k not in REUSE_IGNORES}
    return json.dumps(flat, sort_keys=True)


__all__ = ["PLAN", "RESULT", "REUSE_IGNORES", "adopt_twins", "check_reusable"]
