"""How a model is trained: `StageConfig` (one stage of the multi-stage schedule), `TrainConfig` (everything else,
with the nested `DataConfig`, `ControllerConfig` and `LossConfig`), `SFTConfig` (a TrainConfig plus the dialogues
of a fine-tuning run), `default_stages` and `train_preset(name)` for "tiny", "mini", "ablation", "small" and "base".
The schedule these stages describe is `train.schedule`. Plain data: nothing here touches a model.
docs/design.md §3 explains the recipe these defaults follow.

A field that a resume may change (it changes when or what is logged or saved, or how the run executes, not the
math) carries `metadata=FREE_ON_RESUME`; `resume_free_fields` lists them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from longcat_lab._util import check_int, check_positive_float, from_known_fields, is_number
from longcat_lab.data import DOMAINS, DataConfig, check_mixture
from longcat_lab.train.control import ControllerConfig
from longcat_lab.train.losses import LossConfig

# The mark of a TrainConfig field that may differ between a run and its resume (`train.resume.config_diffs`).
FREE_ON_RESUME = {"resume": "free"}


def resume_free_fields(cls: type) -> frozenset[str]:
    """The fields of config class `cls` marked FREE_ON_RESUME."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume") == "free")


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    """The one-line error of `longcat_lab._util` for the range checks it has no helper for."""
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: it must be {allowed}")


@dataclass
class StageConfig:
    """One training stage: its length, LR (linear warmup from the previous stage's final LR, then cosine down to
    end_lr_ratio * lr), sequence length and data mixture (docs/design.md §4: stage 2 moves the mixture toward
    reasoning)."""

    name: str = "general"
    steps: int = 100
    lr: float = 3e-3
    warmup: int = 10
    seq_len: int = 128
    mixture: dict[str, float] = field(default_factory=lambda: {"shakespeare": 0.45, "python": 0.4, "reasoning": 0.15})
    end_lr_ratio: float = 0.1
    # Weight of the MTP loss (docs/design.md §1.5) in this stage; > 0 needs a model with num_nextn_predict_layers=1.
    # 0 leaves the MTP module untouched, so a late stage can add it as the paper does (DeepSeek-V3 uses 0.3, then 0.1).
    mtp_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        p = f"stage {self.name!r}: "
        check_int(p + "steps", self.steps)
        check_positive_float(p + "lr", self.lr)
        _check(
            p + "warmup",
            self.warmup,
            isinstance(self.warmup, int) and not isinstance(self.warmup, bool) and 0 <= self.warmup <= self.steps,
            f"an integer in [0, steps={self.steps}]",
        )
        check_int(p + "seq_len", self.seq_len, 2)
        _check(
            p + "end_lr_ratio",
            self.end_lr_ratio,
            is_number(self.end_lr_ratio) and 0 <= self.end_lr_ratio <= 1,
            "a number in [0, 1]",
        )
        _check(
            p + "mtp_loss_weight",
            self.mtp_loss_weight,
            is_number(self.mtp_loss_weight) and self.mtp_loss_weight >= 0,
            "a finite number >= 0",
        )
        self.mixture = dict(self.mixture)
        check_mixture(self.mixture, DOMAINS, p + "mixture")


def default_stages(steps: int, lr: float, seq_len: int) -> list[StageConfig]:
    """Two stages as LongCat's pre-training (docs/design.md §4 "Data"): 85% general-heavy, then 15% where code and
    reasoning rise to 70% of the mixture at a lower, decaying LR (an annealing phase)."""
    s2 = max(1, round(0.15 * steps))
    s1 = steps - s2
    if s1 < 1:
        raise ValueError(f"steps={steps} is not allowed: two stages need at least 2 steps")
    return [
        StageConfig(
            "general",
            s1,
            lr,
            max(1, min(s1, round(0.05 * steps))),
            seq_len,
            {"shakespeare": 0.45, "python": 0.4, "reasoning": 0.15},
            end_lr_ratio=0.3,
        ),
        StageConfig(
            "reasoning",
            s2,
            0.3 * lr,
            0,
            seq_len,
            {"shakespeare": 0.3, "python": 0.35, "reasoning": 0.35},
            end_lr_ratio=1 / 3,
        ),
    ]


# What TrainConfig.__post_init__ allows beyond the field's type: the counts that must be >= 1 (other ints are >= 0)
# and each float's range, as (test, the error's wording).
_AT_LEAST_ONE = {"batch_size", "grad_accum", "eval_windows", "keep_checkpoints", "max_consecutive_skips"}
_UNIT = (lambda v: 0 < v <= 1, "a number in (0, 1]")
_BETA = (lambda v: 0 <= v < 1, "a number in [0, 1)")
_NONNEGATIVE = (lambda v: v >= 0, "a finite number >= 0")
_POSITIVE = (lambda v: v > 0, "a finite number > 0")
_FLOAT_RANGES = {
    "weight_decay": _NONNEGATIVE,
    "adam_beta1": _BETA,
    "adam_beta2": _BETA,
    "adam_eps": _POSITIVE,
    "grad_clip": _POSITIVE,
    "alert_loss_spike": (lambda v: v > 1, "a number > 1"),
    "alert_throughput_drop": _UNIT,
    "alert_memory_fraction": _UNIT,
    "peak_flops": _NONNEGATIVE,
    "sft_pretrain_ratio": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


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
    # The paper's eps (docs/design.md §3.1): loss degrades once eps nears the gradient RMS, which shrinks as models
    # grow, so eps sits many orders below it. At our sizes gradient RMS is ~1e-4..1e-6, far above 1e-16.
    adam_eps: float = 1e-16
    # Global gradient-norm clip (pre-clip norm is logged).
    grad_clip: float = 1.0
    # bf16 autocast for forward and backward (weights and optimizer stay fp32); off on CPU by default.
    bf16: bool = False
    # torch.compile (inductor) of every layer's attention and dense FFNs (`train.speed`, docs/design.md §3.4). Off by
    # default: on CPU the saving per step is small and the compile time is what many steps would save
    # (benchmarks/RESULTS.md "train_step").
    torch_compile: bool = False
    # "auto" picks CUDA when present, else CPU.
    device: str = field(default="auto", metadata=FREE_ON_RESUME)
    # torch threads for this run (0 = leave torch's default); results depend on it in the last bits.
    num_threads: int = field(default=0, metadata=FREE_ON_RESUME)
    # torch.use_deterministic_algorithms for GPU runs (CPU kernels we use are deterministic already).
    deterministic: bool = field(default=False, metadata=FREE_ON_RESUME)
    # Evaluate every this many steps (and always at the last step) on `eval_windows` windows per domain of
    # `eval_seq_len` tokens (0 = the first stage's seq_len).
    eval_every: int = field(default=50, metadata=FREE_ON_RESUME)
    eval_windows: int = 16
    eval_seq_len: int = 0
    # Checkpoint every this many steps (and always at the last step); keep the newest `keep_checkpoints`.
    ckpt_every: int = field(default=100, metadata=FREE_ON_RESUME)
    keep_checkpoints: int = field(default=3, metadata=FREE_ON_RESUME)
    # Stop after this many steps of the schedule (with a checkpoint), as if interrupted; 0 = run to the end.
    stop_after: int = field(default=0, metadata=FREE_ON_RESUME)
    # R_g (docs/design.md §2.3) costs about one extra backward, so it is measured every this many steps (0 = never);
    # every 10 was a visible share of the main job's time (benchmarks/RESULTS.md "speedrun").
    rg_every: int = field(default=50, metadata=FREE_ON_RESUME)
    # Re-run a step from the same state every this many steps and compare loss and gradients bit for bit (0 = off).
    sdc_check_every: int = field(default=0, metadata=FREE_ON_RESUME)
    # Non-finite loss or gradient: skip the step; this many in a row stop training.
    max_consecutive_skips: int = field(default=5, metadata=FREE_ON_RESUME)
    # Telemetry alerts (logged as warnings and counted): loss above this factor times its running mean, throughput
    # below this fraction of its running mean, memory above this fraction of the device's total.
    alert_loss_spike: float = field(default=1.5, metadata=FREE_ON_RESUME)
    alert_throughput_drop: float = field(default=0.5, metadata=FREE_ON_RESUME)
    alert_memory_fraction: float = field(default=0.9, metadata=FREE_ON_RESUME)
    # Model FLOP/s that MFU divides by; 0 = measure a matmul probe on this device at start.
    peak_flops: float = field(default=0.0, metadata=FREE_ON_RESUME)
    # Hyperparameter transfer (docs/design.md §3.2): the width the init std and LRs were tuned at; 0 = no transfer.
    proxy_hidden_size: int = 0
    # Growth init (docs/design.md §3.2): start from this checkpoint (or run folder), stacked to this model's depth.
    init_from: str = ""
    # With init_from: continue the source run's step counter, LR schedule and data position (fresh optimizer).
    init_keep_state: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    losses: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise ValueError(f"stages={self.stages!r} is not allowed: it must be a non-empty list of StageConfig")
        self.stages = [_stage(i, s) for i, s in enumerate(self.stages)]
        # Counts are ints (>= 1 where 0 would mean nothing to do, else >= 0 with 0 = off or default), switches
        # are bools, and each float lies in its _FLOAT_RANGES interval.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                check_int(f.name, v, 1 if f.name in _AT_LEAST_ONE else 0)
            elif f.type == "float":
                ok, allowed = _FLOAT_RANGES[f.name]
                _check(f.name, v, is_number(v) and ok(v), allowed)
            elif f.type == "bool":
                _check(f.name, v, isinstance(v, bool), "true or false")
        _check(
            "device",
            self.device,
            isinstance(self.device, str) and (self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda")),
            "'auto', 'cpu', 'cuda[:N]'",
        )
        _check("init_from", self.init_from, isinstance(self.init_from, str), "a string ('' = none)")
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

    def with_steps(self, steps: int) -> TrainConfig:
        """A copy whose stages are rescaled to `steps` in total (warmups scaled alike), as `--steps` does."""
        n = len(self.stages)
        check_int("steps", steps, n)
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
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict, refusing unknown keys (`_util.from_known_fields`). A fine-tuning run's config also
        holds `SFTConfig`'s own fields, which a TrainConfig leaves out, so that any run's train_config.json reads
        as a TrainConfig (the evaluator's and a growth init's view of it)."""
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} is a dict of its fields, not a {type(data).__name__}")
        if cls is TrainConfig:
            data = {k: v for k, v in data.items() if k not in _SFT_ONLY}
        return from_known_fields(cls, data)


LONG_DIALOGUES = ("drop", "split")


@dataclass
class SFTConfig(TrainConfig):
    """Fine-tuning into an agent (docs/design.md §5.4): a TrainConfig (one stage, `init_from` the pre-trained
    checkpoint; `train.sft.sft_config` derives it from the source run's) plus the dialogues it trains on.
    `train.sft.SFTTrainer` trains it."""

    # A JSONL of `longcat-lab synth` dialogues, and its records' sha256 (a resume refuses other data).
    sft_data: str = ""
    sft_data_sha256: str = ""
    # The fraction of rows drawn from the stage's pre-training mixture against forgetting (1 in 4, about half the
    # loss's tokens since a dialogue row trains only its assistant tokens; 1 in 8 forgot far more Python:
    # benchmarks/RESULTS.md "sft").
    sft_pretrain_ratio: float = 0.25
    # Dialogues held out for a validation loss.
    sft_val_dialogues: int = 8
    # What becomes of a dialogue longer than the stage's context: "drop" leaves it out (a piece that starts
    # mid-dialogue trains replies whose sources, the user's details and the tool descriptions, it cannot see:
    # docs/design.md §5.4), "split" cuts it into consecutive pieces.
    sft_long_dialogues: str = "drop"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("sft_data", self.sft_data, isinstance(self.sft_data, str) and bool(self.sft_data), "a JSONL file")
        _check("sft_data_sha256", self.sft_data_sha256, isinstance(self.sft_data_sha256, str), "a string")
        _check("sft_long_dialogues", self.sft_long_dialogues, self.sft_long_dialogues in LONG_DIALOGUES,
               f"one of {list(LONG_DIALOGUES)}")  # fmt: skip


_SFT_ONLY = frozenset(f.name for f in dataclasses.fields(SFTConfig)) - {f.name for f in dataclasses.fields(TrainConfig)}


def _stage(i: int, s: Any) -> StageConfig:
    if isinstance(s, StageConfig):
        return s
    if not isinstance(s, dict):
        raise ValueError(f"stages[{i}]={s!r} is not allowed: it must be a StageConfig or a dict of its fields")
    return from_known_fields(StageConfig, s)


# Each preset's schedule as default_stages(steps, lr, seq_len) and the fields it sets; "small" is TrainConfig's
# defaults.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "stages": (40, 1e-2, 64),
        "batch_size": 8,
        "eval_every": 20,
        "eval_windows": 8,
        "ckpt_every": 20,
        "rg_every": 5,
        "data": {"max_bytes_per_domain": 300_000, "tokenizer_sample_bytes": 100_000},
    },
    "mini": {
        "stages": (300, 5e-3, 64),
        "batch_size": 16,
        "eval_every": 100,
        "eval_windows": 8,
        "ckpt_every": 100,
        "rg_every": 0,
        "data": {"max_bytes_per_domain": 1_000_000, "tokenizer_sample_bytes": 200_000},
    },
    "ablation": {
        # 1e-2: the best rate of its `lr` sweep (benchmarks/RESULTS.md "Ablation sweeps").
        "stages": (400, 1e-2, 64),
        "batch_size": 16,
        "eval_every": 100,
        "eval_windows": 64,
        "ckpt_every": 100,
        "rg_every": 0,
        "data": {"max_bytes_per_domain": 1_000_000, "tokenizer_sample_bytes": 200_000},
        "controller": {"bias_controller": "paper"},  # the paper's ablations under its own Eq. 2 (design.md §2.1)
    },
    "small": {"stages": (400, 3e-3, 128)},
    "base": {
        "stages": (5000, 1.5e-3, 512),
        "batch_size": 32,
        "eval_every": 250,
        "eval_windows": 32,
        "ckpt_every": 500,
        "rg_every": 50,
        "bf16": True,
        "data": {"max_bytes_per_domain": 20_000_000, "tokenizer_sample_bytes": 4_000_000},
    },
}


def train_preset(name: str, **overrides) -> TrainConfig:
    """The TrainConfig that goes with each model preset.

    - tiny: tests and notebook smoke runs; seconds. Small data (300 kB per domain), 40 steps of 8 x 64 tokens.
    - mini: one run of a sweep (`longcat_lab.experiments`); 300 steps of 16 x 64 tokens, about a minute on one CPU
      thread.
    - ablation: one run of the ablation study (docs/design.md §3.6); 400 steps of 16 x 64 tokens at the LR its
      `lr` sweep chose, and 64 validation windows per domain, so the validation set's own sampling error is small
      against the effects; the paper's controller (Eq. 2), whose ablations these are.
    - small: the main job; 2 stages, about ten minutes on two CPU cores (benchmarks/RESULTS.md "The main job").
    - base: one GPU; bf16, longer sequences."""
    if name not in _PRESETS:
        raise ValueError(f"preset={name!r} is not allowed: it must be one of {sorted(_PRESETS)}")
    preset = dict(_PRESETS[name])
    cfg = TrainConfig(stages=default_stages(*preset.pop("stages")), **preset)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
