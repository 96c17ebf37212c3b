"""Absorbed-MLA decoding lives inside the model's own forward: a single-position no-grad step against a LatentCache
takes `model.attention.absorbed_attention` (folded weights kept in the cache), a step with gradients takes the
re-expanding path, and both agree with the full forward; the no-grad one-token expert path matches the sorted
dispatch. Models come from `longcat_lab.testing.random_model` with a non-zero expert bias (bias_std=0.1), so that
selection depends on it.

Run:  .venv/bin/python -m pytest tests/inference/test_decode.py -q
"""

from __future__ import annotations

import torch

from longcat_lab import LatentCache
from longcat_lab.inference.generate import generate
from longcat_lab.testing import random_ids, random_model


def test_single_position_step_takes_the_absorbed_path_only_without_grad():
    model = random_model(bias_std=0.1)
    blocks = 2 * model.config.num_layers
    idx = random_ids(model.config, (2, 9), 1)
    full = model(idx).logits.detach()
    absorbed, expanded = LatentCache(blocks), LatentCache(blocks)

    def folded(cache):
        return sorted(key[1] for key in cache.weights.entries if key[0] == "absorbed")

    with torch.no_grad():
        model(idx[:, :8], cache=absorbed)
        assert folded(absorbed) == []  # prefill re-expands keys and values
        step = model(idx[:, 8:], cache=absorbed).logits
    assert folded(absorbed) == list(range(blocks))
    model(idx[:, :8], cache=expanded)
    step_grad = model(idx[:, 8:], cache=expanded).logits
    assert expanded.weights.entries == {} and step_grad.requires_grad
    torch.testing.assert_close(step, full[:, 8:], rtol=0, atol=1e-5)
    torch.testing.assert_close(step_grad.detach(), full[:, 8:], rtol=0, atol=1e-5)


def test_one_token_expert_path_matches_the_sorted_dispatch():
    model = random_model(seed=2, bias_std=0.1)
    experts, router = model.moe_blocks()[0].experts, model.moe_blocks()[0].router
    x_TD = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ids_TK, weights_TK, _, _ = router(x_TD)
        batched = experts(x_TD, ids_TK, weights_TK)  # T = 16: sorted dispatch
        one_by_one = torch.cat([experts(x_TD[t : t + 1], ids_TK[t : t + 1], weights_TK[t : t + 1]) for t in range(16)])
    assert bool((ids_TK >= model.config.n_routed_experts).any())  # zero experts are exercised too
    torch.testing.assert_close(one_by_one, batched, rtol=0, atol=1e-6)


def testdecoding_weights_are_rebuilt_when_weights_change():
    """`generate` keeps transposed and folded weight copies in the model between calls; an optimizer step or an
    in-place edit must be seen by the next call, exactly as a model that never decoded before sees it."""
    model = random_model(seed=4, bias_std=0.1)
    prompt = random_ids(model.config, (2, 6), 5)
    before = generate(model, prompt, 4, return_logits=True)[1]
    assert model.decoding_weights.entries  # kept for the next call
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(prompt, targets=prompt).loss.backward()
    opt.step()  # bumps every weight's version counter
    with torch.no_grad():
        model.layers[0].self_attn[1].kv_b_proj.weight.mul_(1.5)  # and an edit by hand
    after = generate(model, prompt, 4, return_logits=True)[1]
    fresh = random_model(seed=4, bias_std=0.1)
    fresh.load_state_dict(model.state_dict())
    expected = generate(fresh, prompt, 4, return_logits=True)[1]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_train_drops_thedecoding_weights_and_generate_keeps_the_mode():
    model = random_model(bias_std=0.1).train()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    generate(model, prompt, 2)
    assert model.training and model.decoding_weights.entries
    model.train()
    assert model.decoding_weights.entries == {}
    generate(model.eval(), prompt, 2)
    assert not model.training and model.decoding_weights.entries
