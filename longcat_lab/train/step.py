"""The pieces of one optimizer step that `Trainer.step` puts together: `forward_backward` (every micro-batch's
forward and backward, its losses and R_g), `sdc_check` (the same step re-run from the same state and compared bit
for bit, docs/design.md §3.3 "SDC") and `StepResult`, what the step measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LongCatLM
from longcat_lab.model.mtp import mtp_loss
from longcat_lab.train import metrics
from longcat_lab.train.config import TrainConfig
from longcat_lab.train.losses import LOSS_KEYS, aux_losses


def step_loss_keys(model: LongCatLM) -> tuple[str, ...]:
    """What a step adds to the LM loss: the auxiliary losses and, for a model with the MTP module, the weighted MTP
    loss (0 in a stage without MTP weight)."""
    return (*LOSS_KEYS, "mtp_loss") if model.mtp is not None else LOSS_KEYS


log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class StepResult:
    """What one optimizer step measured (built by keyword); `Telemetry.row` adds throughput, memory and alerts."""

    step: int  # optimizer steps done, this one included
    stage_index: int
    lr: float
    losses: dict[str, float]  # loss (LM + aux), lm_loss and each of step_loss_keys, mean over micro-batches
    grad_norm: float  # before clipping
    skipped: bool  # non-finite loss or gradient: no update was made
    tokens: int
    tokens_seen: int
    skipped_total: int
    seconds: float  # wall time without the diagnostics (R_g, SDC re-run)
    controller: dict[str, Any]  # BiasController.step()'s report ({} for a skipped step)
    rg: float | None = None
    router_cosine: list[float] | None = None
    health: dict[str, Any] | None = None  # metrics.routing_health at R_g steps
    routing_stats: dict[str, Any] | None = None  # metrics.step_routing_stats of the last micro-batch
    sdc: dict[str, Any] | None = None

    @property
    def ffn_experts_per_token(self) -> float | None:
        return self.controller.get("ffn_experts_per_token_mean")


def forward_backward(
    model: LongCatLM,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    model_config: ModelConfig,
    target: float,
    mtp_weight: float,
    want_rg: bool,
):
    """Forward and backward over the micro-batches (gradients accumulate, each scaled by 1 / grad_accum); returns
    ([micro, 2 + len(step_loss_keys(model))] losses: total, LM, aux...), R_g (or None), the seconds R_g took, and
    the last micro-batch's routing. `target` is the controller's FFN-experts target the balance loss aims at. A batch
    may carry a third tensor, packed rows' segment ids (fine-tuning, `data.sft`). `mtp_weight` > 0 adds the MTP
    loss with that weight (the stage's `mtp_loss_weight`, docs/design.md §1.5)."""
    if mtp_weight and model.mtp is None:
        raise ValueError(
            f"mtp_loss_weight={mtp_weight} is not allowed for a model without an MTP module: set "
            "num_nextn_predict_layers=1 in the ModelConfig, or the weight to 0"
        )
    parts, rg, rg_time, routing, keys = [], None, 0.0, None, step_loss_keys(model)
    for i, (x, y, *segments) in enumerate(batches):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            seg = segments[0] if segments else None
            out = model(x, targets=y, return_routing=True, validate=False, segment_ids=seg)
            lm_loss, routing = out.loss, out.routing
            aux = aux_losses(routing, cfg.losses, model_config, target)
            if model.mtp is not None:
                aux["mtp_loss"] = (
                    mtp_weight * mtp_loss(model, routing.last_hidden, y, seg)
                    if mtp_weight
                    else torch.zeros_like(lm_loss)
                )
        loss = lm_loss + sum(aux[k] for k in keys)
        if want_rg and i == 0:
            t = time.perf_counter()
            rg = metrics.balance_grad_ratio(lm_loss, aux["balance_loss"], routing)
            rg_time = time.perf_counter() - t
        (loss / cfg.grad_accum).backward()
        parts.append(
            torch.stack([loss.detach().float(), lm_loss.detach().float(), *(aux[k].detach().float() for k in keys)])
        )
    return torch.stack(parts), rg, rg_time, routing


def sdc_check(
    model: LongCatLM,
    params: Sequence[torch.nn.Parameter],
    rerun: Callable[[], torch.Tensor],
    losses: torch.Tensor,
    counts_before: list[torch.Tensor],
    step: int,
) -> dict[str, Any]:
    """Re-run step `step` (`rerun()` repeats its forward and backward and returns its losses) from the state it
    started in, `counts_before` being the routers' counts then, and compare the losses and the gradients of
    `params` (every trained parameter) bit for bit. The routers' counts and the first run's gradients are restored
    afterwards: nothing counts twice."""
    blocks = model.moe_blocks()
    counts_after = [b.router.expert_counts.clone() for b in blocks]
    grads = [p.grad.clone() if p.grad is not None else None for p in params]
    for b, c in zip(blocks, counts_before):
        b.router.expert_counts.copy_(c)
    for p in params:
        p.grad = None
    losses2 = rerun()
    loss_match = torch.equal(losses, losses2)
    grad_mismatch, max_diff = 0, 0.0
    for p, g in zip(params, grads):
        g2 = p.grad
        if (g is None) != (g2 is None):
            grad_mismatch += 1
        elif g is not None and not torch.equal(g, g2):
            grad_mismatch += 1
            max_diff = max(max_diff, float((g - g2).abs().max()))
        p.grad = g
    for b, c in zip(blocks, counts_after):
        b.router.expert_counts.copy_(c)
    result = {
        "match": loss_match and grad_mismatch == 0,
        "loss_match": loss_match,
        "grad_mismatches": grad_mismatch,
        "max_grad_diff": max_diff,
        "max_loss_diff": float((losses - losses2).abs().max()),
    }
    if not result["match"]:
        log.warning("SDC check at step %d: re-running the step did not reproduce it bit for bit (%s)", step, result)
    return result


__all__ = ["StepResult", "forward_backward", "sdc_check", "step_loss_keys"]
