"""What a checkpoint holds of a `Trainer` beyond the model, and how it is written and put back: `trainer_state`
(optimizer, schedule, controller, data position, RNG, alert state, counters, the routers' pending counts),
`save_checkpoint`, `config_diffs` (what a resume may not change), `restore` and `init_from` (growth init,
docs/design.md §4).

A resume reproduces an uninterrupted run bit for bit because everything that the next step reads is in here.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from longcat_lab.model.config import ModelConfig
from longcat_lab.train import checkpoint, growth
from longcat_lab.train.config import TrainConfig, lr_at, stage_at
from longcat_lab.train.telemetry import to_json

if TYPE_CHECKING:
    from longcat_lab.train.trainer import Trainer

# Fields that may differ between a run and its resume: they change when and what is logged or saved, not the math.
RESUME_FREE_FIELDS = {
    "stop_after",
    "ckpt_every",
    "keep_checkpoints",
    "device",
    "eval_every",
    "alert_loss_spike",
    "alert_throughput_drop",
    "alert_memory_fraction",
    "sdc_check_every",
    "peak_flops",
    "rg_every",
    "max_consecutive_skips",
    "num_threads",
    "deterministic",
}


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
    if (
        isinstance(saved, list)
        and isinstance(now, list)
        and len(saved) == len(now)
        and saved
        and isinstance(saved[0], dict)
    ):
        return [d for i, (a, b) in enumerate(zip(saved, now)) for d in _config_diff(a, b, f"{prefix}{i}.")]
    a, b = (to_json(v, sort_keys=True) for v in (saved, now))
    return [] if a == b else [f"{prefix[:-1]}: {a} -> {b}"]


def config_diffs(trainer: Trainer, ckpt: Path) -> list[str]:
    """The differences between the checkpoint's configs and the trainer's, RESUME_FREE_FIELDS left out."""
    saved_cfg = json.loads((ckpt / "train_config.json").read_text())
    saved_model = json.loads((ckpt / "config.json").read_text())
    # A field added since the checkpoint was written holds its default there: read both files through their
    # dataclass so that only real differences are refused.
    with contextlib.suppress(ValueError, TypeError):
        saved_cfg = TrainConfig.from_dict(saved_cfg).to_dict()
    with contextlib.suppress(ValueError, TypeError):
        saved_model = ModelConfig.from_dict(saved_model).to_dict()
    return _config_diff(saved_cfg, trainer.cfg.to_dict()) + [
        f"model.{d}" for d in _config_diff(saved_model, trainer.mc.to_dict())
    ]


def trainer_state(t: Trainer) -> dict[str, Any]:
    """Everything but the model that the next step reads (checkpoint's trainer_state.pt)."""
    return {
        "step": t.steps_done,
        "optimizer": t.optimizer.state_dict(),
        "scheduler": {"step": t.steps_done, "lr": lr_at(t.cfg.stages, max(0, t.steps_done - 1))},
        "controller": t.controller.state_dict(),
        "sampler": t.sampler.state_dict(),
        "rng": _rng_state(t.device),
        "alerts": t.telemetry.alerts.state_dict(),
        "counters": {
            "skipped_total": t.skipped_total,
            "consecutive_skips": t.consecutive_skips,
            "sdc_mismatches": t.sdc_mismatches,
            "tokens_seen": t.tokens_seen,
        },
        "expert_counts": [b.router.expert_counts.cpu().clone() for b in t.model.moe_blocks()],
        "val_loss": dict(t.val_loss),
        "val_step": t.val_step,
    }


def checkpoint_meta(t: Trainer) -> dict[str, Any]:
    """The run's summary that meta.json carries beside the checksums."""
    stage = t.cfg.stages[stage_at(t.cfg.stages, max(0, t.steps_done - 1))[0]]
    return {
        "seed": t.cfg.seed,
        "stage": stage.name,
        "tokens_seen": t.tokens_seen,
        "val_loss": t.val_loss,
        "val_loss_step": t.val_step,
        "data_key": t.dataset.key,
        "total_steps": t.cfg.total_steps,
        "num_params": t.model.num_params(),
    }


def save_checkpoint(t: Trainer) -> Path:
    """Write the checkpoint of `t` at its current step (model, tokenizer, both configs, `trainer_state` and a
    summary in meta), keeping the newest `keep_checkpoints`; returns its folder. A run on several ranks writes a
    sharded checkpoint (`parallel.dcp`)."""
    if t.parallel is not None:
        from longcat_lab.parallel import dcp

        return dcp.save_checkpoint(t)
    return checkpoint.save(
        t.run_dir,
        t.steps_done,
        t.model,
        t.dataset.tokenizer,
        t.cfg.to_dict(),
        trainer_state(t),
        checkpoint_meta(t),
        keep=t.cfg.keep_checkpoints,
    )


def restore(t: Trainer, ckpt: Path) -> None:
    """Load the model and `trainer_state` of checkpoint `ckpt` into `t` (its configs were compared already). A
    sharded checkpoint, or a run on several ranks, reshards through `parallel.dcp` (any layout to any layout)."""
    st = checkpoint.read_trainer_state(ckpt)
    if t.parallel is not None or checkpoint.is_sharded(ckpt):
        from longcat_lab.parallel import dcp

        dcp.load_into(t.model, t.optimizer, ckpt, t.parallel.ctx if t.parallel else None, st)
    else:
        checkpoint.load_model_state(t.model, ckpt)
        t.optimizer.load_state_dict(st["optimizer"])
    t.controller.load_state_dict(st["controller"])
    t.sampler.load_state_dict(st["sampler"])
    _set_rng_state(st["rng"], t.device)
    t.telemetry.alerts.load_state_dict(st["alerts"])
    c = st["counters"]
    t.skipped_total, t.consecutive_skips = c["skipped_total"], c["consecutive_skips"]
    t.sdc_mismatches, t.tokens_seen = c["sdc_mismatches"], c["tokens_seen"]
    for b, counts in zip(t.model.moe_blocks(), st["expert_counts"]):
        # Every rank's counts were summed into rank 0's before the save: the other ranks start from zero.
        b.router.expert_counts.copy_(counts if t.main else torch.zeros_like(counts))
    t.val_loss, t.val_step = st["val_loss"], st["val_step"]
    t.steps_done = t.resumed_from = st["step"]


def init_from(t: Trainer, source: str) -> None:
    """Growth init (docs/design.md §4): the source checkpoint's model, stacked to this depth; with
    `init_keep_state`, also its step counter and data position (the optimizer starts fresh). A source without the
    MTP module may start a model with one (docs/design.md §5): the module is then new, its embedding copied."""
    src_model, _, meta = checkpoint.load(source)
    grown = growth.grow_depth(src_model, t.mc.num_layers // max(1, src_model.config.num_layers))
    adds_mtp = src_model.mtp is None and t.model.mtp is not None
    if (grown.config.replace(num_nextn_predict_layers=1) if adds_mtp else grown.config) != t.mc:
        raise ValueError(
            f"init_from={source!r} is not allowed: stacking its {src_model.config.num_layers}-layer "
            f"model does not give this ModelConfig (depth must be a multiple and all else equal)"
        )
    t.model.load_state_dict(grown.state_dict(), strict=not adds_mtp)
    if adds_mtp:
        t.model.mtp.start_from(t.model)
    if t.cfg.init_keep_state:
        st = checkpoint.read_trainer_state(checkpoint.resolve(source))
        t.sampler.load_state_dict(st["sampler"])
        t.steps_done = t.resumed_from = int(meta["step"])
        t.tokens_seen = st["counters"]["tokens_seen"]


__all__ = [
    "RESUME_FREE_FIELDS",
    "checkpoint_meta",
    "config_diffs",
    "trainer_state",
    "save_checkpoint",
    "restore",
    "init_from",
]
