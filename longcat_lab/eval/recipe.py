"""What a fine-tuned checkpoint was trained with and what that cost (docs/design.md §5.4), read from its run folder:
the recipe and budget that the agentic evaluation records next to its pass^k (`results/agentic.json`).

- `sft_recipe(ckpt) -> dict | None`: the fine-tuning stage (steps, peak LR, context, rows per step), the data
  (dialogues kept, dialogues left out as longer than the context), the held-out dialogue loss and the
  pre-training validation loss per domain before and after (the forgetting), and the wall-clock minutes of the
  run's processes; None for a checkpoint that was not fine-tuned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longcat_lab import checkpoint
from longcat_lab.train.telemetry import read_metrics


def wall_minutes(train_rows: list[dict[str, Any]]) -> float:
    """Minutes the run's processes trained: each process's clock (`time_s`) restarts at 0, so the total is the sum
    of each process's last reading."""
    total, last = 0.0, 0.0
    for row in train_rows:
        t = float(row.get("time_s") or 0.0)
        if t < last:  # a resumed process
            total += last
        last = t
    return (total + last) / 60


def sft_recipe(ckpt: str | Path) -> dict[str, Any] | None:
    """Module docstring. `ckpt` is a checkpoint folder inside its run folder (`RUN/checkpoints/step_N`)."""
    ckpt = Path(ckpt)
    config = json.loads((ckpt / "train_config.json").read_text())
    if not config.get("sft_data"):
        return None
    step = int(checkpoint.read_meta(ckpt).get("step", 0))
    rows = [r for r in read_metrics(ckpt.parent.parent) if int(r.get("step", 0)) <= step]
    sft = [r for r in rows if r.get("kind") == "eval_sft"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    stage = config["stages"][-1]
    recipe: dict[str, Any] = {
        "init_from": config.get("init_from"),
        "steps": step,
        "lr": stage["lr"],
        "seq_len": stage["seq_len"],
        "rows_per_step": config["batch_size"] * config["grad_accum"],
        "sft_pretrain_ratio": config.get("sft_pretrain_ratio"),
        "sft_long_dialogues": config.get("sft_long_dialogues", "split"),
        "minutes": round(wall_minutes([r for r in rows if r.get("kind") == "train"]), 1),
    }
    if sft:
        recipe["dialogues_kept"] = sft[-1].get("dialogues_kept")
        recipe["dialogues_too_long"] = sft[-1].get("dialogues_too_long")
        recipe["held_out_loss"] = [sft[0]["sft_val_loss"], sft[-1]["sft_val_loss"]]
    if len(evals) >= 2:
        before, after = evals[0]["val_loss"], evals[-1]["val_loss"]
        recipe["forgetting"] = {d: [before[d], after[d]] for d in after if d in before}
    return recipe


__all__ = ["sft_recipe", "wall_minutes"]
