"""Tests for the routing-health metrics (longcat_lab.train.metrics; docs/design.md §2.3, §3).

routing_health on hand-made routings (relative loads, dead/hot flags, imbalance), the gradient ratio R_g against
closed-form gradients (and that backward still works afterwards), router-row cosine similarity at its two extremes,
and tracking_summary on hand-made traces.

Run: .venv/bin/python -m pytest tests/train/test_metrics.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from longcat_lab import LongCatLM
from longcat_lab.model import presets
from longcat_lab.model.routing import LayerRouting, RouterOutput, Routing
from longcat_lab.testing import random_model
from longcat_lab.train.losses import LossConfig, aux_losses
from longcat_lab.train.metrics import (
    balance_grad_ratio,
    balance_grad_ratio_per_layer,
    router_cosine_similarity,
    routing_health,
    tracking_summary,
)


def tiny_model() -> LongCatLM:
    return random_model(presets.tiny(), 0, train=True)  # N = 4 FFN + Z = 2 zero experts, top-2, 2 layers


def routing_from_ids(ids_TK: torch.Tensor, E: int = 6, N: int = 4, logits: torch.Tensor | None = None):
    T = ids_TK.shape[0]
    if logits is None:
        logits = torch.zeros(T, E)
    probs = logits.softmax(-1)
    return LayerRouting.from_router(RouterOutput(ids_TK, probs.gather(1, ids_TK), logits, probs), N, 1, T)


def ids_with_counts(ffn_counts: list[int], zero_counts: list[int]) -> torch.Tensor:
    """Top-2 selections with exactly these per-expert counts: token t picks the t-th and the (T+t)-th entry of the
    sorted list (callers pick counts for which no token gets the same expert twice)."""
    flat = [e for e, c in enumerate(ffn_counts + zero_counts) for _ in range(c)]
    half = len(flat) // 2
    return torch.tensor([flat[:half], flat[half:]]).t()


def test_routing_health_on_hand_made_routing():
    model = tiny_model()
    layer0 = routing_from_ids(ids_with_counts([8, 4, 0, 4], [2, 2]))  # 10 tokens
    layer1 = routing_from_ids(torch.tensor([[3, 0], [3, 1], [3, 2]] + [[3, 4]] * 4 + [[3, 5]] * 3))  # [1, 1, 1, 10]
    model.moe_blocks()[1].router.e_score_correction_bias.copy_(torch.tensor([0.1, 0, 0, -0.1, 0.2, 0.2]))
    health = routing_health(Routing([layer0, layer1], torch.zeros(1, 10, 64), 4), model, target_ffn_experts=1.5)
    assert health["layer_index"] == [0, 1]
    assert health["relative_load"][0] == pytest.approx([2.0, 1.0, 0.0, 1.0])  # mean FFN load is 4
    assert health["dead"][0] == [False, False, True, False] and health["dead_count"] == [1, 0]
    assert health["hot"][1] == [False, False, False, True] and health["hot_count"] == [0, 1]
    assert health["relative_load"][1] == pytest.approx([1 / 3.25] * 3 + [10 / 3.25])
    assert health["load_imbalance"] == [None, 10.0]
    assert health["zero_relative_load"][0] == [1.0, 1.0]
    per_token = [(ids < 4).sum(-1).double() for ids in (layer0.topk_ids[0], layer1.topk_ids[0])]
    assert health["ffn_experts_mean"] == pytest.approx([1.6, 1.3])
    assert health["ffn_experts_std"] == pytest.approx([t.std(unbiased=False).item() for t in per_token])
    assert health["controller_error"] == pytest.approx([-0.1, 0.2])
    assert health["bias"][1] == pytest.approx([0.1, 0, 0, -0.1, 0.2, 0.2])
    json.dumps(health, allow_nan=False)


def test_routing_health_rejects_routing_of_another_model():
    model = tiny_model()
    with pytest.raises(ValueError, match="1 MoE layers but the model has 2"):
        routing_health(Routing([routing_from_ids(ids_with_counts([1, 1, 1, 1], [1, 1]))], torch.zeros(1), 4), model)


def test_balance_grad_ratio_against_closed_form_gradients():
    # LM loss = sum_t,e C[e] * p_t,e, so its gradient summed over T = 3 tokens is 3 C. The balance loss with
    # alpha = 0.5, K_e = 1 (N = 4, Z = 2, K = 2) has gradient alpha * f_group(e) w.r.t. P.
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    ids = torch.tensor([[0, 1], [0, 4], [2, 5]])  # 4 FFN picks, 2 zero picks, one FFN group
    layer = routing_from_ids(ids, logits=logits)
    routing = Routing([layer], torch.zeros(1, 3, 8), 4)
    C = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    lm_loss = (layer.router_probs * C).sum()
    cfg = tiny_model().config
    balance = aux_losses(routing, LossConfig(balance_loss_coef=0.5, hidden_z_loss_coef=0.0), cfg, 1.0)["balance_loss"]
    f = torch.tensor([4 / 3] * 4 + [2 / 3] * 2)  # 1/(K_e T) * 4 and 1/((K - K_e) T) * 2
    g_lb, g_lm = 0.5 * f, 3 * C
    assert balance_grad_ratio(lm_loss, balance, routing, tangent=False) == pytest.approx(
        (g_lb.norm() / g_lm.norm()).item(), rel=1e-5
    )
    tangent = (g_lb - g_lb.mean()).norm() / (g_lm - g_lm.mean()).norm()
    assert balance_grad_ratio(lm_loss, balance, routing) == pytest.approx(tangent.item(), rel=1e-5)
    (lm_loss + balance).backward()  # the graph was retained
    assert logits.grad is not None


def test_balance_grad_ratio_on_the_model_is_linear_in_alpha_and_keeps_the_graph():
    model = tiny_model().train()
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(idx, targets=idx, return_routing=True)
    loss, routing = out.loss, out.routing
    ratios = []
    for alpha in (1e-3, 2e-3):
        aux = aux_losses(routing, LossConfig(balance_loss_coef=alpha), model.config, 1.0)
        ratios.append(balance_grad_ratio(loss, aux["balance_loss"], routing))
        per_layer = balance_grad_ratio_per_layer(loss, aux["balance_loss"], routing)
        assert len(per_layer) == 2 and all(r > 0 for r in per_layer)
    assert ratios[0] > 0 and ratios[1] == pytest.approx(2 * ratios[0], rel=1e-5)
    (loss + aux["balance_loss"]).backward()
    assert all(b.router.classifier.weight.grad is not None for b in model.moe_blocks())
    off = aux_losses(routing, LossConfig(balance_loss_coef=0.0), model.config, 1.0)["balance_loss"]
    assert balance_grad_ratio(loss, off, routing) == 0.0


def test_router_cosine_similarity_extremes():
    model = tiny_model()
    with torch.no_grad():
        blocks = model.moe_blocks()
        blocks[0].router.classifier.weight.copy_(torch.randn(64).expand(6, 64))  # every row the same
        blocks[1].router.classifier.weight.copy_(torch.eye(6, 64) * 3)  # orthogonal rows
    assert router_cosine_similarity(model) == pytest.approx([1.0, 0.0], abs=1e-9)


def test_tracking_summary_on_hand_made_traces():
    s = tracking_summary([0.0, 0.5, 0.9, 1.05, 1.01, 1.0, 1.0, 1.0], target=1.0)
    assert s["settle_step"] == 5 and s["overshoot"] == pytest.approx(0.05)
    assert s["steady_state_error"] == 0.0 and s["late_rms_error"] == 0.0 and s["final"] == 1.0
    from_above = tracking_summary([2.0, 1.5, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0], target=1.0)
    assert from_above["overshoot"] == pytest.approx(0.1) and from_above["settle_step"] == 4
    assert tracking_summary([0.0, 0.5, 0.9, 0.95, 0.97, 0.97, 0.97, 1.0], 1.0)["settle_step"] is None  # too late
    zigzag = [0.0, 2.0] * 6  # a limit cycle around 1
    smoothed = tracking_summary(zigzag, 1.0, window=2)
    assert smoothed["settle_step"] == 2 and smoothed["late_rms_error"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="window=0"):
        tracking_summary([1.0], 1.0, window=0)
    with pytest.raises(ValueError, match="empty"):
        tracking_summary([], 1.0)
