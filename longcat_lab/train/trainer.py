"""The trainer: multi-stage AdamW training on the built-in data, with the budget controller, auxiliary losses,
telemetry, checkpoints that resume bit for bit, skipped non-finite steps and a deterministic re-run (SDC) check.

Public API (other modules and the notebooks build on these names):
- `TrainConfig` (with nested `StageConfig` list, `data: DataConfig`, `controller: ControllerConfig`,
  `losses: LossConfig`) and `train_preset(name)` for "tiny", "small", "base";
- `train(model_config, train_config, out_dir, resume=False, progress=True, callback=None) -> TrainResult`;
  `callback(row)` receives every metrics row as it is written (live plots: `LivePlot`);
- `apply_overrides(model_config, train_config, ["FIELD=VALUE", ...])`: the CLI's `--set`, resolving a flat field
  name across ModelConfig, TrainConfig, ControllerConfig, LossConfig and DataConfig (or `section.field`);
- `TrainResult` (run_dir, model, tokenizer, dataset, step, val_loss, checkpoint, counters; `.rows(kind)`),
  `read_rows(run_dir, kind)`, `TrainingError`;
- `evaluate(model, dataset, ...)`, `lr_at(stages, step)`, `sample_text(...)`, `measure_matmul_flops(...)`;
- plotly figures `loss_curves(rows)`, `schedule_figure(train_config)`, `baseline_figure(val_loss, baselines)`, and
  `LivePlot(figures, every)`, a callback that redraws figures in a notebook while training runs.

Resume: `resume=True` continues from the newest checkpoint of `out_dir` (a fresh start when there is none) and
logs exactly the losses of an uninterrupted run; it refuses a configuration that differs from the checkpoint's,
except for fields that only change logging and saving (`RESUME_FREE_FIELDS`). A finished run trains nothing.

`out_dir/metrics.jsonl` gets one JSON object per line:
- `kind="train"`, one per optimizer step: step, stage, loss (LM + aux), lm_loss, balance_loss, hidden_z_loss,
  router_z_loss, lr, grad_norm, tokens, tokens_per_s, mfu (against a matmul probe measured at start),
  ffn_experts_per_token (mean over layers) and ffn_experts_per_token_per_layer, load_imbalance (max/min FFN-expert
  load, worst layer; None when an expert got no token) and its per-layer list, target_ffn_experts,
  controller_error, bias_spread, R_g (every `rg_every` steps, else None) with router_cosine, dead/hot experts,
  memory_gb, skipped / skipped_total, alerts (this step) / alert_counts (so far), sdc (None or the check's result);
- `kind="eval"`: step, val_loss {domain: loss}, val_loss_mean;
- `kind="start"` when a run starts or resumes: parameters, probe FLOP/s, data summary.

Paper references: AdamW eps (docs/design.md §4), hidden z-loss and the balance loss (docs/design.md §3-4), multi-stage data (docs/design.md §4 "Data"),
determinism and SDC checks (docs/design.md §4), growth init and width transfer (`longcat_lab.growth`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from longcat_lab.perf import accounting

from longcat_lab.train import checkpoint

from longcat_lab.train import growth

from longcat_lab.train import metrics
from longcat_lab.model.config import ModelConfig, from_known_fields, is_number
from longcat_lab.train.control import BiasController, ControllerConfig
from longcat_lab.data.data import DOMAINS, DataConfig, Dataset, MixtureSampler, atomic_write_bytes, check_mixture, eval_windows, \
    load_dataset
from longcat_lab.train.losses import LOSS_KEYS, LossConfig, aux_losses
from longcat_lab.train.metrics import read_rows  # re-exported: train.read_rows is public
from longcat_lab.model.model import LongCatLM

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue (too many non-finite steps, an incompatible resume); the message says why."""


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}")


# Configuration ---------------------------------------------------------------------------------------------------
@dataclass
class StageConfig:
    """One training stage: its length, LR (linear warmup from the previous stage's final LR, then cosine down to
    end_lr_ratio * lr), sequence length and data mixture (docs/design.md §4: stage 2 moves the mixture toward reasoning)."""

    name: str = "general"
    steps: int = 100
    lr: float = 3e-3
    warmup: int = 10
    seq_len: int = 128
    mixture: dict[str, float] = field(default_factory=lambda: {"shakespeare": 0.45, "python": 0.4, "reasoning": 0.15})
    end_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        p = f"stage {self.name!r}: "
        _check(p + "steps", self.steps, isinstance(self.steps, int) and not isinstance(self.steps, bool)
               and self.steps >= 1, "a positive integer")
        _check(p + "lr", self.lr, is_number(self.lr) and self.lr > 0, "a finite number > 0")
        _check(p + "warmup", self.warmup, isinstance(self.warmup, int) and not isinstance(self.warmup, bool)
               and 0 <= self.warmup <= self.steps, f"an integer in [0, steps={self.steps}]")
        _check(p + "seq_len", self.seq_len, isinstance(self.seq_len, int) and not isinstance(self.seq_len, bool)
               and self.seq_len >= 2, "an integer >= 2")
        _check(p + "end_lr_ratio", self.end_lr_ratio, is_number(self.end_lr_ratio) and 0 <= self.end_lr_ratio <= 1,
               "a number in [0, 1]")
        self.mixture = dict(self.mixture)
        check_mixture(self.mixture, DOMAINS, p + "mixture")


def default_stages(steps: int, lr: float, seq_len: int) -> list[StageConfig]:
    """Two stages as LongCat's pre-training (docs/design.md §4 "Data"): 85% general-heavy, then 15% where code and reasoning
    rise to 70% of the mixture at a lower, decaying LR (an annealing phase)."""
    s2 = max(1, round(0.15 * steps))
    s1 = steps - s2
    if s1 < 1:
        raise ValueError(f"steps={steps} is not allowed: two stages need at least 2 steps")
    return [
        StageConfig("general", s1, lr, max(1, min(s1, round(0.05 * steps))), seq_len,
                    {"shakespeare": 0.45, "python": 0.4, "reasoning": 0.15}, end_lr_ratio=0.3),
        StageConfig("reasoning", s2, 0.3 * lr, 0, seq_len,
                    {"shakespeare": 0.3, "python": 0.35, "reasoning": 0.35}, end_lr_ratio=1 / 3),
    ]


@dataclass
class TrainConfig:
    """How a model is trained. Scalar fields (here and in `data`, `controller`, `losses`) are reachable by name
    through `--set FIELD=VALUE`; stages are set from Python (or scaled by `--steps`)."""

    # The small preset's schedule (`train_preset` holds the others).
    stages: list[StageConfig] = field(default_factory=lambda: default_stages(400, 3e-3, 128))
    # Sequences per micro-batch, and micro-batches per optimizer step (the controller sees all of them together).
    batch_size: int = 16
    grad_accum: int = 1
    # Seeds the model init and the data sampler; the same seed and config give the same run, bit for bit, on CPU.
    seed: int = 1234
    # Decoupled weight decay on matrices only (norm weights are not decayed).
    weight_decay: float = 0.1
    # The paper's betas (0.9, 0.95).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    # The paper's eps (docs/design.md §4): loss degrades once eps nears the gradient RMS, which shrinks as models grow, so eps
    # sits many orders below it. At our sizes gradient RMS is ~1e-4..1e-6, far above 1e-16.
    adam_eps: float = 1e-16
    # Global gradient-norm clip (pre-clip norm is logged).
    grad_clip: float = 1.0
    # bf16 autocast for forward and backward (weights and optimizer stay fp32); off on CPU by default.
    bf16: bool = False
    # "auto" picks CUDA when present, else CPU.
    device: str = "auto"
    # torch threads for this run (0 = leave torch's default); results depend on it in the last bits.
    num_threads: int = 0
    # torch.use_deterministic_algorithms for GPU runs (CPU kernels we use are deterministic already).
    deterministic: bool = False
    # Evaluate every this many steps (and always at the last step) on `eval_windows` windows per domain of
    # `eval_seq_len` tokens (0 = the first stage's seq_len).
    eval_every: int = 50
    eval_windows: int = 16
    eval_seq_len: int = 0
    # Checkpoint every this many steps (and always at the last step); keep the newest `keep_checkpoints`.
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    # Stop after this many steps of the schedule (with a checkpoint), as if interrupted; 0 = run to the end.
    stop_after: int = 0
    # R_g (docs/design.md §3) costs about one extra backward, so it is measured every this many steps (0 = never).
    rg_every: int = 10
    # Re-run a step from the same state every this many steps and compare loss and gradients bit for bit (0 = off).
    sdc_check_every: int = 0
    # Non-finite loss or gradient: skip the step; this many in a row stop training.
    max_consecutive_skips: int = 5
    # Telemetry alerts (logged as warnings and counted): loss above this factor times its running mean, throughput
    # below this fraction of its running mean, memory above this fraction of the device's total.
    alert_loss_spike: float = 1.5
    alert_throughput_drop: float = 0.5
    alert_memory_fraction: float = 0.9
    # Model FLOP/s that MFU divides by; 0 = measure a matmul probe on this device at start.
    peak_flops: float = 0.0
    # Hyperparameter transfer (docs/design.md §4): the width the init std and LRs were tuned at; 0 = no transfer.
    proxy_hidden_size: int = 0
    # Growth init (docs/design.md §4): start from this checkpoint (or run folder), stacked to this model's depth.
    init_from: str = ""
    # With init_from: continue the source run's step counter, LR schedule and data position (fresh optimizer).
    init_keep_state: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    losses: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise ValueError(f"stages={self.stages!r} is not allowed: it must be a non-empty list of StageConfig")
        self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
        for name in ("batch_size", "grad_accum", "eval_windows", "keep_checkpoints", "max_consecutive_skips"):
            v = getattr(self, name)
            _check(name, v, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
        for name in ("seed", "num_threads", "eval_every", "eval_seq_len", "ckpt_every", "stop_after", "rg_every",
                     "sdc_check_every", "proxy_hidden_size"):
            v = getattr(self, name)
            _check(name, v, isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
        for name in ("weight_decay", "peak_flops"):
            v = getattr(self, name)
            _check(name, v, is_number(v) and v >= 0, "a finite number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            _check(name, v, is_number(v) and 0 <= v < 1, "a number in [0, 1)")
        _check("adam_eps", self.adam_eps, is_number(self.adam_eps) and self.adam_eps > 0, "a finite number > 0")
        _check("grad_clip", self.grad_clip, is_number(self.grad_clip) and self.grad_clip > 0, "a finite number > 0")
        _check("alert_loss_spike", self.alert_loss_spike, is_number(self.alert_loss_spike)
               and self.alert_loss_spike > 1, "a number > 1")
        for name in ("alert_throughput_drop", "alert_memory_fraction"):
            v = getattr(self, name)
            _check(name, v, is_number(v) and 0 < v <= 1, "a number in (0, 1]")
        _check("device", self.device, isinstance(self.device, str) and (
            self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda")), "'auto', 'cpu', 'cuda[:N]'")
        for name in ("bf16", "deterministic", "init_keep_state"):
            v = getattr(self, name)
            _check(name, v, isinstance(v, bool), "true or false")
        _check("init_from", self.init_from, isinstance(self.init_from, str), "a path string ('' = none)")
        for name, cls in (("data", DataConfig), ("controller", ControllerConfig), ("losses", LossConfig)):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, cls.from_dict(v))
            elif not isinstance(v, cls):
                raise ValueError(f"{name}={v!r} is not allowed: it must be a {cls.__name__}")
        for s in self.stages:
            check_mixture(s.mixture, self.data.domains, f"stage {s.name!r}: mixture")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def tokens_per_step(self) -> list[int]:
        return [self.batch_size * self.grad_accum * s.seq_len for s in self.stages]

    def with_steps(self, steps: int) -> "TrainConfig":
        """A copy whose stages are rescaled to `steps` in total (warmups scaled alike), as `--steps` does."""
        n = len(self.stages)
        _check("steps", steps, isinstance(steps, int) and not isinstance(steps, bool) and steps >= n,
               f"an integer >= the number of stages ({n})")
        total = self.total_steps
        new, used = [], 0
        for i, s in enumerate(self.stages):
            k = steps - used if i == n - 1 else max(1, min(steps - used - (n - 1 - i), round(steps * s.steps / total)))
            used += k
            new.append(dataclasses.replace(s, steps=k, warmup=min(k, round(s.warmup * steps / total))))
        return dataclasses.replace(self, stages=new)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["stages"] = [dataclasses.asdict(s) for s in self.stages]
        for name in ("data", "controller", "losses"):
            d[name] = getattr(self, name).to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, refusing unknown keys (`config.from_known_fields`)."""
        return from_known_fields(cls, data)


def train_preset(name: str, **overrides) -> TrainConfig:
    """The TrainConfig that goes with each model preset.

    - tiny: tests and notebook smoke runs; seconds. Small data (300 kB per domain), 40 steps of 8 x 64 tokens.
    - small: the main job; 2 stages, ~10 minutes on two CPU cores (steps measured: README results).
    - base: one GPU; bf16, longer sequences."""
    if name == "tiny":
        cfg = TrainConfig(stages=default_stages(40, 1e-2, 64), batch_size=8, eval_every=20, eval_windows=8,
                          ckpt_every=20, rg_every=5,
                          data=DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000))
    elif name == "small":
        cfg = TrainConfig(stages=default_stages(400, 3e-3, 128), batch_size=16, eval_every=50, eval_windows=16,
                          ckpt_every=100, rg_every=10)
    elif name == "base":
        cfg = TrainConfig(stages=default_stages(5000, 1.5e-3, 512), batch_size=32, eval_every=250, eval_windows=32,
                          ckpt_every=500, rg_every=50, bf16=True,
                          data=DataConfig(max_bytes_per_domain=20_000_000, tokenizer_sample_bytes=4_000_000))
    else:
        raise ValueError(f"preset={name!r} is not allowed: it must be one of ['base', 'small', 'tiny']")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# --set FIELD=VALUE ---------------------------------------------------------------------------------------------
_SECTIONS = ("model", "train", "data", "controller", "losses")


def _section_classes() -> dict[str, type]:
    return {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "controller": ControllerConfig,
            "losses": LossConfig}


def settable_fields() -> dict[str, list[str]]:
    """Field name -> the sections that have it (stages and nested configs themselves are not settable)."""
    out: dict[str, list[str]] = {}
    for section, cls in _section_classes().items():
        for f in dataclasses.fields(cls):
            if section == "train" and f.name in ("stages", "data", "controller", "losses"):
                continue
            out.setdefault(f.name, []).append(section)
    return out


def _parse_value(raw: str, tp: Any, name: str) -> Any:
    """Text -> a value of annotation `tp` (int, float, bool, str, X | None, tuple[...])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        if raw.strip().lower() in ("none", "null", ""):
            return None
        return _parse_value(raw, next(a for a in args if a is not type(None)), name)
    if origin is tuple:
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        elem = args[0] if args else str
        return tuple(_parse_value(p, elem, name) for p in parts)
    if tp is bool:
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name}={raw!r} is not allowed: it must be true or false")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not allowed: it must be an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not allowed: it must be a number") from None
    return raw


def apply_overrides(model_config: ModelConfig, train_config: TrainConfig,
                    assignments: Sequence[str]) -> tuple[ModelConfig, TrainConfig]:
    """Apply `FIELD=VALUE` (or `section.FIELD=VALUE`, section one of model, train, data, controller, losses) to
    copies of the configs. Every value is parsed by the field's type and validated by the config's own checks;
    ValueError for an unknown or ambiguous field, a malformed assignment or a bad value."""
    fields_ = settable_fields()
    classes = _section_classes()
    parts = {"model": model_config, "train": train_config, "data": train_config.data,
             "controller": train_config.controller, "losses": train_config.losses}
    changes: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for item in assignments:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"--set {item!r} is not allowed: expected FIELD=VALUE, e.g. bias_controller=pid")
        key, raw = item.split("=", 1)
        key = key.strip()
        section, name = key.split(".", 1) if "." in key else (None, key)
        if section is not None and section not in _SECTIONS:
            raise ValueError(f"--set {item!r}: unknown section {section!r}; sections are {list(_SECTIONS)}")
        owners = fields_.get(name, [])
        if section is not None:
            owners = [o for o in owners if o == section]
        if not owners:
            close = difflib.get_close_matches(name, list(fields_), n=3)
            hint = f"did you mean {close}?" if close else f"settable fields are {sorted(fields_)}"
            raise ValueError(f"--set {item!r}: unknown field {key!r}; {hint}")
        if len(owners) > 1:
            raise ValueError(f"--set {item!r}: field {name!r} exists in {owners}; write e.g. {owners[0]}.{name}=...")
        owner = owners[0]
        tp = typing.get_type_hints(classes[owner])[name]
        changes[owner][name] = _parse_value(raw, tp, name)
    try:
        built = {s: dataclasses.replace(parts[s], **changes[s]) if changes[s] else parts[s] for s in _SECTIONS}
        train = dataclasses.replace(built["train"], data=built["data"], controller=built["controller"],
                                    losses=built["losses"])
    except TypeError as err:
        raise ValueError(f"--set: {err}") from None
    return built["model"], train


# Schedule --------------------------------------------------------------------------------------------------------
def stage_at(stages: Sequence[StageConfig], step: int) -> tuple[int, int]:
    """(stage index, step within the stage) for the 0-based optimizer step `step`."""
    start = 0
    for i, s in enumerate(stages):
        if step < start + s.steps:
            return i, step - start
        start += s.steps
    return len(stages) - 1, stages[-1].steps - 1


def lr_at(stages: Sequence[StageConfig], step: int) -> float:
    """LR of the 0-based optimizer step `step`: within a stage, linear warmup from the previous stage's final LR
    (0 before the first stage) to the stage's lr, then cosine down to end_lr_ratio * lr at the stage's last step."""
    i, j = stage_at(stages, step)
    s = stages[i]
    prev_end = 0.0 if i == 0 else stages[i - 1].lr * stages[i - 1].end_lr_ratio
    if j < s.warmup:
        return prev_end + (s.lr - prev_end) * (j + 1) / s.warmup
    span = s.steps - s.warmup - 1
    progress = (j - s.warmup) / span if span > 0 else 1.0
    end = s.lr * s.end_lr_ratio
    return end + (s.lr - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Measurement helpers -----------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure_matmul_flops(device: torch.device | str = "cpu", n: int = 512, seconds: float = 0.2,
                         dtype: torch.dtype = torch.float32) -> float:
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
            return 2.0 * n ** 3 * reps / elapsed


def memory_in_use(device: torch.device) -> tuple[float, float]:
    """(bytes in use, bytes the device has): CUDA allocator peak / total, or this process's RSS / physical RAM."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), float(
            torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        import resource

        rss, total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0
    return float(rss), float(total)


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


@torch.no_grad()
def evaluate(model: LongCatLM, dataset: Dataset, seq_len: int, windows: int = 16, batch_size: int = 8,
             bf16: bool = False) -> dict[str, float]:
    """Mean validation cross-entropy (nats/token) per domain on fixed windows (`data.eval_windows`). Runs in eval
    mode, so the routers count nothing; the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    device = model.device
    out = {}
    try:
        for domain, stream in dataset.val.items():
            x, y = eval_windows(stream, seq_len, windows)
            total, count = 0.0, 0
            for i in range(0, x.shape[0], batch_size):
                xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    _, loss = model(xb, yb)
                total += float(loss) * yb.numel()
                count += yb.numel()
            out[domain] = total / count
    finally:
        model.train(was_training)
    return out


def sample_text(model: LongCatLM, tokenizer, prompt: str, max_new_tokens: int = 80, temperature: float = 0.8,
                top_p: float = 0.95, seed: int = 0) -> str:
    """Prompt + continuation as text (top-p sampling with a seeded generator; greedy at temperature 0)."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt={prompt!r} is not allowed: it must be a non-empty string")
    ids = tokenizer.encode(prompt).ids
    limit = model.config.max_position_embeddings
    ids = ids[-max(1, limit - max_new_tokens):]
    idx = torch.tensor([ids], dtype=torch.long, device=model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=gen)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


# Results and plots -------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    model: LongCatLM
    tokenizer: Any
    dataset: Dataset
    step: int                          # optimizer steps done (= total_steps unless stopped early)
    val_loss: dict[str, float]         # the last evaluation, per domain
    checkpoint: Path                   # the checkpoint written at `step`
    skipped_steps: int
    alert_counts: dict[str, int]
    sdc_mismatches: int
    resumed_from: int | None           # the step a resume continued from

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def rows(self, kind: str | None = None) -> list[dict[str, Any]]:
        return read_rows(self.metrics_path, kind)


def loss_curves(rows: Sequence[dict[str, Any]], title: str = "Training and validation loss"):
    """A plotly figure: training LM loss per step, and validation loss per domain at each evaluation."""
    import plotly.graph_objects as go

    train_rows = [r for r in rows if r.get("kind") == "train" and r.get("lm_loss") is not None]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[r["step"] for r in train_rows], y=[r["lm_loss"] for r in train_rows],
                             mode="lines", name="train LM loss", line=dict(color="#888")))
    domains = sorted({d for r in eval_rows for d in r["val_loss"]})
    for d in domains:
        pts = [(r["step"], r["val_loss"][d]) for r in eval_rows if d in r["val_loss"]]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                 name=f"val {d}"))
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title="cross-entropy (nats/token)",
                      height=420, legend=dict(orientation="h", y=-0.2))
    return fig


def schedule_figure(cfg: TrainConfig, title: str = "The training schedule"):
    """A plotly figure of the multi-stage schedule: LR per optimizer step (top) and each stage's data mixture
    (bottom), so the stage-2 shift toward code and reasoning is visible next to the LR it comes with."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.18, row_heights=[0.55, 0.45],
                        subplot_titles=("learning rate", "data mixture per stage"))
    steps = list(range(cfg.total_steps))
    fig.add_trace(go.Scatter(x=[s + 1 for s in steps], y=[lr_at(cfg.stages, s) for s in steps], mode="lines",
                             name="lr", showlegend=False), 1, 1)
    names = [f"{i + 1}: {s.name} ({s.steps} steps)" for i, s in enumerate(cfg.stages)]
    for domain in cfg.data.domains:
        shares = [check_mixture(s.mixture, cfg.data.domains)[domain] for s in cfg.stages]
        fig.add_trace(go.Bar(x=names, y=shares, name=domain), 2, 1)
    fig.update_layout(title=title, barmode="stack", height=520, legend=dict(orientation="h", y=-0.15))
    fig.update_xaxes(title_text="optimizer step", row=1, col=1)
    fig.update_yaxes(title_text="share of sequences", row=2, col=1)
    return fig


def baseline_figure(val_loss: dict[str, float], baselines: dict[str, float],
                    title: str = "Validation loss against the unigram baseline"):
    """Grouped bars per domain: the trained model's validation loss and the unigram baseline on the same tokens."""
    import plotly.graph_objects as go

    domains = list(val_loss)
    fig = go.Figure([go.Bar(x=domains, y=[baselines[d] for d in domains], name="unigram baseline"),
                     go.Bar(x=domains, y=[val_loss[d] for d in domains], name="trained model")])
    fig.update_layout(title=title, barmode="group", yaxis_title="cross-entropy (nats/token)", height=380)
    return fig


class LivePlot:
    """A `train(callback=...)` that redraws figures in a notebook every `every` rows through one display handle
    (static plotly output, no FigureWidget). `figures(rows) -> list[go.Figure]` builds what is drawn."""

    def __init__(self, figures: Callable[[list[dict[str, Any]]], list], every: int = 10):
        self.figures, self.every, self.rows, self.handles = figures, every, [], None

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if row.get("kind") == "train" and row["step"] % self.every == 0:
            self.draw()

    def draw(self) -> None:
        """Draw (first call) or redraw the figures from the rows seen so far; nothing before the first step."""
        from IPython.display import display

        from longcat_lab.viz.routing import figure_bundle

        if not any(r.get("kind") == "train" for r in self.rows):
            return
        figs = self.figures(self.rows)
        if self.handles is None:
            self.handles = [display(figure_bundle(f), raw=True, display_id=True) for f in figs]
        else:
            for h, f in zip(self.handles, figs):
                if h is not None:
                    h.update(figure_bundle(f), raw=True)


# The trainer -------------------------------------------------------------------------------------------------------
# Fields that may differ between a run and its resume: they change when and what is logged or saved, not the math.
RESUME_FREE_FIELDS = {"stop_after", "ckpt_every", "keep_checkpoints", "device", "eval_every", "alert_loss_spike",
                      "alert_throughput_drop", "alert_memory_fraction", "sdc_check_every", "peak_flops", "rg_every",
                      "max_consecutive_skips", "num_threads", "deterministic"}


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


class _Alerts:
    """Running means of loss and throughput, and the checks against the configured thresholds."""

    WARMUP = 10   # steps before the running means are trusted

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
        self.loss_ema, self.tps_ema, self.seen = s["loss_ema"], s["tps_ema"], s["seen"]
        self.counts.update(s["counts"])


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _config_diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """'field: old -> new' for every difference that matters for a resume (nested configs and stages walked)."""
    if isinstance(saved, dict) and isinstance(now, dict) and prefix[-9:] != "mixture.":
        diffs = []
        for k in sorted(set(saved) | set(now)):
            if (not prefix and k in RESUME_FREE_FIELDS) or k == "cache_dir":
                continue
            diffs += _config_diff(saved.get(k), now.get(k), f"{prefix}{k}.")
        return diffs
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now) and saved and \
            isinstance(saved[0], dict):
        return [d for i, (a, b) in enumerate(zip(saved, now)) for d in _config_diff(a, b, f"{prefix}{i}.")]
    a, b = (json.dumps(v, default=_json_default, sort_keys=True) for v in (saved, now))
    return [] if a == b else [f"{prefix[:-1]}: {a} -> {b}"]


class Trainer:
    """One run: owns the model, optimizer, controller, sampler and the run folder. `train()` is the entry point."""

    def __init__(self, model_config: ModelConfig, cfg: TrainConfig, out_dir: Path, progress: bool,
                 callback: Callable[[dict[str, Any]], Any] | None):
        self.mc, self.cfg, self.run_dir = model_config, cfg, out_dir
        self.progress, self.callback = progress, callback
        self.device = resolve_device(cfg.device)
        for s in cfg.stages:
            if s.seq_len > model_config.max_position_embeddings:
                raise ValueError(f"stage {s.name!r}: seq_len={s.seq_len} is not allowed: it must be <= "
                                 f"max_position_embeddings={model_config.max_position_embeddings}")
        self.eval_seq_len = cfg.eval_seq_len or cfg.stages[0].seq_len
        if self.eval_seq_len > model_config.max_position_embeddings:
            raise ValueError(f"eval_seq_len={self.eval_seq_len} is not allowed: it must be <= "
                             f"max_position_embeddings={model_config.max_position_embeddings}")

    # Setup ---------------------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg, mc = self.cfg, self.mc
        self.dataset = load_dataset(mc.vocab_size, cfg.data)
        if self.dataset.tokenizer.get_vocab_size() > mc.vocab_size:
            raise ValueError(f"vocab_size={mc.vocab_size} is smaller than the tokenizer's "
                             f"{self.dataset.tokenizer.get_vocab_size()} tokens")
        self.model = LongCatLM(mc)
        scale = mc.hidden_size / cfg.proxy_hidden_size if cfg.proxy_hidden_size else 1.0
        growth.init_with_transfer(self.model, width_factor=scale, generator=torch.Generator().manual_seed(cfg.seed))
        self.model.to(self.device).train()
        self.groups = growth.param_groups(self.model, width_factor=scale, weight_decay=cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(self.groups, lr=lr_at(cfg.stages, 0), betas=(cfg.adam_beta1,
                                           cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.controller = BiasController(cfg.controller, self.model)
        self.sampler = MixtureSampler(self.dataset.train, seed=cfg.seed)
        self.alerts = _Alerts(cfg)
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.sdc_mismatches = 0
        self.tokens_seen = 0
        self.val_loss: dict[str, float] = {}
        self.val_step: int | None = None
        self.resumed_from: int | None = None
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step, "optimizer": self.optimizer.state_dict(),
            "scheduler": {"step": self.step, "lr": lr_at(self.cfg.stages, max(0, self.step - 1))},
            "controller": self.controller.state_dict(), "sampler": self.sampler.state_dict(),
            "rng": _rng_state(self.device), "alerts": self.alerts.state_dict(),
            "counters": {"skipped_total": self.skipped_total, "consecutive_skips": self.consecutive_skips,
                         "sdc_mismatches": self.sdc_mismatches, "tokens_seen": self.tokens_seen},
            "expert_counts": [b.router.expert_counts.cpu().clone() for b in self.model.moe_blocks()],
            "val_loss": dict(self.val_loss), "val_step": self.val_step,
        }

    def restore(self, ckpt: Path) -> None:
        saved_cfg = json.loads((ckpt / "train_config.json").read_text())
        diffs = _config_diff(saved_cfg, self.cfg.to_dict())
        saved_model = json.loads((ckpt / "config.json").read_text())
        diffs += [f"model.{d}" for d in _config_diff(saved_model, self.mc.to_dict())]
        if diffs:
            raise TrainingError(f"cannot resume {self.run_dir}: the configuration differs from the checkpoint's "
                                f"({'; '.join(diffs[:4])}); resume with the same settings or use a new --out")
        checkpoint.load_model_state(self.model, ckpt)
        st = checkpoint.read_trainer_state(ckpt)
        self.optimizer.load_state_dict(st["optimizer"])
        self.controller.load_state_dict(st["controller"])
        self.sampler.load_state_dict(st["sampler"])
        _set_rng_state(st["rng"], self.device)
        self.alerts.load_state_dict(st["alerts"])
        c = st["counters"]
        self.skipped_total, self.consecutive_skips = c["skipped_total"], c["consecutive_skips"]
        self.sdc_mismatches, self.tokens_seen = c["sdc_mismatches"], c["tokens_seen"]
        for b, counts in zip(self.model.moe_blocks(), st["expert_counts"]):
            b.router.expert_counts.copy_(counts)
        self.val_loss, self.val_step = st["val_loss"], st["val_step"]
        self.step = self.resumed_from = st["step"]

    def init_from(self, source: str) -> None:
        """Growth init (docs/design.md §4): the source checkpoint's model, stacked to this depth; optionally its position."""
        src_model, _, meta = checkpoint.load(source)
        grown = growth.grow_depth(src_model, self.mc.num_layers // max(1, src_model.config.num_layers))
        if grown.config != self.mc:
            raise ValueError(f"init_from={source!r} is not allowed: stacking its {src_model.config.num_layers}-layer "
                             f"model does not give this ModelConfig (depth must be a multiple and all else equal)")
        self.model.load_state_dict(grown.state_dict())
        if self.cfg.init_keep_state:
            st = checkpoint.read_trainer_state(checkpoint.resolve(source))
            self.sampler.load_state_dict(st["sampler"])
            self.step = self.resumed_from = int(meta["step"])
            self.tokens_seen = st["counters"]["tokens_seen"]

    # Logging -------------------------------------------------------------------------------------------------
    def write(self, row: dict[str, Any]) -> None:
        row = _clean(row)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        if self.callback is not None:
            self.callback(row)

    def truncate_metrics(self, upto: int) -> None:
        """On resume: keep the rows of steps <= `upto`, so steps that are redone are not logged twice."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue                     # a line half-written by a crash
            if row.get("step", 0) <= upto:
                keep.append(line)
        atomic_write_bytes(self.metrics_path, ("\n".join(keep) + "\n" if keep else "").encode())

    # One step --------------------------------------------------------------------------------------------------
    def forward_backward(self, batches, want_rg: bool):
        """Forward and backward over the micro-batches; returns ([micro, 2 + len(LOSS_KEYS)] losses: total, LM,
        aux...), R_g (or None), the seconds R_g took, and the last micro-batch's routing."""
        cfg, mc = self.cfg, self.mc
        parts, rg, rg_time, routing = [], None, 0.0, None
        for i, (x, y) in enumerate(batches):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                _, lm_loss, routing = self.model(x, y, return_routing=True)
                aux = aux_losses(routing, cfg.losses, mc, self.controller.target)
            loss = lm_loss + sum(aux[k] for k in LOSS_KEYS)
            if want_rg and i == 0:
                t = time.perf_counter()
                rg = metrics.balance_grad_ratio(lm_loss, aux["balance_loss"], routing)
                rg_time = time.perf_counter() - t
            (loss / cfg.grad_accum).backward()
            parts.append(torch.stack([loss.detach().float(), lm_loss.detach().float(),
                                      *(aux[k].detach().float() for k in LOSS_KEYS)]))
        return torch.stack(parts), rg, rg_time, routing

    def sdc_check(self, batches, losses: torch.Tensor, counts_before: list[torch.Tensor]) -> dict[str, Any]:
        """Re-run this step's forward and backward from the same state and compare bit for bit (docs/design.md §4, SDC). The
        routers' counts and the gradients of the first run are restored afterwards, so nothing is counted twice."""
        blocks = self.model.moe_blocks()
        counts_after = [b.router.expert_counts.clone() for b in blocks]
        grads = [p.grad.clone() if p.grad is not None else None for p in self.params]
        for b, c in zip(blocks, counts_before):
            b.router.expert_counts.copy_(c)
        self.optimizer.zero_grad(set_to_none=True)
        losses2, _, _, _ = self.forward_backward(batches, want_rg=False)
        loss_match = torch.equal(losses, losses2)
        grad_mismatch, max_diff = 0, 0.0
        for p, g in zip(self.params, grads):
            g2 = p.grad
            if (g is None) != (g2 is None):
                grad_mismatch += 1
            elif g is not None and not torch.equal(g, g2):
                grad_mismatch += 1
                max_diff = max(max_diff, float((g - g2).abs().max()))
            p.grad = g
        for b, c in zip(blocks, counts_after):
            b.router.expert_counts.copy_(c)
        match = loss_match and grad_mismatch == 0
        result = {"match": match, "loss_match": loss_match, "grad_mismatches": grad_mismatch,
                  "max_grad_diff": max_diff, "max_loss_diff": float((losses - losses2).abs().max())}
        if not match:
            self.sdc_mismatches += 1
            log.warning("SDC check at step %d: re-running the step did not reproduce it bit for bit (%s)",
                        self.step + 1, result)
        return result

    def train_step(self) -> dict[str, Any]:
        cfg, mc = self.cfg, self.mc
        index = self.step                                   # 0-based index of the step being taken
        si, _ = stage_at(cfg.stages, index)
        stage = cfg.stages[si]
        lr = lr_at(cfg.stages, index)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
        t0 = time.perf_counter()
        batches = []
        for _ in range(cfg.grad_accum):
            x, y = self.sampler.batch(stage.mixture, cfg.batch_size, stage.seq_len)
            batches.append((x.to(self.device), y.to(self.device)))
        counts_before = [b.router.expert_counts.clone() for b in self.model.moe_blocks()]
        want_rg = bool(cfg.rg_every) and (index + 1) % cfg.rg_every == 0 and bool(self.model.moe_blocks())
        self.optimizer.zero_grad(set_to_none=True)
        # R_g's extra autograd pass and the SDC re-run are diagnostics: their time stays out of tokens/s and MFU.
        losses, rg, diag_time, routing = self.forward_backward(batches, want_rg)
        sdc = None
        if cfg.sdc_check_every and (index + 1) % cfg.sdc_check_every == 0:
            t_sdc = time.perf_counter()
            sdc = self.sdc_check(batches, losses, counts_before)
            diag_time += time.perf_counter() - t_sdc
        mean = losses.mean(0)
        loss_value = float(mean[0])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        report: dict[str, Any] = {}
        health: dict[str, Any] = {}
        if finite:
            self.optimizer.step()
            report = self.controller.step()
            self.consecutive_skips = 0
            if want_rg and routing is not None:
                health = metrics.routing_health(routing, self.model)
        else:
            for b in self.model.moe_blocks():   # this step's selections must not reach the next update
                b.router.expert_counts.zero_()
            self.skipped_total += 1
            self.consecutive_skips += 1
            self.alerts.counts["skipped_step"] += 1
            log.warning("step %d skipped: non-finite %s (%d in a row)", index + 1,
                        "loss" if not math.isfinite(loss_value) else "gradient", self.consecutive_skips)
        routing = None
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(1e-9, time.perf_counter() - t0 - diag_time)
        tokens = cfg.batch_size * cfg.grad_accum * stage.seq_len
        self.tokens_seen += tokens
        self.step = index + 1
        tps = tokens / elapsed
        ffn_layers = report.get("ffn_experts_per_token")
        ffn_mean = report.get("ffn_experts_per_token_mean")
        k = None if ffn_mean is None else min(max(ffn_mean, max(0, mc.moe_topk - mc.zero_expert_num)),
                                             min(mc.moe_topk, mc.n_routed_experts))
        mfu = tps * accounting.flops_per_token(mc, stage.seq_len, k) / self.peak_flops
        mem, mem_total = memory_in_use(self.device)
        alerts = self.alerts.check(loss_value if finite else None, tps, mem / mem_total if mem_total else 0.0)
        for a in alerts:
            n = self.alerts.counts[a]
            if n == 10 ** round(math.log10(n)):   # the 1st, 10th, 100th ...: a warning, not a flood
                log.warning("alert at step %d: %s (loss %.4g, %.0f tokens/s, %.2f GB); %d so far, every one is "
                            "counted in metrics.jsonl", self.step, a, loss_value, tps, mem / 1e9, n)
        if sdc is not None and not sdc["match"]:
            self.alerts.counts["sdc_mismatch"] += 1
            alerts.append("sdc_mismatch")
        if not finite:
            alerts.append("skipped_step")
        imbalance = report.get("load_imbalance") or []
        row = {
            "kind": "train", "step": self.step, "stage": stage.name, "stage_index": si,
            "loss": loss_value, "lm_loss": float(mean[1]),
            **{key: float(mean[2 + i]) for i, key in enumerate(LOSS_KEYS)},
            "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_seen": self.tokens_seen,
            "tokens_per_s": tps, "mfu": mfu,
            "ffn_experts_per_token": ffn_mean, "ffn_experts_per_token_per_layer": ffn_layers,
            "load_imbalance": (None if not imbalance or any(v is None for v in imbalance) else max(imbalance)),
            "load_imbalance_per_layer": imbalance or None,
            "target_ffn_experts": report.get("target_ffn_experts"),
            "controller_error": report.get("controller_error"),
            "controller_error_per_layer": report.get("controller_error_per_layer"),
            "bias_spread": report.get("bias_spread"), "bias_update_rate": report.get("update_rate"),
            "R_g": rg,
            "router_cosine": metrics.router_cosine_similarity(self.model) if want_rg else None,
            "dead_experts": sum(health["dead_count"]) if health else None,
            "hot_experts": sum(health["hot_count"]) if health else None,
            "memory_gb": mem / 1e9, "skipped": not finite, "skipped_total": self.skipped_total,
            "alerts": alerts, "alert_counts": dict(self.alerts.counts), "sdc": sdc,
            "time_s": time.perf_counter() - self.t_start,
        }
        return row

    # The run ---------------------------------------------------------------------------------------------------
    def save(self) -> Path:
        stage = self.cfg.stages[stage_at(self.cfg.stages, max(0, self.step - 1))[0]]
        meta = {"seed": self.cfg.seed, "stage": stage.name, "tokens_seen": self.tokens_seen,
                "val_loss": self.val_loss, "val_loss_step": self.val_step,
                "data_key": self.dataset.key, "total_steps": self.cfg.total_steps,
                "num_params": self.model.num_params()}
        return checkpoint.save(self.run_dir, self.step, self.model, self.dataset.tokenizer, self.cfg.to_dict(),
                               self.state(), meta, keep=self.cfg.keep_checkpoints)

    def run_eval(self) -> None:
        self.val_loss = evaluate(self.model, self.dataset, self.eval_seq_len, self.cfg.eval_windows,
                                 self.cfg.batch_size, self.cfg.bf16)
        self.val_step = self.step
        self.write({"kind": "eval", "step": self.step, "val_loss": self.val_loss,
                    "val_loss_mean": sum(self.val_loss.values()) / len(self.val_loss)})

    def run(self, resume: bool) -> TrainResult:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        existing = checkpoint.latest(self.run_dir)
        if existing is not None and not resume:
            raise TrainingError(f"{self.run_dir} already holds checkpoints (newest {existing.name}); pass "
                                "resume=True (--resume) to continue it, or choose a new output folder")
        self.build()
        if resume and existing is not None:
            checkpoint.verify(existing)            # a one-line CheckpointError naming the bad file
            self.restore(existing)
            self.truncate_metrics(self.step)
        else:
            if self.metrics_path.exists():
                self.metrics_path.unlink()
            if cfg.init_from:
                self.init_from(cfg.init_from)
        total = cfg.total_steps
        end = min(total, cfg.stop_after) if cfg.stop_after else total
        self.peak_flops = cfg.peak_flops or measure_matmul_flops(self.device)
        self.t_start = time.perf_counter()
        self.write({"kind": "start", "step": self.step, "resumed_from": self.resumed_from, "total_steps": total,
                    "num_params": self.model.num_params(), "device": str(self.device),
                    "threads": torch.get_num_threads(), "peak_flops": self.peak_flops,
                    "data": self.dataset.summary(), "data_filter": self.dataset.report})
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=self.step, disable=not self.progress, desc="train", dynamic_ncols=True)
        last_ckpt = existing if (resume and existing is not None) else None
        try:
            while self.step < end:
                row = self.train_step()
                self.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}" if row["loss"] is not None else "nan",
                                ffn=f"{row['ffn_experts_per_token'] or 0:.2f}", lr=f"{row['lr']:.2e}")
                if self.consecutive_skips >= cfg.max_consecutive_skips:
                    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
                    raise TrainingError(f"training stopped at step {self.step}: {self.consecutive_skips} consecutive "
                                        f"steps had a non-finite loss or gradient (max_consecutive_skips="
                                        f"{cfg.max_consecutive_skips}); {where}")
                last = self.step == end
                if last or (cfg.eval_every and self.step % cfg.eval_every == 0):
                    self.run_eval()
                if last or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                    last_ckpt = self.save()
        finally:
            bar.close()
        if last_ckpt is None or checkpoint.step_dir_name(self.step) != last_ckpt.name:
            # Nothing to train (already at the end) but no checkpoint at this step: write one, as every run does.
            if self.val_step != self.step:
                self.run_eval()
            last_ckpt = self.save()
        if not self.val_loss:
            self.run_eval()
        return TrainResult(self.run_dir, self.model.eval(), self.dataset.tokenizer, self.dataset, self.step,
                           dict(self.val_loss), last_ckpt, self.skipped_total, dict(self.alerts.counts),
                           self.sdc_mismatches, self.resumed_from)


@contextlib.contextmanager
def _threads(n: int):
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _deterministic(on: bool):
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train(model_config: ModelConfig, train_config: TrainConfig, out_dir: str | os.PathLike, resume: bool = False,
          progress: bool = True, callback: Callable[[dict[str, Any]], Any] | None = None) -> TrainResult:
    """Train `model_config` with `train_config`, writing metrics.jsonl and checkpoints under `out_dir`.

    resume=True continues from the newest checkpoint in `out_dir` (none: a fresh start) and reproduces the losses
    of an uninterrupted run bit for bit; resume=False refuses a folder that already holds checkpoints. A run that
    already reached its last step trains nothing and returns the final state. Every run ends with a checkpoint."""
    if not isinstance(model_config, ModelConfig):
        raise ValueError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    if not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    trainer = Trainer(model_config, train_config, Path(out_dir), progress, callback)
    with _threads(train_config.num_threads), _deterministic(train_config.deterministic):
        return trainer.run(resume)


__all__ = ["StageConfig", "TrainConfig", "TrainResult", "TrainingError", "train", "train_preset", "default_stages",
           "apply_overrides", "settable_fields", "lr_at", "stage_at", "evaluate", "sample_text", "loss_curves",
           "LivePlot", "read_rows", "measure_matmul_flops", "schedule_figure", "baseline_figure"]
