"""Outlier runs of a sweep, flagged and diagnosed (docs/design.md §3.6).

A run is an outlier when its end value of a metric (validation loss by default) is an outlier among the seeds of
its own variant by the robust rule of `stats.outliers` (modified z-score over the median and MAD). One such run
can carry a whole sweep: when it is the baseline, every paired difference of that seed moves with it. The
diagnosis compares it with its paired twin (the same seed of the baseline, or of the next variant when the outlier
is the baseline): the fork step, where the two loss curves part for good, and the run's per-step metrics around
that step (loss, gradient norm, router entropy, max |last hidden|, bias spread, budget error) next to the twin's.
"""

from __future__ import annotations

import math
import statistics

from longcat_lab.experiments.stats import outliers, spearman, wilson_interval

FORK_GAP = 0.05  # nats of smoothed training loss: below the spread of a loss curve's own step-to-step noise
WINDOW = 5  # steps either side of the fork (and of the smoothing) the diagnosis averages over
AROUND = ("loss", "grad_norm", "router_entropy", "step_max_hidden", "bias_spread")
EARLY = 20  # the first steps, where the controller overshoots before it settles (docs/design.md §3.6)


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (None skipped; nan where all are None)."""
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1) : i + 1] if v is not None]
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def fork_step(curve: list[float], twin: list[float], gap: float = FORK_GAP, window: int = WINDOW) -> int | None:
    """The first step (1-based) from which the `window`-step running means of the two curves stay more than `gap`
    apart to the end of the shorter one; None when they end closer than that."""
    n = min(len(curve), len(twin))
    a, b = running_mean(curve[:n], window), running_mean(twin[:n], window)
    fork = None
    for i in range(n - 1, -1, -1):
        if not abs(a[i] - b[i]) > gap:
            break
        fork = i + 1
    return fork


def _around(values: list | None, step: int, window: int) -> float | None:
    if not values:
        return None
    part = [v for v in values[max(0, step - 1 - window) : step + window] if v is not None]
    return sum(part) / len(part) if part else None


def _budget_error(run: dict) -> list[float | None]:
    target, ffn = run.get("target_ffn_experts"), _curves(run).get("ffn_experts_per_token") or []
    return [None if target is None or v is None else abs(v - target) for v in ffn]


def _curves(run: dict | None) -> dict:
    """A run's per-step curves (`experiments.summary.CURVES`); none for a missing twin."""
    return (run or {}).get("curves") or {}


def diagnose(run: dict, twin: dict | None, window: int = WINDOW) -> dict:
    """{fork_step, around: {metric: (run's mean, twin's mean)}} for two runs' `run_metrics` (with `curves`)."""
    curves, twin_curves = _curves(run), _curves(twin)
    fork = fork_step(curves.get("loss") or [], twin_curves.get("loss") or []) if twin else None
    at = fork or 1
    around = {}
    for key in AROUND:
        around[key] = (_around(curves.get(key), at, window), _around(twin_curves.get(key), at, window))
    around["budget_error"] = (
        _around(_budget_error(run), at, window),
        _around(_budget_error(twin), at, window) if twin else None,
    )
    return {"fork_step": fork, "around": around}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def outlier_runs(results: dict[str, dict[int, dict]], baseline: str, metric: str = "val_loss") -> list[dict]:
    """Every run whose `metric` is an outlier among its variant's seeds, with its diagnosis and a one-line
    description: [{variant, seed, value, median, twin, fork_step, around, line}]."""
    order = list(results)
    found = []
    for variant, by_seed in results.items():
        seeds = sorted(s for s in by_seed if by_seed[s].get(metric) is not None)
        values = [by_seed[s][metric] for s in seeds]
        for i in outliers(values) if values else []:
            seed = seeds[i]
            twin_variant = baseline if variant != baseline else next((v for v in order if v != baseline), None)
            twin = results.get(twin_variant, {}).get(seed) if twin_variant else None
            d = diagnose(by_seed[seed], twin)
            median = statistics.median(values)
            parts = [f"{variant} seed {seed}: {metric} {values[i]:.4g} against its variant's median {median:.4g}"]
            if twin is not None:
                fork = d["fork_step"]
                twin_name = f"{twin_variant} seed {seed}"
                parts.append(f"parts from {twin_name} at step {fork}" if fork else f"never parts from {twin_name}")
                shown = [f"{k} {_fmt(a)} vs {_fmt(b)}" for k, (a, b) in d["around"].items() if (a, b) != (None, None)]
                parts.append("around it (run vs twin): " + ", ".join(shown))
            found.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "value": values[i],
                    "median": median,
                    "twin": twin_variant,
                    **d,
                    "line": "; ".join(parts),
                }
            )
    return found


def early_overshoot(run: dict, steps: int = EARLY) -> float | None:
    """The largest FFN experts per token over the first `steps` steps, minus the target: how far the controller
    overshoots towards all-FFN routing before it settles (None for a run without a target)."""
    target, ffn = run.get("target_ffn_experts"), _curves(run).get("ffn_experts_per_token") or []
    early = [v for v in ffn[:steps] if v is not None]
    return None if target is None or not early else max(early) - target


def basin_study(results: dict[str, dict[int, dict]], metric: str = "val_loss", steps: int = EARLY) -> dict:
    """Per variant (a controller mode, say): how often its runs end as outliers of `metric` among its seeds (the
    slow basin), with a 95% Wilson interval, and whether the early overshoot predicts the end value (Spearman's
    rank correlation over its runs): {variant: {runs, outliers, share, interval, overshoot_rho, per_run}}."""
    out = {}
    for variant, by_seed in results.items():
        seeds = sorted(s for s in by_seed if by_seed[s].get(metric) is not None)
        if not seeds:
            continue
        values = [by_seed[s][metric] for s in seeds]
        flagged = {seeds[i] for i in outliers(values)}
        shoot = [early_overshoot(by_seed[s], steps) for s in seeds]
        pairs = [(o, v) for o, v in zip(shoot, values) if o is not None]
        rho = spearman([o for o, _ in pairs], [v for _, v in pairs]) if len(pairs) >= 3 else None
        rho = None if rho is not None and math.isnan(rho) else rho  # a constant overshoot ranks nothing (JSON null)
        out[variant] = {
            "runs": len(seeds),
            "outliers": len(flagged),
            "share": len(flagged) / len(seeds),
            "interval": list(wilson_interval(len(flagged), len(seeds))),
            "overshoot_rho": rho,
            "per_run": [
                {"seed": s, metric: v, "early_overshoot": o, "outlier": s in flagged}
                for s, v, o in zip(seeds, values, shoot)
            ],
        }
    return out


__all__ = [
    "AROUND",
    "EARLY",
    "FORK_GAP",
    "WINDOW",
    "basin_study",
    "diagnose",
    "early_overshoot",
    "fork_step",
    "outlier_runs",
    "running_mean",
]
