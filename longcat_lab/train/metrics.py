"""Routing health (paper App. A.1, 2.1.2, 3.1.3; docs/design.md §2-3): how many FFN experts tokens use, how evenly
FFN experts share the load, the balance-loss gradient ratio R_g, router-row similarity, and how well a controller
tracks its target over a run. Everything returns plain floats and lists, so it can be logged as JSON.

Shape legend: B batch, S sequence, T = B*S tokens, E = N + Z experts, N FFN experts, L MoE layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from longcat_lab._util import check_int
from longcat_lab.model.model import LongCatLM
from longcat_lab.model.routing import Routing

# An FFN expert below a tenth of its ideal share is dead, above three times it is hot (paper App. A.1;
# docs/design.md §2.3).
DEAD_LOAD = 0.1
HOT_LOAD = 3.0


def routing_health(routing: Routing, model: LongCatLM, target_ffn_experts: float | None = None) -> dict[str, Any]:
    """Per MoE layer (lists over layers): mean and std of FFN experts per token; each FFN expert's load relative to
    the ideal share (the FFN selections actually made, spread evenly, so a budget error does not show up as
    imbalance), dead (< 0.1) and hot (> 3) flags and counts, max/min FFN load (None when an expert got nothing), each
    zero expert's relative load (not flagged: zero experts are interchangeable), the bias values, and, when
    `target_ffn_experts` is given, the budget error target - measured."""
    N = model.config.n_routed_experts
    E = model.config.num_experts
    blocks = model.moe_blocks()
    moe_layers = [(i, r) for i, r in enumerate(routing.layers) if r is not None]
    if len(moe_layers) != len(blocks):
        raise ValueError(
            f"routing has {len(moe_layers)} MoE layers but the model has {len(blocks)}: "
            "pass the Routing returned by this model's forward"
        )
    out: dict[str, list] = {
        key: []
        for key in (
            "layer_index",
            "ffn_experts_mean",
            "ffn_experts_std",
            "relative_load",
            "zero_relative_load",
            "dead",
            "hot",
            "dead_count",
            "hot_count",
            "load_imbalance",
            "bias",
        )
    }
    errors = []
    for (index, layer), block in zip(moe_layers, blocks):
        with torch.no_grad():
            ffn_T = layer.ffn_experts_per_token.reshape(-1).double()
            counts_E = torch.bincount(layer.topk_ids.reshape(-1), minlength=E).double()
            ffn_N, zero_Z = counts_E[:N], counts_E[N:]
            rel_N = ffn_N / ffn_N.mean() if ffn_N.sum() > 0 else torch.zeros_like(ffn_N)
            rel_Z = zero_Z / zero_Z.mean() if zero_Z.numel() and zero_Z.sum() > 0 else torch.zeros_like(zero_Z)
            dead_N, hot_N = rel_N < DEAD_LOAD, rel_N > HOT_LOAD
            mean = ffn_T.mean().item()
            out["layer_index"].append(index)
            out["ffn_experts_mean"].append(mean)
            out["ffn_experts_std"].append(ffn_T.std(unbiased=False).item())
            out["relative_load"].append(rel_N.tolist())
            out["zero_relative_load"].append(rel_Z.tolist())
            out["dead"].append(dead_N.tolist())
            out["hot"].append(hot_N.tolist())
            out["dead_count"].append(int(dead_N.sum()))
            out["hot_count"].append(int(hot_N.sum()))
            lo, hi = ffn_N.min().item(), ffn_N.max().item()
            out["load_imbalance"].append(hi / lo if lo > 0 else None)
            out["bias"].append(block.router.e_score_correction_bias.tolist())
            errors.append(None if target_ffn_experts is None else target_ffn_experts - mean)
    if target_ffn_experts is not None:
        out["controller_error"] = errors
    return out


def _probs_for_grad(probs: torch.Tensor) -> torch.Tensor:
    """The tensor the losses actually reach: the model hands out router_probs as a [B, S, E] view of the router's
    [T, E] softmax, and the LM path gathers from that base, not from the view."""
    return probs._base if probs._base is not None else probs


def balance_grad_ratio_per_layer(
    lm_loss: torch.Tensor, balance_loss: torch.Tensor, routing: Routing, tangent: bool = True
) -> list[float]:
    """R_g of each MoE layer; see `balance_grad_ratio`."""
    return _grad_ratio(lm_loss, balance_loss, routing, tangent, per_layer=True)


def balance_grad_ratio(
    lm_loss: torch.Tensor, balance_loss: torch.Tensor, routing: Routing, tangent: bool = True
) -> float:
    """R_g = ||grad_P (alpha L_LB)|| / ||grad_P L_LM|| over all MoE layers together (docs/design.md §2.3; keep it
    below 0.1).

    P is the batch-mean expert-probability vector. L_LB depends on the router probabilities only through P, so its
    gradient w.r.t. P is the sum over tokens of its gradient w.r.t. each token's probabilities; we use the same sum
    for L_LM (its derivative along a shift of every token's probabilities by the same vector).
    `tangent=True` first removes each gradient's mean over experts: probabilities live on the simplex, so that
    component cannot move the router, and for L_LB it is most of the vector (grad_P = alpha * f with every f_j near
    1 at balance), which would make the raw ratio look large while the loss barely steers routing. `tangent=False`
    gives the raw ratio. Pass the balance loss with alpha applied, as `aux_losses` returns it.
    Uses torch.autograd.grad with retain_graph=True, so the caller can still call backward; it costs about one extra
    backward, so call it at logging steps only."""
    return _grad_ratio(lm_loss, balance_loss, routing, tangent, per_layer=False)


def _grad_ratio(lm_loss, balance_loss, routing, tangent, per_layer):
    probs = [_probs_for_grad(layer.router_probs) for layer in routing.layers if layer is not None]
    if not probs or not balance_loss.requires_grad:
        return [0.0] * len(probs) if per_layer else 0.0
    if not lm_loss.requires_grad:
        raise ValueError("lm_loss does not require grad: compute it in a training forward, without torch.no_grad()")

    def grads_P(loss):
        grads = torch.autograd.grad(loss, probs, retain_graph=True, allow_unused=True)
        out = []
        for p, g in zip(probs, grads):
            g_E = (
                torch.zeros(p.shape[-1], dtype=p.dtype, device=p.device)
                if g is None
                else g.reshape(-1, g.shape[-1]).sum(0)
            )
            out.append(g_E - g_E.mean() if tangent else g_E)
        return out

    lm_P, lb_P = grads_P(lm_loss), grads_P(balance_loss)

    def ratio(num, den):
        n, d = num.norm().item(), den.norm().item()
        return n / d if d > 0 else (math.inf if n > 0 else 0.0)

    if per_layer:
        return [ratio(b, a) for a, b in zip(lm_P, lb_P)]
    return ratio(torch.cat(lb_P), torch.cat(lm_P))


@torch.no_grad()
def step_routing_stats(routing: Routing) -> dict[str, float | None]:
    """Per-step signals of a run's basin (cheap: one reduction each over tensors the step already holds):
    router_entropy, the mean over MoE layers and tokens of the router's softmax entropy (nats; log E when it
    cannot tell experts apart, falling as it commits), and step_max_hidden, the largest |hidden state| entering
    the final norm (the quantity the hidden z-loss of docs/design.md §3.4 pulls down)."""
    entropies = []
    for layer in routing.layers:
        if layer is not None:
            p_TE = layer.router_probs.detach().reshape(-1, layer.router_probs.shape[-1]).double()
            entropies.append(-(p_TE * p_TE.clamp_min(1e-30).log()).sum(-1).mean().item())
    return {
        "router_entropy": sum(entropies) / len(entropies) if entropies else None,
        "step_max_hidden": routing.last_hidden.detach().abs().max().item(),
    }


@torch.no_grad()
def router_cosine_similarity(model: LongCatLM) -> list[float]:
    """Mean pairwise cosine similarity of the router's rows (one per expert), per MoE layer. Rising toward 1 means
    the routers stop telling experts apart, the collapse an overweighted balance loss causes (paper 2.1.2)."""
    out = []
    for block in model.moe_blocks():
        W_ED = torch.nn.functional.normalize(block.router.classifier.weight.double(), dim=-1)
        E = W_ED.shape[0]
        sim_EE = W_ED @ W_ED.t()
        out.append(((sim_EE.sum() - sim_EE.diagonal().sum()) / (E * (E - 1))).item() if E > 1 else 1.0)
    return out


def tracking_summary(values: Sequence[float], target: float, tol: float = 0.02, window: int = 1) -> dict[str, Any]:
    """How a trace of measured FFN experts per token (one value per optimizer step) tracks `target`.

    - settle_step: the first step (1-based) from which the trace stays within tol * target to the end; None if it
      never does, or only does so for less than the last quarter of the run (too short to call settled).
    - overshoot: the largest excursion past the target in the direction of the initial error, as a fraction of the
      target (the same unit as tol); 0 if the trace never crosses.
    - steady_state_error: mean |value - target| / target over the last quarter of the trace.
    - late_rms_error: root-mean-square of (value - target) / target over the last quarter of the *unsmoothed* trace,
      so that a limit cycle the moving average hides still shows.
    `window` > 1 first takes a trailing moving average, for noisy traces (a training run's per-batch mean)."""
    check_int("window", window)
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol={tol!r} is not allowed: it must be a number > 0")
    raw = torch.as_tensor(list(values), dtype=torch.float64)
    if raw.numel() == 0:
        raise ValueError("values is empty: expected one measurement per step")
    v = raw
    if window > 1:
        c = torch.cat([torch.zeros(1, dtype=v.dtype), v.cumsum(0)])
        idx = torch.arange(1, v.numel() + 1)
        v = (c[idx] - c[(idx - window).clamp(min=0)]) / (idx - (idx - window).clamp(min=0))
    scale = abs(target) if target != 0 else 1.0  # target 0: tolerances become absolute
    err = (v - target) / scale
    n = v.numel()
    n_tail = max(1, n // 4)
    outside = (err.abs() > tol).nonzero()
    first_in = 0 if outside.numel() == 0 else int(outside[-1]) + 1  # 0-based start of the final in-band run
    settle = first_in + 1 if first_in <= n - n_tail else None
    direction = 1.0 if v[0] < target else -1.0  # which way the trace has to travel
    overshoot = max(0.0, (direction * err).max().item())
    raw_tail = (raw[-n_tail:] - target) / scale
    return {
        "settle_step": settle,
        "overshoot": overshoot,
        "steady_state_error": err[-n_tail:].abs().mean().item(),
        "late_rms_error": raw_tail.pow(2).mean().sqrt().item(),
        "final": v[-1].item(),
    }


__all__ = [
    "DEAD_LOAD",
    "HOT_LOAD",
    "routing_health",
    "balance_grad_ratio",
    "balance_grad_ratio_per_layer",
    "router_cosine_similarity",
    "step_routing_stats",
    "tracking_summary",
]
