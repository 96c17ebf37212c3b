"""What a training run reports: the metrics row of each step, throughput and MFU, memory, alerts, and the
`metrics.jsonl` file they go to (`Telemetry` writes it, `read_metrics` reads it back), and the progress bar
(`ProgressBar`).

`run_dir/metrics.jsonl` gets one JSON object per line (non-finite floats written as null):
- `kind="train"`, one per optimizer step: step, stage, loss (LM + aux), lm_loss, balance_loss, hidden_z_loss,
  router_z_loss, lr, grad_norm, tokens, tokens_per_s, mfu (against a matmul probe measured at start),
  ffn_experts_per_token (mean over layers) and ffn_experts_per_token_per_layer, load_imbalance (max/min FFN-expert
  load, worst layer; None when an expert got no token) and its per-layer list, target_ffn_experts,
  controller_error, bias_spread, router_entropy and step_max_hidden (`metrics.step_routing_stats`), R_g (every
  `rg_every` steps, else None) with router_cosine, dead/hot experts, memory_gb, skipped / skipped_total, alerts
  (this step) / alert_counts (so far), sdc (None or the check's result);
- `kind="eval"`: step, val_loss {domain: loss}, val_loss_mean;
- `kind="start"` when a run starts or resumes: parameters, probe FLOP/s, data summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from longcat_lab._util import atomic_write_bytes, is_number
from longcat_lab.model import accounting
from longcat_lab.model.config import ModelConfig
from longcat_lab.train.config import TrainConfig
from longcat_lab.train.step import StepResult

log = logging.getLogger(__name__)


# Measurements ----------------------------------------------------------------------------------------------------
def measure_matmul_flops(
    device: torch.device | str = "cpu", n: int = 512, seconds: float = 0.2, dtype: torch.dtype = torch.float32
) -> float:
    """FLOP/s of repeated n x n matmuls on `device`: the probe MFU is measured against (a datasheet peak is
    meaningless on a shared CPU; this is what the same machine reaches on the easiest possible kernel)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        for _ in range(4):
            a @ b
        reps += 4
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * reps / elapsed


def memory_in_use(device: torch.device) -> tuple[float, float]:
    """(bytes in use, bytes the device has): CUDA allocator peak / total, or this process's RSS / physical RAM."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), float(
            torch.cuda.get_device_properties(device).total_memory
        )
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        import resource

        rss, total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0
    return float(rss), float(total)


# Alerts ----------------------------------------------------------------------------------------------------------
class _Alerts:
    """Running means of loss and throughput, and the checks against the configured thresholds."""

    WARMUP = 10  # steps before the running means are trusted

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.loss_ema: float | None = None
        self.tps_ema: float | None = None
        self.seen = 0
        self.counts = {"loss_spike": 0, "throughput_drop": 0, "memory": 0, "skipped_step": 0, "sdc_mismatch": 0}

    def check(self, loss: float | None, tps: float, mem_frac: float) -> list[str]:
        out = []
        warm = self.seen >= self.WARMUP
        if loss is not None and self.loss_ema is not None and warm and loss > self.cfg.alert_loss_spike * self.loss_ema:
            out.append("loss_spike")
        if self.tps_ema is not None and warm and tps < self.cfg.alert_throughput_drop * self.tps_ema:
            out.append("throughput_drop")
        if mem_frac > self.cfg.alert_memory_fraction:
            out.append("memory")
        if loss is not None:
            self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        self.tps_ema = tps if self.tps_ema is None else 0.9 * self.tps_ema + 0.1 * tps
        self.seen += 1
        for a in out:
            self.counts[a] += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"loss_ema": self.loss_ema, "tps_ema": self.tps_ema, "seen": self.seen, "counts": dict(self.counts)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        """The saved state (a checkpoint's "alerts" entry), its types checked: a ValueError naming the key."""
        if not isinstance(s, dict) or not isinstance(s.get("counts"), dict):
            raise ValueError("alerts state must be a dict with a 'counts' dict")
        for key in ("loss_ema", "tps_ema"):
            if s.get(key) is not None and not is_number(s[key]):
                raise ValueError(f"alerts.{key}={s.get(key)!r} is not allowed: it must be a number or None")
        for key, v in (("seen", s.get("seen")), *((f"counts.{k}", n) for k, n in s["counts"].items())):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"alerts.{key}={v!r} is not allowed: it must be an integer >= 0")
        self.loss_ema, self.tps_ema, self.seen = s.get("loss_ema"), s.get("tps_ema"), s["seen"]
        self.counts.update(s["counts"])


# The metrics file ------------------------------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(v: Any) -> Any:
    """Non-finite floats become None so every line is strict JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def to_json(value: Any, sort_keys: bool = False) -> str:
    """One line of JSON for `value` (paths as text, tensors as lists)."""
    return json.dumps(value, default=_json_default, sort_keys=sort_keys)


class Telemetry:
    """One run's reporting: turns each `StepResult` into its metrics row (throughput, MFU, memory, alerts), appends
    rows to `path` and hands each to `callback`. The alert state is part of a checkpoint (`alerts.state_dict`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_config: ModelConfig,
        device: torch.device,
        path: Path,
        callback: Callable[[dict[str, Any]], Any] | None = None,
    ):
        self.cfg, self.mc, self.device, self.path, self.callback = cfg, model_config, device, path, callback
        self.alerts = _Alerts(cfg)
        self.peak_flops = cfg.peak_flops
        self.t_start = time.perf_counter()

    def start(self, row: dict[str, Any]) -> None:
        """Measure the matmul probe unless `peak_flops` is configured, restart the clock, write the start row."""
        self.peak_flops = self.cfg.peak_flops or measure_matmul_flops(self.device)
        self.t_start = time.perf_counter()
        self.write({"kind": "start", **row, "threads": torch.get_num_threads(), "peak_flops": self.peak_flops})

    def write(self, row: dict[str, Any]) -> None:
        row = _clean(row)
        with open(self.path, "a") as f:
            f.write(to_json(row) + "\n")
        if self.callback is not None:
            self.callback(row)

    def write_eval(self, step: int, val_loss: dict[str, float]) -> None:
        """The `kind="eval"` row: the validation loss per domain and its mean."""
        self.write(
            {
                "kind": "eval",
                "step": step,
                "val_loss": val_loss,
                "val_loss_mean": sum(val_loss.values()) / len(val_loss),
            }
        )

    def truncate(self, upto: int) -> None:
        """On resume: keep the rows of steps <= `upto`, so steps that are redone are not logged twice. A damaged
        line (not a JSON object with an integer step) is dropped with a warning naming the file and line, and the
        file as it was is kept beside it as `metrics.jsonl.damaged`, so nothing is lost. A half-written last line
        (a crash while writing it) is dropped in silence."""
        if not self.path.is_file():
            return
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        keep, damaged = [], []
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            row, why = parse_line(line)
            if row is not None and (step := row.get("step", 0)) is not None and _is_int(step):
                if step <= upto:
                    keep.append(line)
            elif n != len(lines) - 1 or why == "":  # the last piece has no newline: half-written by a crash
                damaged.append(f"line {n + 1} ({why or 'no integer step'})")
        if damaged:
            backup = self.path.with_name(self.path.name + ".damaged")
            atomic_write_bytes(backup, raw)
            log.warning(
                "%s: skipped %d damaged line(s): %s; the file as it was is kept in %s",
                self.path,
                len(damaged),
                ", ".join(damaged[:5]),
                backup.name,
            )
        atomic_write_bytes(self.path, b"".join(ln + b"\n" for ln in keep))

    def row(self, r: StepResult) -> dict[str, Any]:
        """The `kind="train"` row of one step; updates the alert state and warns on the 1st, 10th, 100th ...
        alert of each kind."""
        mc, report = self.mc, r.controller
        stage = self.cfg.stages[r.stage_index]
        tps = r.tokens / r.seconds
        ffn_mean = report.get("ffn_experts_per_token_mean")
        k = None if ffn_mean is None else min(max(ffn_mean, mc.min_ffn_experts), mc.max_ffn_experts)
        mfu = tps * accounting.flops_per_token(mc, stage.seq_len, k) / self.peak_flops
        mem, mem_total = memory_in_use(self.device)
        loss = r.losses["loss"]
        alerts = self.alerts.check(None if r.skipped else loss, tps, mem / mem_total if mem_total else 0.0)
        for a in alerts:
            n = self.alerts.counts[a]
            if n == 10 ** round(math.log10(n)):  # the 1st, 10th, 100th ...: a warning, not a flood
                log.warning(
                    "alert at step %d: %s (loss %.4g, %.0f tokens/s, %.2f GB); %d so far, every one is "
                    "counted in metrics.jsonl",
                    r.step,
                    a,
                    loss,
                    tps,
                    mem / 1e9,
                    n,
                )
        if r.sdc is not None and not r.sdc["match"]:
            self.alerts.counts["sdc_mismatch"] += 1
            alerts.append("sdc_mismatch")
        if r.skipped:
            self.alerts.counts["skipped_step"] += 1
            alerts.append("skipped_step")
        imbalance = report.get("load_imbalance") or []
        return {
            "kind": "train",
            "step": r.step,
            "stage": stage.name,
            "stage_index": r.stage_index,
            **r.losses,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens": r.tokens,
            "tokens_seen": r.tokens_seen,
            "tokens_per_s": tps,
            "mfu": mfu,
            "ffn_experts_per_token": ffn_mean,
            "ffn_experts_per_token_per_layer": report.get("ffn_experts_per_token"),
            "load_imbalance": (None if not imbalance or any(v is None for v in imbalance) else max(imbalance)),
            "load_imbalance_per_layer": imbalance or None,
            "target_ffn_experts": report.get("target_ffn_experts"),
            "controller_error": report.get("controller_error"),
            "controller_error_per_layer": report.get("controller_error_per_layer"),
            "bias_spread": report.get("bias_spread"),
            "bias_update_rate": report.get("update_rate"),
            "router_entropy": (r.routing_stats or {}).get("router_entropy"),
            "step_max_hidden": (r.routing_stats or {}).get("step_max_hidden"),
            "R_g": r.rg,
            "router_cosine": r.router_cosine,
            "dead_experts": sum(r.health["dead_count"]) if r.health else None,
            "hot_experts": sum(r.health["hot_count"]) if r.health else None,
            "memory_gb": mem / 1e9,
            "skipped": r.skipped,
            "skipped_total": r.skipped_total,
            "alerts": alerts,
            "alert_counts": dict(self.alerts.counts),
            "sdc": r.sdc,
            "time_s": time.perf_counter() - self.t_start,
        }


class ProgressBar:
    """A run's tqdm bar from step `initial` to `total`, showing the latest loss, FFN experts per token and LR
    (`enabled=False`: drawn nowhere). A context manager: the bar closes on the way out."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)

    def update(self, row: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{row['loss']:.3f}" if row["loss"] is not None else "nan",
            ffn=f"{row['ffn_experts_per_token'] or 0:.2f}",
            lr=f"{row['lr']:.2e}",
        )

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_line(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the row, "") for one metrics line, or (None, why it is not a row): bad UTF-8, not JSON, not an object."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except (ValueError, RecursionError):  # RecursionError: hostile nesting; ValueError: bad JSON, huge ints
        return None, "not JSON"
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not an object"
    return row, ""


# Fields that readers of the rows compute with: numbers, or null for a non-finite float.
_NUMBERS = ("loss", "lm_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "ffn_experts_per_token", "val_loss_mean")


def _is_number_or_null(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _row_problem(row: dict[str, Any]) -> str:
    """Why a parsed row is no metrics row ("" if it is one): a field its readers use has the wrong type."""
    if not isinstance(row.get("kind", ""), str):
        return "field 'kind' is not a string"
    if "step" in row and not (_is_int(row["step"]) and row["step"] >= 0):
        return "field 'step' is not an integer >= 0"
    if row.get("kind") in ("train", "eval") and "step" not in row:
        return "no field 'step'"
    wrong = [name for name in _NUMBERS if not _is_number_or_null(row.get(name))]
    losses = {} if row.get("val_loss") is None else row["val_loss"]
    if not isinstance(losses, dict) or not all(_is_number_or_null(v) for v in losses.values()):
        wrong.append("val_loss")
    return f"field {wrong[0]!r} is not a number" if wrong else ""


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The rows of a run's `metrics.jsonl` (a run folder or the file itself), optionally only those of one kind
    ("train", "eval", "start"). A last line that does not parse is skipped, since a trainer may be writing it right
    now; a damaged line anywhere else (not a JSON object, or a field such as step or loss of the wrong type) is
    skipped with a warning naming the file, the line and the field; a missing file or a file with no rows is a
    ValueError that says so."""
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        where = (
            f"run folder {str(path)!r} has no metrics.jsonl yet" if path.is_dir() else f"{str(path)!r} does not exist"
        )
        raise ValueError(
            f"path={str(path)!r} is not allowed: {where}; expected a run folder written by "
            "longcat_lab.train (or its metrics.jsonl)"
        )
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ValueError(f"{file}: cannot be read ({err.strerror or type(err).__name__})") from None
    lines = [(n, ln) for n, ln in enumerate(raw.split(b"\n")) if ln.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        row, why = parse_line(line)
        if row is not None and (why := _row_problem(row)):
            row = None
        if row is None:
            if i < len(lines) - 1 or raw.endswith(b"\n"):  # a complete line, so not one being written now
                warnings.warn(f"{file}: line {n + 1} skipped: {why}", stacklevel=2)
            continue
        rows.append(row)
    if not rows:
        raise ValueError(f"path={str(path)!r} holds no metrics rows yet: the run has not logged a step")
    return [r for r in rows if kind is None or r.get("kind") == kind]


__all__ = ["Telemetry", "ProgressBar", "read_metrics", "parse_line", "measure_matmul_flops", "memory_in_use", "to_json"]
