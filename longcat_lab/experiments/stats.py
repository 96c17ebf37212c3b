"""Paired comparisons across seeds and the verdict rule of every sweep summary.

Seeds are paired: seed k of every variant sees the same data order (and, where shapes allow, the same initial
weights), so the comparison rests on the per-seed differences d_k = variant_k - baseline_k, which cancel most of the
seed-to-seed spread. The summary gives mean(d) ± its standard error SE = sd(d) / sqrt(n) (sample sd, n - 1).

Verdict rule (stated once, applied everywhere): with n >= 2 seeds, the difference is real when the 95% confidence
interval of the mean difference excludes 0, i.e. |mean(d)| > t(0.975, n - 1) * SE (Student's t); it is then
"better" or "worse" by the metric's direction, else "within noise". With one seed there is no spread to judge by:
"one seed".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from longcat_lab._util import check_choice, is_number

# Two-sided 95% critical values of Student's t by degrees of freedom; 1.96 beyond the table.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T975.update({12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042})
DIRECTIONS = ("lower", "higher")
VERDICTS = ("better", "worse", "within noise", "one seed")


def t_critical(dof: int) -> float:
    """t(0.975, dof); for a dof between table entries, the next smaller tabulated dof (a conservative value)."""
    if dof < 1:
        raise ValueError(f"dof={dof} is not allowed: it must be >= 1")
    known = [k for k in _T975 if k <= dof]
    return 1.96 if dof > 30 else _T975[max(known)]


def paired(variant: Sequence[float], baseline: Sequence[float]) -> dict:
    """{"n", "mean", "se", "diffs"} of the per-seed differences variant - baseline (same seed order)."""
    if len(variant) != len(baseline) or not variant:
        raise ValueError(f"paired values need the same non-zero count, got {len(variant)} and {len(baseline)}")
    diffs = [float(v) - float(b) for v, b in zip(variant, baseline)]
    if not all(is_number(d) for d in diffs):
        raise ValueError(f"paired differences must be finite numbers, got {diffs}")
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "se": se, "diffs": diffs}


def verdict(mean: float, se: float, n: int, direction: str = "lower") -> str:
    """The module's rule: "better" / "worse" when |mean| > t(0.975, n-1) * se, else "within noise" ("one seed" for
    n = 1). `direction`: whether lower or higher values of the metric are better."""
    check_choice("direction", direction, DIRECTIONS)
    if n < 2:
        return "one seed"
    if abs(mean) <= t_critical(n - 1) * se:
        return "within noise"
    improved = mean < 0 if direction == "lower" else mean > 0
    return "better" if improved else "worse"


__all__ = ["DIRECTIONS", "VERDICTS", "paired", "t_critical", "verdict"]
