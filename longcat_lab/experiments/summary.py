"""What a sweep reports: `run_metrics` (one run's numbers, from its metrics.jsonl and its final model),
`summarise` (per metric and variant, the paired difference against the baseline with its verdict,
`experiments.stats`) and `format_summary` (the printed table).

Metrics (lower is better for the first five; the last three describe the run rather than rank it):
- `val_loss`: mean validation loss over domains (nats/token) at the last step;
- `bits_per_byte`: mean over domains of the trainer's last bits-per-byte evaluation;
- `budget_error`: mean |FFN experts per token - target| over the second half of training;
- `settle_step`: first step after which the 10-step running mean of FFN experts per token stays within 5% of the
  target (the run's length when it never does);
- `load_imbalance`: the most-loaded FFN expert's tokens over the least-loaded one's (the controller's report, the
  largest over layers), averaged over the last quarter of steps, leaving out steps where an expert got none;
- `max_hidden` (lower is calmer): the largest |hidden state| of any layer on the validation windows at the end
  (per layer in `max_hidden_per_layer`);
- `ffn_experts_per_token` and `grad_rms`: the last quarter's mean, and the median over the second half of the
  pre-clip gradient norm / sqrt(parameters);
- `val_loss_se` (written by the runner, not compared): the validation set's own sampling error, the standard error
  of `val_loss` over its windows (`validation_se`). Every run is scored on the same windows, so it does not enter
  the paired differences; it says how far the set's mean may sit from the domain's.
Every metric gets a verdict by the rule of `experiments.stats`. `curves` keeps the per-step series the outlier
diagnosis reads (`experiments.diagnose`): loss, grad_norm, router_entropy, step_max_hidden, bias_spread and
FFN experts per token.
"""

from __future__ import annotations

import math
import statistics

import torch

from longcat_lab.data import eval_windows
from longcat_lab.experiments.diagnose import basin_study, outlier_runs
from longcat_lab.experiments.stats import compare

CURVES = ("loss", "grad_norm", "router_entropy", "step_max_hidden", "bias_spread", "ffn_experts_per_token")


def _tail(values: list[float], share: float) -> list[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return values[int(len(values) * (1 - share)) :] if values else []


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(v):
    return float(f"{v:.5g}") if isinstance(v, float) and math.isfinite(v) else v


def settle_step(series: list[float], target: float, window: int = 10, tolerance: float = 0.05) -> int:
    """First step (1-based) after which the `window`-step running mean stays within tolerance * target."""
    means = [
        sum(series[max(0, i - window + 1) : i + 1]) / len(series[max(0, i - window + 1) : i + 1])
        for i in range(len(series))
    ]
    settled = len(series)
    for i in range(len(means) - 1, -1, -1):
        if abs(means[i] - target) > tolerance * max(target, 1e-9):
            break
        settled = i + 1
    return settled


@torch.no_grad()
def max_hidden(model, dataset, seq_len: int, windows: int = 4) -> list[float]:
    """The largest |hidden state| after each layer on the validation windows (forward hooks, eval mode)."""
    peaks = [0.0] * len(model.layers)
    hooks = [
        layer.register_forward_hook(
            lambda _m, _i, out, k=k: peaks.__setitem__(
                k, max(peaks[k], float((out[0] if isinstance(out, tuple) else out).abs().max()))
            )
        )
        for k, layer in enumerate(model.layers)
    ]
    was_training = model.training
    model.eval()
    try:
        for stream in dataset.val.values():
            x, _ = eval_windows(stream, seq_len, windows)
            model(x.to(model.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return peaks


@torch.no_grad()
def validation_se(model, dataset, seq_len: int, windows: int) -> float:
    """Standard error of the mean-over-domains validation loss from its windows' spread: sqrt(sum_d s_d^2 / n_d) / D
    with s_d the sample sd of domain d's per-window losses over its n_d windows."""
    was_training = model.training
    model.eval()
    var = 0.0
    try:
        for stream in dataset.val.values():
            x, y = eval_windows(stream, seq_len, windows)
            logits = model(x.to(model.device)).logits.float()
            per = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y.to(model.device), reduction="none")
            losses = per.mean(dim=1).tolist()
            var += statistics.variance(losses) / len(losses) if len(losses) > 1 else float("nan")
    finally:
        model.train(was_training)
    return math.sqrt(var) / len(dataset.val)


def mean_validation_se(results: dict[str, dict[int, dict]]) -> float | None:
    """The validation set's own sampling error (`validation_se`), averaged over a sweep's runs."""
    return _mean([m["val_loss_se"] for by in results.values() for m in by.values() if m.get("val_loss_se") is not None])


def run_metrics(rows: list[dict], hidden_peaks: list[float] | None = None) -> dict:
    """The metrics of one finished run from its metrics rows (module docstring)."""
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    bpb = [r for r in rows if r.get("kind") == "eval_bpb"]
    start = next((r for r in rows if r.get("kind") == "start"), {})
    ffn = [r.get("ffn_experts_per_token") for r in train]
    target = next((r.get("target_ffn_experts") for r in train if r.get("target_ffn_experts") is not None), None)
    out: dict = {
        "steps": train[-1]["step"] if train else 0,
        "val_loss": evals[-1]["val_loss_mean"] if evals else None,
        "val_loss_per_domain": evals[-1]["val_loss"] if evals else None,
        "bits_per_byte": _mean(list(bpb[-1]["bits_per_byte"].values())) if bpb else None,
        "ffn_experts_per_token": _mean(_tail(ffn, 0.25)),
        "target_ffn_experts": target,
        "load_imbalance": _mean(_tail([r.get("load_imbalance") for r in train], 0.25)),
        "curves": {k: [_round(r.get(k)) for r in train] for k in CURVES},
    }
    if target is not None and all(v is not None for v in ffn) and ffn:
        out["budget_error"] = _mean([abs(v - target) for v in _tail(ffn, 0.5)])
        # As an optimizer step: a grown run's rows start where its half-depth run stopped.
        out["settle_step"] = train[settle_step(ffn, target) - 1]["step"]
    n_params = start.get("num_params")
    norms = _tail([r.get("grad_norm") for r in train], 0.5)
    if n_params and norms:
        out["grad_rms"] = statistics.median(norms) / math.sqrt(n_params)
    if hidden_peaks is not None:
        out["max_hidden"] = max(hidden_peaks)
        out["max_hidden_per_layer"] = hidden_peaks
    return out


def summarise(
    runs: dict[str, dict[int, dict]], baseline: str, metrics: tuple[str, ...], directions: dict, margin=None
) -> list:
    """One row per metric and non-baseline variant, over the seeds both have a value for: `stats.compare`'s
    fields plus {metric, variant, baseline, seeds, variant_mean, baseline_mean}; `outliers` there are seed
    numbers. `margin(metric, baseline_mean)` gives the equivalence margin (None: no equivalence verdict)."""
    rows = []
    for metric in metrics:
        for variant, by_seed in runs.items():
            if variant == baseline:
                continue
            seeds = sorted(
                s
                for s in by_seed
                if runs[baseline].get(s, {}).get(metric) is not None and by_seed[s].get(metric) is not None
            )
            if not seeds:
                continue
            v = [by_seed[s][metric] for s in seeds]
            b = [runs[baseline][s][metric] for s in seeds]
            b_mean = sum(b) / len(b)
            m = margin(metric, b_mean) if margin else None
            row = compare(v, b, directions.get(metric, "lower"), m)
            row["outliers"] = [seeds[i] for i in row["outliers"]]
            rows.append(
                {
                    "metric": metric,
                    "variant": variant,
                    "baseline": baseline,
                    "seeds": seeds,
                    **row,
                    "variant_mean": sum(v) / len(v),
                    "baseline_mean": b_mean,
                }
            )
    return rows


def restate(summary: dict, metrics: tuple[str, ...] | None = None, directions: dict | None = None, margin=None) -> dict:
    """A stored summary (a `results/NAME.json`, maybe written under an older rule) with its rows and outlier runs
    recomputed from its per-run values by today's rule; everything else is kept as it was measured."""
    # In the sweep's own variant order (JSON sorts keys): an outlier baseline run's twin is the next variant.
    order = summary.get("variant_order") or list(summary["runs"])
    runs = {v: {int(k): m for k, m in summary["runs"][v].items()} for v in order}
    metrics = metrics or tuple(dict.fromkeys(r["metric"] for r in summary["rows"]))
    rows = summarise(runs, summary["baseline"], metrics, directions or {}, margin)
    for r in rows:  # JSON keys are strings; keep the seed numbers as they are in summary["runs"]
        r["seeds"] = [str(s) for s in r["seeds"]]
        r["outliers"] = [str(s) for s in r["outliers"]]
    flagged = outlier_runs(runs, summary["baseline"])
    return {**summary, "rows": rows, "outlier_runs": flagged, "basin": basin_study(runs)}


def headline_metric(summary: dict) -> str:
    """The metric a sweep is read by: budget error for the controller sweeps, max hidden for the z-loss, else the
    validation loss."""
    metrics = [r["metric"] for r in summary["rows"]]
    return next((m for m in ("budget_error", "max_hidden") if m in metrics), "val_loss")


def format_summary(summary: dict) -> str:
    """The compute table and the paired-difference table of a sweep summary."""
    lines = [
        f"sweep {summary['sweep']!r}: {summary['seeds']} paired seeds x {len(summary['compute'])} variants, "
        f"{summary['steps']} steps each (preset {summary['preset']})",
        "compute per variant (activated params, training FLOPs per token, tokens seen, FFN experts per token "
        "target / measured):",
    ]
    for v in summary.get("variant_order", summary["compute"]):
        c = summary["compute"][v]
        note = "  (compute is the variable)" if c.get("varies") else ""
        target, got = c.get("target_ffn_experts"), c.get("measured_ffn_experts")
        ffn = f"{'-' if target is None else f'{target:.3g}'} / {'-' if got is None else f'{got:.3g}'}"
        lines.append(
            f"  {v:20s} {c['activated_params']:>12,.0f} {c['flops_per_token']:>14,.0f} {c['tokens_seen']:>10,d} "
            f"{ffn:>13s}{note}"
        )
    for line in summary.get("compute_drift", []):
        lines.append(f"  compute drift: {line}")
    lines.append(
        f"paired difference variant - {summary['baseline']} (mean ± s.e., median, 95% t-interval; verdict: "
        "better/worse when the interval excludes 0, equivalent when TOST passes at the margin, else unresolved "
        "with the minimum detectable effect):"
    )
    lines.append(
        f"  {'metric':22s} {'variant':20s} {'n':>3s} {'baseline':>10s} {'variant':>10s} {'difference':>20s} "
        f"{'median':>10s} {'95% interval':>22s} {'margin':>8s} verdict"
    )
    for r in summary["rows"]:
        se = "-" if math.isnan(r["se"]) else f"{r['se']:.2g}"
        lo, hi = r.get("t_interval", [float("nan")] * 2)
        margin = "-" if r.get("margin") is None else f"{r['margin']:.3g}"
        verdict = r["verdict"]
        if verdict == "unresolved":
            verdict += f" (MDE {r['mde']:.3g})"
        if r.get("outliers"):
            verdict += f"; outlier seeds {r['outliers']}"
        lines.append(
            f"  {r['metric']:22s} {r['variant']:20s} {r['n']:>3d} {r['baseline_mean']:>10.4g} "
            f"{r['variant_mean']:>10.4g} {r['mean']:>+11.4g} ± {se:<6s} {r.get('median', r['mean']):>+10.3g} "
            f"[{lo:+.3g}, {hi:+.3g}]".ljust(22)
            + f" {margin:>8s} {verdict}"
        )
    if summary.get("val_loss_se") is not None:
        loss_mde = [r["mde"] for r in summary["rows"] if r["metric"] == "val_loss" and math.isfinite(r["mde"])]
        lines.append(
            f"validation set's own sampling error (s.e. of val_loss over its windows, mean over runs): "
            f"{summary['val_loss_se']:.3g} nats"
            + (f"; the smallest val_loss MDE above: {min(loss_mde):.3g}" if loss_mde else "")
        )
    for d in summary.get("outlier_runs", []):
        lines.append(f"  outlier run: {d['line']}")
    if summary.get("basin"):
        lines.append(
            "outlier runs per variant (end val_loss, median/MAD rule; 95% Wilson interval; Spearman rho of the "
            "early overshoot of FFN experts per token against the end val_loss):"
        )
        for v, b in summary["basin"].items():
            rho = "-" if b["overshoot_rho"] is None else f"{b['overshoot_rho']:+.2f}"
            lo, hi = b["interval"]
            lines.append(f"  {v:20s} {b['outliers']}/{b['runs']} [{lo:.2f}, {hi:.2f}]  rho {rho}")
    return "\n".join(lines)


__all__ = [
    "CURVES",
    "format_summary",
    "headline_metric",
    "max_hidden",
    "mean_validation_se",
    "validation_se",
    "restate",
    "run_metrics",
    "settle_step",
    "summarise",
]
