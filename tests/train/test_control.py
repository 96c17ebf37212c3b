"""Tests for the expert-bias controller (longcat_lab.train.control; docs/design.md §2.1, D4).

Checks the config validation, the paper's Eq. 2 and the sign rule against hand-computed updates, that every mode
holds the budget on the synthetic routing problem, that counts come from training forwards only and add up across
micro-batches, the exact state round trip, anti-windup, and that the bias never enters the weights.

Run: .venv/bin/python -m pytest tests/train/test_control.py -q
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from longcat_lab import LongCatLM
from longcat_lab.inference.generate import generate
from longcat_lab.model import presets
from longcat_lab.testing import SyntheticRouting, random_model
from longcat_lab.train.control import BiasController, ControllerConfig, resolve_target

MODES = ("paper", "pid", "sign")


def tiny_model(seed: int = 0, **overrides) -> LongCatLM:
    return random_model(presets.tiny(**overrides), seed, train=True)


def tokens(model: LongCatLM, batch: int = 4, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def set_counts(model: LongCatLM, counts: list[list[int]]) -> None:
    for block, c in zip(model.moe_blocks(), counts):
        block.router.expert_counts.copy_(torch.tensor(c))


# Config validation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("bias_controller", "pi"),
        ("bias_update_rate", -0.1),
        ("bias_update_rate", float("nan")),
        ("bias_update_decay", 0.0),
        ("bias_update_decay", 1.5),
        ("pid_gains", (1.0, 2.0)),
        ("pid_gains", (1.0, -1, 0)),
        ("integral_clamp", 0.0),
        ("output_clamp", -1.0),
        ("target_ffn_experts", -1.0),
    ],
)
def test_config_rejects_bad_values_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        ControllerConfig(**{field: value})
    message = str(info.value)
    assert field.split()[0] in message and repr(value)[:4] in message


def test_config_round_trips_through_dict_and_refuses_unknown_keys():
    cfg = ControllerConfig(bias_controller="pid", pid_gains=[0.1, 0.2, 0.3])
    assert cfg.pid_gains == (0.1, 0.2, 0.3)
    assert ControllerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="bias_controler"):
        ControllerConfig.from_dict({"bias_controler": "pid"})


def test_target_is_validated_against_the_model():
    model = tiny_model()  # K = 2, N = 4, Z = 2
    assert resolve_target(ControllerConfig(), model.config) == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match=r"target_ffn_experts=2\.5.*moe_topk=2"):
        BiasController(ControllerConfig(target_ffn_experts=2.5), model)
    no_zero = tiny_model(zero_expert_num=0)
    assert BiasController(ControllerConfig(), no_zero).target == 2
    with pytest.raises(ValueError, match="without zero experts"):
        BiasController(ControllerConfig(target_ffn_experts=1.0), no_zero)


# The update rules against hand computation ---------------------------------------------------------------------
def test_paper_mode_is_eq2_then_mean_centred():
    model = tiny_model()  # K = 2, N = 4, Z = 2, T = 10 tokens per layer
    counts = [[6, 4, 2, 0, 5, 3], [1, 1, 1, 1, 8, 8]]
    set_counts(model, counts)
    mu, K, N, target = 0.5, 2, 4, 1.0
    cfg = ControllerConfig(bias_controller="paper", bias_update_rate=mu, target_ffn_experts=target)
    report = BiasController(cfg, model).step()
    for block, c in zip(model.moe_blocks(), counts):
        T = sum(c) / K
        raw = [mu * (target / (K * N) - c[i] / (K * T)) for i in range(N)] + [0.0, 0.0]  # zero experts fixed
        shift = sum(raw[:N]) / N
        expected = torch.tensor([r - shift for r in raw])
        assert torch.allclose(block.router.e_score_correction_bias, expected, atol=1e-7)
        assert block.router.expert_counts.sum() == 0  # counts cleared
    assert report["ffn_experts_per_token"] == [1.2, 0.4]
    assert report["controller_error"] == pytest.approx(((1.0 - 1.2) + (1.0 - 0.4)) / 2)
    assert report["load_imbalance"] == [None, 1.0]  # layer 0 has a dead expert
    json.dumps(report, allow_nan=False)


def test_sign_mode_moves_each_ffn_bias_by_a_fixed_step():
    model = tiny_model()
    set_counts(model, [[6, 4, 2, 0, 5, 3], [3, 2, 2, 1, 6, 6]])
    mu, K, N, target = 0.4, 2, 4, 1.0
    BiasController(
        ControllerConfig(bias_controller="sign", bias_update_rate=mu, target_ffn_experts=target), model
    ).step()
    step = mu / (K * N)
    # Target share K_e/(K N) = 1/8 of the 20 slots = 2.5 selections: experts above it step down, below it up.
    raw = torch.tensor([[-step, -step, step, step, 0, 0], [-step, step, step, step, 0, 0]])
    expected = raw - raw[:, :N].mean(1, keepdim=True)
    got = torch.stack([b.router.e_score_correction_bias for b in model.moe_blocks()])
    assert torch.allclose(got, expected, atol=1e-7)


def test_pid_mode_is_a_clamped_pid_on_the_offset():
    model = tiny_model()
    K, N = 2, 4
    cfg = ControllerConfig(
        bias_controller="pid",
        bias_update_rate=0.0,
        target_ffn_experts=1.0,
        pid_gains=(2.0, 1.0, 4.0),
        integral_clamp=0.2,
        output_clamp=0.5,
    )
    ctl = BiasController(cfg, model)
    scale = 1 / (K * N)
    integral, prev = 0.0, None
    for counts_ffn in ([1, 1, 1, 1], [2, 2, 2, 2], [0, 0, 1, 1]):  # 10 tokens: 0.8, 1.6, 0.4 FFN experts/token
        c = counts_ffn + [(20 - sum(counts_ffn)) // 2, 20 - sum(counts_ffn) - (20 - sum(counts_ffn)) // 2]
        set_counts(model, [c, c])
        e = 1.0 - sum(counts_ffn) / 10
        integral = max(-0.2, min(0.2, integral + 1.0 * scale * e))
        d = 0.0 if prev is None else e - prev
        offset = max(-0.5, min(0.5, 2.0 * scale * e + integral + 4.0 * scale * d))
        prev = e
        report = ctl.step()
        for bias in (b.router.e_score_correction_bias for b in model.moe_blocks()):
            assert torch.allclose(bias[:N], torch.zeros(N), atol=1e-7)  # mu = 0: no balancing moves
            assert torch.allclose(bias[N:], torch.full((2,), -offset), atol=1e-6)
        assert report["ffn_zero_offset"] == pytest.approx([offset, offset], abs=1e-6)


def test_pid_with_only_ki_equal_mu_reproduces_the_paper_rule():
    """The 1/(K N) scaling puts the PID gains in mu's units: (0, mu, 0) is the paper's rule."""
    plant = SyntheticRouting(tokens=512, seed=3)
    paper = plant.run(ControllerConfig(bias_controller="paper", bias_update_rate=0.2), 15)
    bias_paper = torch.stack([b.router.e_score_correction_bias for b in plant.model.moe_blocks()])
    pid = plant.run(ControllerConfig(bias_controller="pid", bias_update_rate=0.2, pid_gains=(0, 0.2, 0)), 15)
    bias_pid = torch.stack([b.router.e_score_correction_bias for b in plant.model.moe_blocks()])
    assert [r["ffn_experts_per_token"] for r in paper] == [r["ffn_experts_per_token"] for r in pid]
    assert torch.allclose(bias_paper, bias_pid, atol=1e-6)


def test_integral_and_output_clamps_stop_windup():
    model = tiny_model()
    cfg = ControllerConfig(
        bias_controller="pid",
        target_ffn_experts=1.0,
        pid_gains=(50.0, 50.0, 0.0),
        integral_clamp=0.05,
        output_clamp=0.08,
    )
    ctl = BiasController(cfg, model)
    for _ in range(20):  # an unresponsive plant: every token keeps picking zero experts only
        set_counts(model, [[0, 0, 0, 0, 5, 5], [0, 0, 0, 0, 5, 5]])
        report = ctl.step()
    assert torch.allclose(ctl.integral_L, torch.full((2,), 0.05, dtype=torch.float64))
    assert report["ffn_zero_offset"] == pytest.approx([0.08, 0.08])
    # When the plant overshoots, one step of negative error turns the integral around; unclamped it would hold
    # 20 * 50 * 1/(K N) = 125 and keep pushing the wrong way for about 20 steps.
    set_counts(model, [[5, 5, 5, 5, 0, 0], [5, 5, 5, 5, 0, 0]])  # 2 FFN experts/token against a target of 1
    report = ctl.step()
    assert torch.allclose(ctl.integral_L, torch.full((2,), -0.05, dtype=torch.float64))
    assert report["ffn_zero_offset"] == pytest.approx([-0.08, -0.08])


def test_decay_shrinks_mu_every_step():
    model = tiny_model()
    ctl = BiasController(ControllerConfig(bias_update_rate=0.2, bias_update_decay=0.5), model)
    rates = []
    for _ in range(3):
        model(tokens(model, 1, 8))
        rates.append(ctl.step()["update_rate"])
    assert rates == pytest.approx([0.2, 0.1, 0.05])


# Closed loop on the synthetic problem ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plant():
    return SyntheticRouting(tokens=512, seed=0)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_holds_the_budget_within_2_percent(plant, mode):
    target = plant.model.config.uniform_ffn_experts  # 4.0, against ~3.4 at zero bias
    reports = plant.run(ControllerConfig(bias_controller=mode), 100)
    start = reports[0]["ffn_experts_per_token_mean"]
    assert abs(start - target) / target > 0.1  # the skew really puts the start far off target
    for r in reports[-10:]:
        assert abs(r["ffn_experts_per_token_mean"] - target) / target < 0.02
        assert all(abs(m - target) / target < 0.02 for m in r["ffn_experts_per_token"])
        assert all(x is not None and x < 1.6 for x in r["load_imbalance"])  # it starts above 15
    for block in plant.model.moe_blocks():
        b = block.router.e_score_correction_bias
        assert abs(float(b[:16].mean())) < 1e-6  # FFN biases mean-centred
        assert torch.allclose(b[16:], b[16:].mean().expand(8))  # zero experts share one bias


def test_mode_none_reports_clears_counts_and_leaves_the_bias(plant):
    reports = plant.run(ControllerConfig(bias_controller="none"), 3)
    assert reports[0]["load_imbalance"][0] > 10  # the plant's skew, untouched
    for block in plant.model.moe_blocks():
        assert torch.equal(block.router.e_score_correction_bias, torch.zeros(24))
        assert block.router.expert_counts.sum() == 0
    assert reports[-1]["ffn_experts_per_token"] == reports[0]["ffn_experts_per_token"]


# Counting: training forwards only, summed over micro-batches ----------------------------------------------------
def test_eval_forwards_leave_counts_alone():
    model = tiny_model().eval()
    ctl = BiasController(ControllerConfig(), model)
    model(tokens(model))
    with torch.no_grad():
        generate(model, tokens(model, 1, 4), max_new_tokens=3)
    assert all(b.router.expert_counts.sum() == 0 for b in model.moe_blocks())
    with pytest.raises(RuntimeError, match="training-mode forwards"):
        ctl.step()


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_give_the_same_update_as_one_batch(mode):
    cfg = ControllerConfig(bias_controller=mode, target_ffn_experts=1.0)
    whole, split = tiny_model(), tiny_model()
    ctl_whole, ctl_split = BiasController(cfg, whole), BiasController(cfg, split)
    for step in range(3):
        idx = tokens(whole, batch=6, seed=10 + step)
        whole(idx)
        for chunk in idx.split(2):  # 3 micro-batches of the same sequences
            split(chunk)
        counts_whole = [b.router.expert_counts.clone() for b in whole.moe_blocks()]
        counts_split = [b.router.expert_counts.clone() for b in split.moe_blocks()]
        assert all(torch.equal(a, b) for a, b in zip(counts_whole, counts_split))
        assert ctl_whole.step() == ctl_split.step()
    for a, b in zip(whole.moe_blocks(), split.moe_blocks()):
        assert torch.equal(a.router.e_score_correction_bias, b.router.e_score_correction_bias)


# Checkpointing --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_state_round_trips_exactly(mode):
    cfg = ControllerConfig(bias_controller=mode, target_ffn_experts=1.0, pid_gains=(0.2, 0.5, 0.1))
    model = tiny_model()
    ctl = BiasController(cfg, model)
    for step in range(4):
        model(tokens(model, seed=step))
        ctl.step()
    state = copy.deepcopy(ctl.state_dict())
    resumed_model = tiny_model(seed=5)  # different weights; only routing state matters
    resumed_model.load_state_dict(model.state_dict())
    for b in resumed_model.moe_blocks():
        b.router.e_score_correction_bias.zero_()  # the controller state must restore the bias itself
    resumed = BiasController(cfg, resumed_model)
    resumed.load_state_dict(state)
    for key in ("bias", "integral", "prev_error"):
        assert torch.equal(resumed.state_dict()[key], state[key])
    assert resumed.state_dict()["step"] == state["step"] == 4
    for step in range(4, 7):  # and both continue identically
        model(tokens(model, seed=step))
        resumed_model(tokens(model, seed=step))
        assert ctl.step() == resumed.step()


def test_load_state_dict_rejects_a_mismatched_state():
    model = tiny_model()
    ctl = BiasController(ControllerConfig(), model)
    state = ctl.state_dict()
    with pytest.raises(ValueError, match=r"bias has shape \(2, 5\)"):
        ctl.load_state_dict({**state, "bias": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="missing"):
        ctl.load_state_dict({"bias": state["bias"]})


def test_pid_starts_bumplessly_from_an_existing_offset():
    model = tiny_model()
    for b in model.moe_blocks():
        b.router.e_score_correction_bias.copy_(torch.tensor([0.01, -0.01, 0.0, 0.0, -0.03, -0.03]))
    ctl = BiasController(ControllerConfig(bias_controller="pid", bias_update_rate=0.0, target_ffn_experts=1.0), model)
    set_counts(model, [[1, 1, 1, 2, 3, 2], [1, 1, 1, 2, 3, 2]])  # 5 tokens, exactly 1 FFN expert/token: no error
    ctl.step()
    for b in model.moe_blocks():
        assert torch.allclose(
            b.router.e_score_correction_bias, torch.tensor([0.01, -0.01, 0.0, 0.0, -0.03, -0.03]), atol=1e-7
        )


# The bias changes selection only -------------------------------------------------------------------------------
def test_bias_never_enters_the_weights():
    model = tiny_model()
    ctl = BiasController(ControllerConfig(bias_controller="pid", target_ffn_experts=2.0), model)
    assert all("e_score_correction_bias" not in name for name, _ in model.named_parameters())
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(3):
        model(tokens(model, seed=step))
        ctl.step()
    assert all(torch.equal(p, params[name]) for name, p in model.named_parameters())
    offset = ctl.state_dict()["bias"][:, :4].mean() - ctl.state_dict()["bias"][:, 4:].mean()
    assert offset > 0  # the target pushed the FFN experts up
    out = model(tokens(model, seed=9), targets=tokens(model, seed=9), return_routing=True)
    loss, routing = out.loss, out.routing
    scale = model.config.routed_scaling_factor
    for layer in routing.layers:
        expected = scale * layer.router_logits.softmax(-1).gather(-1, layer.topk_ids)
        assert torch.allclose(layer.topk_weights, expected, atol=1e-7)
    loss.backward()
    for block in model.moe_blocks():
        assert not block.router.e_score_correction_bias.requires_grad
        assert block.router.classifier.weight.grad is not None
