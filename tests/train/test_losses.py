"""Tests for the auxiliary losses (longcat_lab.train.losses; docs/design.md §2.2, §3.1).

Each loss against a value computed by hand on a tiny input, the balance loss's gradient against its closed form,
and aux_losses' contract with the trainer: exact keys, 0-dim tensors, coefficients applied, per-layer sums, the bias
untouched.

Run: .venv/bin/python -m pytest tests/train/test_losses.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from longcat_lab.model import presets
from longcat_lab.model.routing import LayerRouting, RouterOutput
from longcat_lab.testing import random_model
from longcat_lab.train.losses import (
    LOSS_KEYS,
    LossConfig,
    aux_losses,
    balance_loss_layer,
    hidden_z_loss,
    router_z_loss_layer,
)

# Two tokens over N = 2 FFN experts + Z = 1 zero expert, top-2.
PROBS = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
IDS = [[0, 1], [1, 2]]  # token 0: two FFN experts; token 1: one FFN expert and the zero expert


def layer_routing(probs, ids, n_ffn: int, requires_grad: bool = False) -> LayerRouting:
    logits = torch.tensor(probs, dtype=torch.float32).log().requires_grad_(requires_grad)
    probs_TE = logits.softmax(-1)
    ids_TK = torch.tensor(ids)
    routed = RouterOutput(ids_TK, probs_TE.gather(1, ids_TK), logits, probs_TE)
    return LayerRouting.from_router(routed, n_ffn, 1, ids_TK.shape[0])


def test_balance_loss_matches_hand_computation_one_group():
    # K_e = 1: f_ffn = D/(K_e T) * 3 FFN picks = 1.5, f_zero = 1/((K - K_e) T) * 1 zero pick = 0.5;
    # P_ffn = (0.8 + 0.7)/2 = 0.75, P_zero = 0.25  ->  1.5 * 0.75 + 0.5 * 0.25 = 1.25
    layer = layer_routing(PROBS, IDS, n_ffn=2)
    assert balance_loss_layer(layer, n_ffn=2, top_k=2, target_ffn_experts=1.0).item() == pytest.approx(1.25)


def test_balance_loss_matches_hand_computation_two_groups():
    # D = 2 groups {0}, {1}: P = 0.3, 0.45, zero 0.25; picks 1, 2, zero 1; f = 2/(1*2)*[1, 2] = [1, 2], f_zero = 0.5
    # -> 0.3 + 0.9 + 0.125 = 1.325
    layer = layer_routing(PROBS, IDS, n_ffn=2)
    got = balance_loss_layer(layer, n_ffn=2, top_k=2, target_ffn_experts=1.0, groups=2)
    assert got.item() == pytest.approx(1.325)


def test_balance_loss_is_one_at_the_balanced_target_whatever_the_probabilities():
    # N = 4, Z = 2, K = 2, D = 2, K_e = 4/3, three tokens: each FFN group gets 2 picks, zero experts 2, so every
    # f_j = 1 and the loss is sum_j P_j = 1.
    probs = torch.softmax(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)), -1).tolist()
    layer = layer_routing(probs, [[0, 1], [2, 4], [3, 5]], n_ffn=4)
    got = balance_loss_layer(layer, n_ffn=4, top_k=2, target_ffn_experts=4 / 3, groups=2)
    assert got.item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_gradient_is_f_over_T_and_counts_carry_none():
    layer = layer_routing(PROBS, IDS, n_ffn=2, requires_grad=True)
    probs = layer.router_probs
    probs.retain_grad()
    balance_loss_layer(layer, n_ffn=2, top_k=2, target_ffn_experts=1.0).backward()
    expected = torch.tensor([[1.5, 1.5, 0.5], [1.5, 1.5, 0.5]]) / 2  # f of each expert's group, / T
    assert torch.allclose(probs.grad[0], expected)


def test_hidden_z_loss_matches_hand_computation():
    z = torch.tensor([[[1.0, -2.0], [0.0, 0.5]]])  # [B=1, S=2, D=2]
    expected = (math.log(math.e + math.e**2) ** 2 + math.log(1 + math.e**0.5) ** 2) / 2
    assert hidden_z_loss(z).item() == pytest.approx(expected, rel=1e-6)
    assert hidden_z_loss(z.to(torch.bfloat16)).dtype == torch.float32  # computed in fp32 whatever the model


def test_router_z_loss_matches_hand_computation():
    layer = layer_routing(PROBS, IDS, n_ffn=2)
    layer.router_logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    expected = (math.log(math.e + math.e**2 + math.e**3) ** 2 + math.log(3) ** 2) / 2
    assert router_z_loss_layer(layer).item() == pytest.approx(expected, rel=1e-6)


def test_loss_config_validation_names_field_and_value():
    for field, value in [
        ("balance_loss_coef", -1.0),
        ("hidden_z_loss_coef", float("inf")),
        ("router_z_loss_coef", "1e-3"),
        ("balance_groups", 0),
        ("balance_groups", 1.5),
    ]:
        with pytest.raises(ValueError, match=f"{field}={value!r}".replace("(", r"\(").replace(".", r"\.")):
            LossConfig(**{field: value})
    with pytest.raises(ValueError, match="balance_grops"):
        LossConfig.from_dict({"balance_grops": 2})
    assert LossConfig.from_dict(LossConfig(balance_groups=2).to_dict()) == LossConfig(balance_groups=2)


@pytest.fixture(scope="module")
def forward():
    model = random_model(presets.tiny(), 0, train=True)
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, idx


def test_aux_losses_contract(forward):
    model, idx = forward
    out = model(idx, targets=idx, return_routing=True)
    loss, routing = out.loss, out.routing
    cfg = LossConfig(balance_loss_coef=0.01, balance_groups=2, hidden_z_loss_coef=1e-4, router_z_loss_coef=1e-3)
    target = model.config.uniform_ffn_experts
    out = aux_losses(routing, cfg, model.config, target)
    assert tuple(out) == LOSS_KEYS
    assert all(v.dim() == 0 and v.dtype == torch.float32 and v.requires_grad for v in out.values())
    layers = [r for r in routing.layers if r is not None]
    assert len(layers) == 2
    balance = sum(balance_loss_layer(r, 4, 2, target, 2) for r in layers)
    assert torch.allclose(out["balance_loss"], 0.01 * balance)
    assert torch.allclose(out["router_z_loss"], 1e-3 * sum(router_z_loss_layer(r) for r in layers))
    assert torch.allclose(out["hidden_z_loss"], 1e-4 * hidden_z_loss(routing.last_hidden))
    model.zero_grad()
    (loss + sum(out.values())).backward()
    for block in model.moe_blocks():
        assert block.router.classifier.weight.grad.abs().sum() > 0
        assert not block.router.e_score_correction_bias.requires_grad


def test_zero_coefficients_turn_losses_off(forward):
    model, idx = forward
    routing = model(idx, targets=idx, return_routing=True).routing
    cfg = LossConfig(balance_loss_coef=0.0, hidden_z_loss_coef=0.0, router_z_loss_coef=0.0)
    out = aux_losses(routing, cfg, model.config, 1.0)
    assert all(v.item() == 0.0 and not v.requires_grad for v in out.values())


def test_aux_losses_reject_bad_target_or_groups(forward):
    model, idx = forward
    routing = model(idx, targets=idx, return_routing=True).routing
    with pytest.raises(ValueError, match=r"target_ffn_experts=3\.0.*moe_topk=2"):
        aux_losses(routing, LossConfig(), model.config, 3.0)
    with pytest.raises(ValueError, match="balance_groups=3.*n_routed_experts=4"):
        aux_losses(routing, LossConfig(balance_groups=3), model.config, 1.0)
