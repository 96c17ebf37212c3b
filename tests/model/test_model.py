"""Tests of the core model: shapes, causality, dispatch against a per-token reference loop, the router bias, zero
experts, the MoE's start / compute / finish seam and where a layer runs its experts, parameter accounting, input
validation and the KV cache.

Run: `python -m pytest tests/model/test_model.py` inside .venv.
"""

import pytest
import torch
import torch.nn.functional as F

from longcat_lab import LatentCache, ModelConfig
from longcat_lab.inference.generate import generate
from longcat_lab.model import EXPERTS_AFTER, MoE, accounting, presets, rope_angles
from longcat_lab.model.ops.expert_dispatch import _scratch
from longcat_lab.testing import random_ids, random_model


def reference_moe(moe: MoE, u_TD: torch.Tensor) -> torch.Tensor:
    """The obviously-correct MoE: for every token, for every chosen expert, add weight * expert(token)."""
    router, experts = moe.router, moe.experts
    probs = torch.softmax(u_TD.float() @ router.classifier.weight.float().t(), dim=-1)
    chosen = torch.topk(probs + router.e_score_correction_bias, router.top_k, dim=-1).indices
    rows = []
    for t in range(u_TD.shape[0]):
        acc = torch.zeros_like(u_TD[t])
        for e in chosen[t].tolist():
            w = router.scale * probs[t, e]
            if e >= experts.n_ffn:
                y = u_TD[t]
            else:
                gate, up = (experts.gate_up_proj[e] @ u_TD[t]).chunk(2)
                y = experts.down_proj[e] @ (F.silu(gate) * up)
            acc = acc + w * y
        rows.append(acc)
    return torch.stack(rows)


def test_shapes_and_routing_record():
    model = random_model(train=True)
    c = model.config
    idx = random_ids(c, (3, 11))
    out = model(idx, targets=idx, return_routing=True)
    logits, loss, routing = out.logits, out.loss, out.routing
    assert logits.shape == (3, 11, c.vocab_size) and logits.dtype == torch.float32
    assert loss.shape == () and torch.isfinite(loss)
    assert len(routing.layers) == c.num_layers
    r = routing.layers[0]
    assert r.topk_ids.shape == (3, 11, c.moe_topk) and r.topk_weights.shape == (3, 11, c.moe_topk)
    assert r.router_probs.shape == (3, 11, c.num_experts)
    assert torch.equal(r.ffn_experts_per_token, (r.topk_ids < c.n_routed_experts).sum(-1))
    assert routing.last_hidden.shape == (3, 11, c.hidden_size)
    assert model(idx).loss is None


def earlier_logits_change(model, t: int = 9) -> float:
    """The largest change in the logits of positions < t when token t changes (batch of 2, 16 positions)."""
    idx = random_ids(model.config, (2, 16))
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 7) % model.config.vocab_size
    a, b = model(idx).logits, model(changed).logits
    assert not torch.allclose(a[:, t:], b[:, t:])  # the change does reach its own and later positions
    return (a[:, :t] - b[:, :t]).abs().max().item()


def test_causality(monkeypatch):
    """Changing token t must not change the logits before t. Attention and the dense FFNs keep those rows exactly
    (the "dense" style shows it), but an MoE layer does not: token t's new experts change how many rows each
    expert's GEMM sees, and a GEMM over a different row count may round the other rows differently (measured up to
    1.2e-7). So MoE styles get a tolerance of a few ulps of these O(1) logits, and the same check on a model whose
    attention sees the future shows a real leak moves the earlier logits by far more than that tolerance."""
    assert earlier_logits_change(random_model(presets.tiny(layer_style="dense"))) == 0.0
    for style in ("scmoe", "vanilla"):
        assert earlier_logits_change(random_model(presets.tiny(layer_style=style))) <= 1e-6

    sdpa = F.scaled_dot_product_attention

    def leaky(q, k, v, attn_mask=None, is_causal=False, scale=None):
        return sdpa(q, k, v, scale=scale)  # every query sees every key, future ones included

    monkeypatch.setattr(F, "scaled_dot_product_attention", leaky)
    assert earlier_logits_change(random_model()) > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dispatch_matches_reference_loop(seed):
    model = random_model(seed=seed, train=True)
    moe = model.layers[0].mlp
    g = torch.Generator().manual_seed(seed)
    # Confident router rows and a small non-zero bias, so that tokens disagree and both kinds of expert are chosen.
    with torch.no_grad():
        moe.router.classifier.weight.normal_(0.0, 0.5, generator=g)
        moe.router.e_score_correction_bias.copy_(torch.randn(model.config.num_experts, generator=g) * 0.02)
    u = torch.randn(1, 40, model.config.hidden_size, generator=g)
    u1, u2 = u.clone().requires_grad_(), u.clone().requires_grad_()
    ours, routing = moe(u1)
    ids = routing.topk_ids
    assert (ids >= model.config.n_routed_experts).any() and (ids < model.config.n_routed_experts).any()
    ref = reference_moe(moe, u2[0])[None]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(ours)
    grads_ours = torch.autograd.grad((ours * weight).sum(), [u1, *moe.parameters()])
    grads_ref = torch.autograd.grad((ref * weight).sum(), [u2, *moe.parameters()])
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bias_changes_selection_not_weights():
    model = random_model(train=True)
    moe = model.layers[0].mlp
    u = torch.randn(1, 32, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    _, before = moe(u)
    probs = before.router_probs
    moe.router.e_score_correction_bias[0] = 5.0  # expert 0 now always wins a slot
    _, after = moe(u)
    assert (after.topk_ids == 0).any(-1).all()
    assert not torch.equal(before.topk_ids, after.topk_ids)
    torch.testing.assert_close(after.router_probs, probs)  # the bias never enters the probabilities...
    expected = moe.router.scale * probs.gather(-1, after.topk_ids)
    torch.testing.assert_close(after.topk_weights, expected)  # ...nor the weights


@pytest.mark.parametrize("first", ["inference", "training"])
def test_dispatch_scratch_buffers_survive_mode_switches(first):
    """The dispatch reuses CPU scratch buffers across calls; one made under inference mode must not turn the next
    training step into an error (inference tensors cannot be written outside it), nor the other way round."""
    _scratch.buffers.clear()  # so that the first call below is the one that creates them
    model = random_model(train=True)
    moe = model.layers[0].mlp
    u = torch.randn(1, 50, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    ref = reference_moe(moe, u[0])[None].detach()

    def inference():
        with torch.inference_mode():
            torch.testing.assert_close(moe(u)[0], ref, rtol=1e-5, atol=1e-6)

    def training():
        x = u.clone().requires_grad_()
        out = moe(x)[0]
        out.sum().backward()
        torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)

    steps = [inference, training] if first == "inference" else [training, inference]
    for step in steps + steps:
        step()


def test_all_zero_experts_return_weighted_input():
    model = random_model(train=True)
    c = model.config
    moe = model.layers[1].mlp
    moe.router.e_score_correction_bias[c.n_routed_experts :] = 10.0  # force every choice onto zero experts
    u = torch.randn(2, 7, c.hidden_size, generator=torch.Generator().manual_seed(4))
    out, routing = moe(u)
    assert (routing.topk_ids >= c.n_routed_experts).all()
    assert (routing.ffn_experts_per_token == 0).all()
    torch.testing.assert_close(out, routing.topk_weights.sum(-1, keepdim=True) * u)


def test_moe_start_compute_finish_is_forward_and_compute_runs_once():
    moe = random_model(train=True).layers[0].mlp
    u = torch.randn(2, 5, moe.router.classifier.in_features, generator=torch.Generator().manual_seed(7))
    out, routing = moe(u)
    pending = moe.compute(moe.start(u))
    state = pending.state
    assert pending.computed and moe.compute(pending).state is state  # a second compute is a no-op
    staged, staged_routing = moe.finish(pending)
    assert torch.equal(staged, out) and torch.equal(staged_routing.topk_ids, routing.topk_ids)
    assert moe.finish(moe.start(u), return_routing=False)[1] is None


def test_layer_output_and_gradients_do_not_depend_on_where_experts_run():
    """`experts_after` moves the experts' work between the dense parts of a layer (for overlap), never the result:
    outputs and every gradient are bit-identical."""
    model = random_model(seed=4, bias_std=0.1, train=True)
    layer = model.layers[0]
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(8))
    cos, sin = rope_angles(model.config, torch.arange(7))
    runs = []
    for where in EXPERTS_AFTER:
        layer.experts_after = where
        xg = x.clone().requires_grad_()
        out, _ = layer(xg, cos, sin)
        params = list(layer.parameters())
        runs.append([out, *torch.autograd.grad((out * out).sum(), [xg, *params])])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    with pytest.raises(ValueError, match="experts_after='mla1' is not allowed"):
        layer.experts_after = "mla1"


@pytest.mark.parametrize("style", ["scmoe", "vanilla", "dense"])
def test_param_count_closed_form(style):
    model = random_model(presets.tiny(layer_style=style), train=True)
    counts = accounting.param_counts(model.config)
    assert model.num_params() == counts["total"]
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert expert_params == counts["experts"]


def test_vanilla_same_params_different_function():
    sc, va = (random_model(presets.tiny(layer_style=style)) for style in ("scmoe", "vanilla"))
    assert sc.num_params() == va.num_params()
    va.load_state_dict(sc.state_dict())
    idx = random_ids(sc.config, (1, 12))
    assert not torch.allclose(sc(idx).logits, va(idx).logits)  # same weights, different wiring


def test_released_accounting_matches_paper():
    c = presets.released()
    total = accounting.param_counts(c)["total"]
    act = accounting.activated_params(c)
    assert 560e9 < total < 561e9  # paper: 560B (MTP excluded)
    assert round(act["min"] / 1e9, 1) == 18.7  # paper: 18.6B with no FFN expert chosen
    assert round(act["max"] / 1e9, 1) == 31.4  # paper: 31.3B with 12 FFN experts
    assert 26.5e9 < act["mean"] < 27.5e9  # paper: ~27B on average (K_e ~ 8)


def test_every_expert_gets_gradient_when_forced_balanced():
    model = random_model(train=True)
    for moe in model.moe_blocks():
        moe.router.force_balanced = True
    idx = random_ids(model.config, (2, 12))
    loss = model(idx, targets=idx).loss
    loss.backward()
    for moe in model.moe_blocks():
        per_expert = moe.experts.gate_up_proj.grad.abs().sum(dim=(1, 2))
        assert (per_expert > 0).all()
        assert (moe.experts.down_proj.grad.abs().sum(dim=(1, 2)) > 0).all()
        assert moe.router.classifier.weight.grad.abs().sum() > 0


def test_counts_only_in_training_forwards():
    model = random_model(train=True)
    idx = random_ids(model.config, (2, 10))
    model.eval()
    model(idx)
    assert all(int(m.router.expert_counts.sum()) == 0 for m in model.moe_blocks())
    model.train()
    model(idx)
    for m in model.moe_blocks():
        assert int(m.router.expert_counts.sum()) == 2 * 10 * model.config.moe_topk
    assert "expert_counts" not in "".join(model.state_dict())  # non-persistent


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("hidden_size", 0, "hidden_size=0"),
        ("num_layers", -1, "num_layers=-1"),
        ("vocab_size", 3.5, "vocab_size=3.5"),
        ("zero_expert_num", -2, "zero_expert_num=-2"),
        ("moe_topk", 7, "moe_topk=7"),
        ("moe_topk", 0, "moe_topk=0"),
        ("head_dim", 16, "head_dim=16"),
        ("qk_rope_head_dim", 7, "qk_rope_head_dim=7"),
        ("layer_style", "shortcut", "layer_style='shortcut'"),
        ("routed_scaling_factor", -1.0, "routed_scaling_factor=-1.0"),
        ("rms_norm_eps", float("nan"), "rms_norm_eps=nan"),
    ],
)
def test_config_validation(field, value, fragment):
    overrides = {field: value}
    if field == "qk_rope_head_dim":
        overrides["head_dim"] = value
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")) as err:
        presets.tiny(**overrides)
    assert "allowed" in str(err.value)


def test_config_round_trip_and_unknown_field():
    c = presets.tiny()
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelConfig.from_dict({**c.to_dict(), "hidden_sise": 3})


@pytest.mark.parametrize(
    "bad,fragment",
    [
        (torch.zeros(5, dtype=torch.long), "expected 2 dims"),
        (torch.zeros(1, 5), "dtype torch.float32"),
        (torch.full((1, 5), 512), "token ids from 512 to 512"),
        (torch.full((1, 5), -1), "token ids from -1"),
        (torch.zeros(1, 600, dtype=torch.long), "max_position_embeddings=512"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        ([1, 2, 3], "must be a torch.Tensor"),
    ],
)
def test_bad_input(bad, fragment):
    model = random_model(train=True)
    with pytest.raises(ValueError, match=fragment):
        model(bad)


def test_bad_targets_and_generation_args():
    model = random_model(train=True)
    idx = random_ids(model.config, (1, 6))
    with pytest.raises(ValueError, match="targets has shape"):
        model(idx, targets=idx[:, :3])
    targets = idx.clone()
    targets[0, 0] = -100  # ignore_index is allowed in targets
    model(idx, targets=targets)
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(model, idx, 3, temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        generate(model, idx, 3, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens=600"):
        generate(model, idx, 600)


def test_kv_cache_matches_full_recompute():
    model = random_model()
    c = model.config
    idx = random_ids(c, (2, 14))
    full = model(idx).logits
    cache = LatentCache(2 * c.num_layers)
    parts = [model(idx[:, :5], cache=cache).logits, model(idx[:, 5:6], cache=cache).logits]
    parts.append(model(idx[:, 6:], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    # The cache holds the MLA latent: (kv_lora_rank + qk_rope_head_dim) per block, fp32.
    assert cache.bytes_per_token() == (c.kv_lora_rank + c.qk_rope_head_dim) * 2 * c.num_layers * 4
    greedy_cached = generate(model, idx[:, :4], 20)
    greedy_full = generate(model, idx[:, :4], 20, use_cache=False)
    assert torch.equal(greedy_cached, greedy_full)


def test_sampling_is_seeded_and_top_p_limits_choices():
    model = random_model()
    idx = random_ids(model.config, (1, 4))
    a = generate(model, idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = generate(model, idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    greedy = generate(model, idx, 12)
    tiny_p = generate(model, idx, 12, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(6))
    assert torch.equal(greedy, tiny_p)  # top_p -> 0 keeps only the most likely token
    assert model.training is False


def test_bf16_autocast_trains():
    model = random_model(train=True)
    idx = random_ids(model.config, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, targets=idx).loss
    loss.backward()
    assert torch.isfinite(loss)
    grad = model.layers[0].mlp.experts.gate_up_proj.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_expert_dispatch_under_bf16_autocast_tracks_fp32():
    """The hand-written expert backward casts by itself under autocast; its bf16 outputs and gradients must stay
    within bf16 rounding of the fp32 ones (relative error of each tensor's norm)."""
    model = random_model(seed=3, train=True)
    moe = model.layers[0].mlp
    with torch.no_grad():
        moe.router.classifier.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    u = torch.randn(1, 48, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    weight = torch.randn(u.shape, generator=torch.Generator().manual_seed(6))

    def run(bf16: bool):
        x = u.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = moe(x)[0]
        grads = torch.autograd.grad((out.float() * weight).sum(), [x, *moe.parameters()])
        return [out.float(), *grads]

    errors = [((low - ref).norm() / ref.norm()).item() for low, ref in zip(run(True), run(False))]
    assert errors[0] > 1e-4  # the experts really ran in bf16...
    assert max(errors) < 3e-2, errors  # ...and stayed within its rounding (measured: <= 0.7%)
