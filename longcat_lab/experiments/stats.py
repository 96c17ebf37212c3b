"""Paired comparisons across seeds and the verdict rule of every sweep summary (docs/design.md §3.6).

Seeds are paired: seed k of every variant sees the same data order, the same validation windows and, where shapes
allow, the same initial weights, so the comparison rests on the per-seed differences d_k = variant_k - baseline_k,
which cancel most of the seed-to-seed spread. `compare` reports, over the n seeds:
- mean(d) ± SE = sd(d) / sqrt(n) (sample sd, n - 1) and median(d);
- the 95% Student-t interval mean ± t(0.975, n-1) SE, and a seeded (so repeatable) 95% percentile bootstrap
  interval of the mean, which does not lean on normality and widens when one seed dominates;
- the minimum detectable effect MDE = (t(0.975, n-1) + t(0.80, n-1)) SE: the true difference this many seeds
  would call real four times in five (two-sided 5% test, 80% power);
- TOST (two one-sided t-tests at 5%) against the metric's stated equivalence margin m: the 90% t-interval
  mean ± t(0.95, n-1) SE lies inside (-m, m);
- the seeds whose paired difference is an outlier by the robust rule of `outliers`.

Verdict rule (stated once, applied to every metric, max_hidden included):
- "better" / "worse" (by the metric's direction) when the 95% t-interval excludes 0;
- else "equivalent" when TOST passes against the margin (the claim "costs no quality" needs this);
- else "unresolved": neither a difference nor equivalence is shown; the row's MDE says how large a difference the
  seeds could have seen;
- "one seed" when n = 1 (no spread to judge by).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence

from longcat_lab._util import check_choice, check_int, is_number

# Quantiles of Student's t by degrees of freedom: two-sided 95% (t 0.975), one-sided 95% (t 0.95, TOST) and the
# 80% power term (t 0.80). Beyond 30 dof the normal values; between entries the next smaller dof (conservative).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T975.update({11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093})
_T975.update({20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 30: 2.042})
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}
_T95.update({11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.740, 18: 1.734, 19: 1.729})
_T95.update({20: 1.725, 21: 1.721, 22: 1.717, 23: 1.714, 24: 1.711, 25: 1.708, 30: 1.697})
_T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879}
_T80.update({11: 0.876, 12: 0.873, 13: 0.870, 14: 0.868, 15: 0.866, 16: 0.865, 17: 0.863, 18: 0.862, 19: 0.861})
_T80.update({20: 0.860, 21: 0.859, 22: 0.858, 23: 0.858, 24: 0.857, 25: 0.856, 30: 0.854})
_NORMAL = {"t975": 1.960, "t95": 1.645, "t80": 0.842}
_TABLES = {"t975": _T975, "t95": _T95, "t80": _T80}
DIRECTIONS = ("lower", "higher")
VERDICTS = ("better", "worse", "equivalent", "unresolved", "one seed")
RESOLVED = ("better", "worse", "equivalent")
OUTLIER_Z = 3.5  # robust z above which a value is an outlier (Iglewicz & Hoaglin's modified z-score)
BOOTSTRAP_SAMPLES = 4000


def t_quantile(which: str, dof: int) -> float:
    """`which` in {"t975", "t95", "t80"} at `dof` degrees of freedom (module tables)."""
    check_choice("which", which, tuple(_TABLES))
    if not isinstance(dof, int) or dof < 1:
        raise ValueError(f"dof={dof!r} is not allowed: it must be an integer >= 1")
    if dof > 30:
        return _NORMAL[which]
    table = _TABLES[which]
    return table[max(k for k in table if k <= dof)]


def t_critical(dof: int) -> float:
    """t(0.975, dof), the two-sided 95% critical value."""
    return t_quantile("t975", dof)


def _check_values(name: str, values: Sequence[float]) -> list[float]:
    values = [float(v) for v in values]
    if not values or not all(is_number(v) for v in values):
        raise ValueError(f"{name} must be a non-empty list of finite numbers, got {values}")
    return values


def paired(variant: Sequence[float], baseline: Sequence[float]) -> dict:
    """{"n", "mean", "median", "sd", "se", "diffs"} of the per-seed differences variant - baseline (same order)."""
    if len(variant) != len(baseline) or not variant:
        raise ValueError(f"paired values need the same non-zero count, got {len(variant)} and {len(baseline)}")
    diffs = _check_values("paired differences", [float(v) - float(b) for v, b in zip(variant, baseline)])
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "median": statistics.median(diffs), "sd": sd, "se": sd / math.sqrt(n), "diffs": diffs}


def t_interval(mean: float, se: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """mean ± t SE: the two-sided 95% interval (`level=0.95`) or the 90% one TOST uses (`level=0.90`)."""
    check_choice("level", level, (0.95, 0.90))
    if n < 2:
        return (float("nan"), float("nan"))
    half = t_quantile("t975" if level == 0.95 else "t95", n - 1) * se
    return (mean - half, mean + half)


def bootstrap_interval(diffs: Sequence[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """Percentile 95% bootstrap interval of the mean of `diffs`: `samples` resamples with replacement drawn by
    random.Random(seed), so the same input always gives the same interval."""
    diffs = _check_values("diffs", diffs)
    check_int("samples", samples, 100)
    n = len(diffs)
    if n < 2:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(samples))
    return (means[int(0.025 * samples)], means[min(samples - 1, int(math.ceil(0.975 * samples)) - 1)])


def min_detectable_effect(se: float, n: int) -> float:
    """(t(0.975, n-1) + t(0.80, n-1)) SE: the smallest true difference detected with 80% power at 5% (two-sided)."""
    if n < 2:
        return float("nan")
    return (t_quantile("t975", n - 1) + t_quantile("t80", n - 1)) * se


def equivalent(mean: float, se: float, n: int, margin: float) -> bool:
    """TOST at 5%: the 90% t-interval of the mean difference lies inside (-margin, margin)."""
    if not (is_number(margin) and margin > 0):
        raise ValueError(f"margin={margin!r} is not allowed: it must be a number > 0")
    lo, hi = t_interval(mean, se, n, 0.90)
    return n >= 2 and -margin < lo and hi < margin


def outliers(values: Sequence[float], z: float = OUTLIER_Z) -> list[int]:
    """Indices of the outliers of `values` by the modified z-score 0.6745 |x - median| / MAD > z (MAD: median
    absolute deviation). When more than half the values equal the median (MAD = 0), the mean absolute deviation
    times 1.2533 stands in for it (the usual fallback); no outliers when every value is the same or n < 3. At n = 3
    the MAD is the smaller of the two deviations from the median, so the rule flags any value more than 5.2 times
    farther out than the other: a weak rule at 3 seeds, which more seeds settle."""
    values = _check_values("values", values)
    if len(values) < 3:
        return []
    med = statistics.median(values)
    dev = [abs(v - med) for v in values]
    mad = statistics.median(dev)
    if mad > 0:
        score = [0.6745 * d / mad for d in dev]
    else:
        meanad = sum(dev) / len(dev)
        if meanad == 0:
            return []
        score = [d / (1.2533 * meanad) for d in dev]
    return [i for i, s in enumerate(score) if s > z]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of paired values (ties get their mean rank); nan when either side is constant."""
    x, y = _check_values("x", x), _check_values("y", y)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two lists of the same length >= 2, got {len(x)} and {len(y)}")

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in order[i : j + 1]:
                out[k] = (i + j) / 2 + 1
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a frequency k / n (sound at small n and at k = 0 or n)."""
    check_int("n", n, 1)
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k={k!r} is not allowed: it must be an integer between 0 and n={n}")
    z = _NORMAL["t975"]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def verdict(mean: float, se: float, n: int, direction: str = "lower", margin: float | None = None) -> str:
    """The module's rule: "better" / "worse" when the 95% t-interval excludes 0, else "equivalent" when TOST
    passes against `margin` (None: no equivalence claim is judged), else "unresolved"; "one seed" for n = 1."""
    check_choice("direction", direction, DIRECTIONS)
    if n < 2:
        return "one seed"
    lo, hi = t_interval(mean, se, n)
    if lo > 0 or hi < 0:
        improved = mean < 0 if direction == "lower" else mean > 0
        return "better" if improved else "worse"
    if margin is not None and equivalent(mean, se, n, margin):
        return "equivalent"
    return "unresolved"


def compare(
    variant: Sequence[float],
    baseline: Sequence[float],
    direction: str = "lower",
    margin: float | None = None,
    seed: int = 0,
) -> dict:
    """Everything a summary row says about one metric of one variant against the baseline (module docstring):
    paired statistics, both intervals, MDE, the margin and TOST result, the outlier seeds (indices into the
    inputs, by the paired differences) and the verdict."""
    p = paired(variant, baseline)
    n, mean, se = p["n"], p["mean"], p["se"]
    return {
        **p,
        "t_interval": list(t_interval(mean, se, n)),
        "bootstrap_interval": list(bootstrap_interval(p["diffs"], seed)),
        "mde": min_detectable_effect(se, n),
        "margin": margin,
        "equivalent": None if margin is None else equivalent(mean, se, n, margin),
        "outliers": outliers(p["diffs"]),
        "verdict": verdict(mean, se, n, direction, margin),
    }


__all__ = [
    "BOOTSTRAP_SAMPLES",
    "DIRECTIONS",
    "OUTLIER_Z",
    "RESOLVED",
    "VERDICTS",
    "bootstrap_interval",
    "compare",
    "equivalent",
    "min_detectable_effect",
    "outliers",
    "paired",
    "spearman",
    "t_critical",
    "t_interval",
    "t_quantile",
    "verdict",
    "wilson_interval",
]
