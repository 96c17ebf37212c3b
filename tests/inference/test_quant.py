"""Int8 weight-only quantisation (`longcat_lab.inference.quant`): the per-channel rounding, the int8 products against
the dequantised matrix they stand for, and a quantised copy of a model that forwards, decodes and is measured in
bits per byte like the original, which stays untouched.

Run: .venv/bin/python -m pytest tests/inference/test_quant.py -q
"""

import pytest
import torch
import torch.nn.functional as F

from longcat_lab.data import DataConfig, load_dataset
from longcat_lab.eval.bpb import bits_per_byte
from longcat_lab.inference.generate import generate, stream
from longcat_lab.inference.quant import Int8Matrix, model_bytes, quantize_int8, quantize_rows
from longcat_lab.model.cache import DecodingWeights
from longcat_lab.testing import random_ids, random_model


def test_quantize_rows_rounds_each_row_to_its_own_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g) * torch.logspace(-3, 1, 6)[:, None]  # rows of very different size
    w[2] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (6,) and int(q.abs().max()) == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # at most half a step, per row
    assert bool((q[2] == 0).all()) and float(scale[2]) == 1.0


@pytest.mark.parametrize("k", [48, 40])  # 48 runs the CPU int8 kernel, 40 (not a multiple of 16) dequantises
def test_int8_products_match_the_dequantised_matrix(k):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, k, generator=g), torch.randn(5, k, generator=g)
    m = Int8Matrix.from_float(w)
    ref = m.dequantize()
    tol = dict(atol=0.05, rtol=0.02)  # the kernel takes bfloat16 activations
    torch.testing.assert_close(F.linear(x, m), x @ ref.T, **tol)
    wt = m.transpose(-2, -1)
    assert wt.shape == (k, 24) and wt.dtype == torch.float32
    torch.testing.assert_close(x @ wt, x @ ref.T, **tol)
    torch.testing.assert_close(x[None] @ wt, (x @ ref.T)[None], **tol)  # [B, S, D] inputs
    out = torch.empty(5, 24)
    assert torch.mm(x, wt, out=out) is out
    torch.testing.assert_close(out, x @ ref.T, **tol)
    acc = torch.randn(5, 24, generator=g)
    torch.testing.assert_close(torch.addmm(acc, x, wt, alpha=0.5), acc + 0.5 * (x @ ref.T), **tol)
    # Stacking gate and up and transposing stays int8, as `DecodingWeights.transpose` does it.
    stacked = DecodingWeights.transpose(m, Int8Matrix.from_float(2 * w))
    assert isinstance(stacked, Int8Matrix) and stacked.shape == (k, 48)
    torch.testing.assert_close(stacked.dequantize(), torch.cat([ref, 2 * ref]).T)
    # Anything else sees the dequantised matrix.
    torch.testing.assert_close(m.double(), ref.double())
    torch.testing.assert_close(m @ torch.eye(k), ref)
    with pytest.raises(AttributeError, match="read-only"):
        m.zero_()


def test_a_stack_of_expert_matrices_unbinds_per_expert():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 32, 16, generator=g)
    m = Int8Matrix.from_float(w).transpose(1, 2)
    parts = m.unbind(0)
    assert len(parts) == 3 and parts[1].shape == (16, 32)
    torch.testing.assert_close(parts[1].dequantize(), m.dequantize()[1])
    torch.testing.assert_close(m.dequantize(), w.transpose(1, 2), atol=float(w.abs().max()) / 127, rtol=0)
    with pytest.raises(ValueError, match="unbind"):
        m.unbind(1)


def test_quantize_int8_makes_a_smaller_copy_and_leaves_the_model_alone(one_thread):
    model = random_model(seed=3, bias_std=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quant = quantize_int8(model)
    assert quant is not model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.decoding_weights) is DecodingWeights
    layer, qlayer = model.layers[0], quant.layers[0]
    assert isinstance(layer.self_attn[0].q_b_proj.weight, torch.nn.Parameter)
    assert isinstance(qlayer.self_attn[0].q_b_proj.weight, Int8Matrix)
    assert isinstance(qlayer.mlps[1].down_proj.weight, Int8Matrix)
    assert isinstance(qlayer.mlp.experts.gate_up_proj, Int8Matrix)
    assert isinstance(qlayer.mlp.router.classifier.weight, torch.nn.Parameter)  # routers stay in full precision
    assert isinstance(quant.lm_head.weight, torch.nn.Parameter)
    assert model_bytes(quant) < model_bytes(model)
    with pytest.raises(RuntimeError, match="without gradients"):
        quant(random_ids(model.config, (1, 4)))
    with pytest.raises(ValueError, match="LongCatLM"):
        quantize_int8(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantised_copy_forwards_and_decodes_close_to_the_original(one_thread, dtype):
    model = random_model(seed=5, bias_std=0.05).to(dtype)
    quant = quantize_int8(model)
    ids = random_ids(model.config, (2, 10))
    with torch.no_grad():
        ref, got = model(ids).logits.float(), quant(ids).logits.float()
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())
    # Decoding against the cache reads the store's int8 matrices (absorbed maps included) and agrees with the
    # copy's own forward over the whole sequence.
    out, logits = generate(quant, ids, 6, return_logits=True)
    assert all(isinstance(v[1], (Int8Matrix, tuple)) for v in quant.decoding_weights.entries.values())
    with torch.no_grad():
        full = quant(out[:, :-1]).logits[:, ids.shape[1] - 1 :].float()
    tol = 0.02 if dtype == torch.float32 else 0.1
    assert float((full - logits).abs().max()) < tol * float(full.abs().max())
    streamed = torch.cat(list(stream(quant, ids[:1], 6)), dim=1)
    assert torch.equal(streamed, out[:1, ids.shape[1] :])


def test_bits_per_byte_of_a_quantised_copy_is_close_to_the_original(one_thread):
    ds = load_dataset(512, DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000))  # as test_eval
    model = random_model(seed=6, bias_std=0.05)
    ref = bits_per_byte(model, ds, seq_len=32, windows=2, compressors=False)
    got = bits_per_byte(quantize_int8(model), ds, seq_len=32, windows=2, compressors=False)
    for domain in ref:
        assert got[domain].model == pytest.approx(ref[domain].model, rel=0.01)
        assert got[domain].model != ref[domain].model  # the weights did change
