"""Tests of the training-step speed paths (docs/design.md §3.4): the trainer's fused AdamW makes the same update as
torch's default loop, attention takes torch's fused kernel and gives what the unfused softmax gives, and
`TrainConfig.torch_compile` compiles the dense parts without changing the loss or any gradient.

Run: `.venv/bin/python -m pytest tests/train/test_speed.py -q`
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from longcat_lab.model import presets
from longcat_lab.model.attention import segment_mask
from longcat_lab.model.rope import rope_angles
from longcat_lab.testing import random_ids, random_model
from longcat_lab.train import growth, speed
from longcat_lab.train.config import train_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets=targets, validate=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_adamw_makes_the_default_update():
    cfg = train_preset("tiny")
    fused_model = random_model(presets.tiny(), 0, train=True)
    loop_model = copy.deepcopy(fused_model)
    fused = growth.adamw(fused_model, cfg)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(growth.param_groups(loop_model, weight_decay=cfg.weight_decay), foreach=False)
    for g_loop, g_fused in zip(loop.param_groups, fused.param_groups):
        g_loop.update({k: g_fused[k] for k in ("lr", "betas", "eps", "weight_decay")})
    idx = random_ids(presets.tiny(), (2, 17))
    # Both optimizers get the same gradients: computed on each model, a rounding-level difference after one step can
    # flip a near-tied top-k choice, and the routers' gradients then differ by far more than any optimizer does.
    for _ in range(3):
        _, grads = loss_and_grads(fused_model, idx[:, :-1], idx[:, 1:])
        for name, q in zip(dict(fused_model.named_parameters()), loop_model.parameters()):
            q.grad = grads[name].clone() if name in grads else None
        for optimizer in (fused, loop):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # a changed optimizer setting moves the weights far more than the tolerance
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(fused_model.parameters(), random_model().parameters()))


@pytest.mark.parametrize("packed", [False, True])
def test_attention_takes_the_fused_kernel_and_matches_unfused_softmax(monkeypatch, packed):
    config = presets.tiny()
    assert config.qk_nope_head_dim + config.qk_rope_head_dim != config.v_head_dim  # the padded case
    mla = random_model(config, 3, train=True).layers[0].self_attn[0]
    x = torch.randn(2, 12, config.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    cos, sin = rope_angles(config, torch.arange(12))
    # packed: two sequences per row (fine-tuning), kept apart by a block-diagonal causal mask
    mask = segment_mask(torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])) if packed else None
    with profile() as prof:
        out = mla(x, cos, sin, mask=mask)
        out.sum().backward()
    kernels = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in kernels

    # the same block with attention written out: scores, mask, softmax, weighted sum of the unpadded v
    def unfused(q, k, v, attn_mask=None, is_causal=False, scale=None):
        scores = (q @ k.transpose(-1, -2)) * scale
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril() if is_causal else attn_mask
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[..., : mla.v_dim]

    monkeypatch.setattr(F, "scaled_dot_product_attention", unfused)
    torch.testing.assert_close(out, mla(x, cos, sin, mask=mask), rtol=0, atol=1e-6)


def test_torch_compile_switch_compiles_the_dense_parts_only():
    model = random_model(presets.tiny(), 0, train=True)
    speed.prepare(model, train_preset("tiny"))
    assert not any(m._compiled_call_impl is not None for m in model.modules())
    speed.prepare(model, train_preset("tiny", torch_compile=True))
    compiled = {id(m) for m in model.modules() if m._compiled_call_impl is not None}
    assert compiled == {id(m) for m in speed.compiled_parts(model)}
    assert len(compiled) == 4 * model.config.num_layers
    assert all(id(block) not in compiled for block in model.moe_blocks())
    # names and checkpoints are unchanged by compiling in place
    assert list(model.state_dict()) == list(random_model(presets.tiny(), 0).state_dict())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_model_gives_the_eager_loss_and_gradients():
    config = presets.tiny()
    eager = random_model(config, 0, train=True)
    compiled = copy.deepcopy(eager)
    speed.compile_dense(compiled)
    ids = random_ids(config, (2, 17))
    loss_e, grads_e = loss_and_grads(eager, ids[:, :-1], ids[:, 1:])
    loss_c, grads_c = loss_and_grads(compiled, ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-7, msg=name)
    # the whole model would not compile as one graph: the MoE's data-dependent sizes break it
    report = speed.graph_breaks(eager, ids[:, :-1], ids[:, 1:])
    assert report["graph_breaks"] >= config.num_layers and report["reasons"]
