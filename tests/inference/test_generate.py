"""Generation: the MLA latent KV cache, absorbed-MLA decoding, streaming, and temperature / top-p sampling.

The cached decoding step (absorbed attention against [c_KV ; k_R], `inference.generate.stream`) is held to the full
forward pass at every position (1e-5, fp32) for all three layer styles and for batch 1 and batch > 1 (the two expert
paths); greedy generation is held to transformers' generate() on the same exported checkpoint. Sampling is checked
against the distribution it should draw from, with seeded generators.

Run:  .venv/bin/python -m pytest tests/inference/test_generate.py -q
"""

from __future__ import annotations

import pytest
import torch

from longcat_lab import LatentCache
from longcat_lab.inference import sample_next
from longcat_lab.inference.generate import generate, stream
from longcat_lab.model import presets
from longcat_lab.testing import random_ids, random_model

try:
    import transformers  # noqa: F401  (the parity oracle; optional)

    HAS_TRANSFORMERS = True
except ImportError:
    HAS_TRANSFORMERS = False


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("style", ["scmoe", "vanilla", "dense"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_decoding_matches_the_full_forward(style, batch):
    model = random_model(presets.tiny(layer_style=style), bias_std=0.1)
    idx = random_ids(model.config, (batch, 7))
    ids, logits = generate(model, idx, 24, return_logits=True)
    with torch.no_grad():
        full = model(ids).logits
    # logits[:, t] drew token t+7; the full forward saw exactly the same prefix at position t+6.
    torch.testing.assert_close(logits, full[:, 6:-1], rtol=0, atol=1e-5)
    uncached_ids, uncached_logits = generate(model, idx, 24, return_logits=True, use_cache=False)
    assert torch.equal(ids, uncached_ids)
    torch.testing.assert_close(logits, uncached_logits, rtol=0, atol=1e-5)


def test_decoding_uses_zero_experts_and_every_batch_row_independently():
    """Rows of a batch decode as if alone (no cross-talk through the sorted expert dispatch)."""
    model = random_model(seed=3, bias_std=0.1)
    idx = random_ids(model.config, (4, 5), 4)
    together = generate(model, idx, 10)
    alone = torch.cat([generate(model, idx[b : b + 1], 10) for b in range(4)])
    assert torch.equal(together, alone)
    with torch.no_grad():
        routing = model(together, return_routing=True).routing
    assert any(bool((r.topk_ids >= model.config.n_routed_experts).any()) for r in routing.layers)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (pip install -e '.[hf]')")
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_generation_matches_transformers(tmp_path, batch):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from longcat_lab.export.hf import save_hf

    hf_logging.disable_progress_bar()
    model = random_model(seed=5, bias_std=0.1)
    save_hf(model, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    idx = random_ids(model.config, (batch, 5), 6)
    ours = generate(model, idx, 20)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_stream_yields_tokens_one_at_a_time():
    model = random_model(bias_std=0.1)
    idx = random_ids(model.config, (2, 4))
    tokens = stream(model, idx, 6)
    first = next(tokens)
    assert first.shape == (2, 1) and first.dtype == torch.long
    rest = list(tokens)
    assert len(rest) == 5
    assert torch.equal(torch.cat([idx, first, *rest], dim=1), generate(model, idx, 6))
    assert generate(model, idx, 0).equal(idx)
    ids, logits = generate(model, idx, 0, return_logits=True)
    assert ids.equal(idx) and logits.shape == (2, 0, model.config.vocab_size)


def test_training_mode_is_restored_even_when_a_stream_is_abandoned():
    model = random_model(bias_std=0.1).train()
    tokens = stream(model, random_ids(model.config, (1, 3)), 5)
    next(tokens)
    assert not model.training  # decoding runs in eval mode
    tokens.close()
    assert model.training


def test_latent_cache_size_and_growth():
    c = presets.tiny()
    per_block = c.kv_lora_rank + c.qk_rope_head_dim
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        model = random_model(bias_std=0.1).to(dtype)
        cache = LatentCache(2 * c.num_layers)
        with torch.no_grad():
            model(random_ids(model.config, (1, 5)), cache=cache)
        assert cache.seq_len == 5
        assert cache.bytes_per_token() == per_block * 2 * c.num_layers * size
    # Appending past the capacity grows the buffer and keeps what was there.
    cache = LatentCache(1, capacity=2)
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, n, per_block, generator=g) for n in (1, 2, 4, 1)]
    for chunk in chunks:
        view = cache.append(0, chunk)
    assert torch.equal(view, torch.cat(chunks, dim=1)) and cache.seq_len == 8
    c_kv, k_rope = cache.update(0, torch.zeros(2, 1, c.kv_lora_rank), torch.ones(2, 1, c.qk_rope_head_dim))
    assert c_kv.shape == (2, 9, c.kv_lora_rank) and k_rope.shape == (2, 9, c.qk_rope_head_dim)
    assert torch.equal(c_kv[:, :8], torch.cat(chunks, dim=1)[..., : c.kv_lora_rank])
    assert not c_kv[:, 8].any() and bool((k_rope[:, 8] == 1).all())


def test_sampling_follows_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 20000
    batch = logits.expand(draws, -1)
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        counts = torch.bincount(sample_next(batch, temperature, 1.0, g)[:, 0], minlength=6).float()
        expected = torch.softmax(logits / temperature, dim=-1) * draws
        # 5 standard deviations of a binomial count: fails only if the distribution is wrong.
        assert bool(((counts - expected).abs() <= 5 * expected.clamp(min=1).sqrt() + 5).all()), (counts, expected)
    # top_p=0.8 keeps the smallest prefix of the sorted probabilities whose mass reaches 0.8, renormalised.
    probs = torch.softmax(logits, dim=-1)
    keep = int((probs.cumsum(0) - probs < 0.8).sum())
    counts = torch.bincount(sample_next(batch, 1.0, 0.8, g)[:, 0], minlength=6).float()
    assert not counts[keep:].any()
    expected = probs[:keep] / probs[:keep].sum() * draws
    assert bool(((counts[:keep] - expected).abs() <= 5 * expected.sqrt() + 5).all())
    assert torch.equal(sample_next(batch[:3], 0.0, 0.5, g), torch.zeros(3, 1, dtype=torch.long))


def test_seeded_sampling_reproduces_and_matches_uncached():
    model = random_model(seed=2, bias_std=0.1)
    idx = random_ids(model.config, (2, 4))

    def sample(use_cache: bool) -> torch.Tensor:
        return generate(
            model, idx, 16, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(7), use_cache=use_cache
        )

    assert torch.equal(sample(True), sample(True))
    assert torch.equal(sample(True), sample(False))
    assert not torch.equal(sample(True), generate(model, idx, 16))  # it did sample, not argmax


def test_bf16_decoding_stays_as_close_to_fp32_as_the_bf16_forward():
    model = random_model(seed=4, bias_std=0.1)
    half = random_model(seed=4, bias_std=0.1).to(torch.bfloat16)
    idx = random_ids(model.config, (2, 6))
    ids, cached = generate(half, idx, 8, return_logits=True)
    assert cached.dtype == torch.float32 and ids.shape == (2, 14)
    with torch.no_grad():
        reference = model(ids).logits[:, 5:-1]  # fp32, on the tokens bf16 decoding chose
        forward_bf16 = half(ids).logits[:, 5:-1]
    assert (cached - reference).abs().max() <= 2 * (forward_bf16 - reference).abs().max() + 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decoding_matches_cpu(tmp_path):
    from longcat_lab.export.hf import load_hf, save_hf

    model = random_model(seed=6, bias_std=0.1)
    idx = random_ids(model.config, (3, 5))
    cpu_ids, cpu_logits = generate(model, idx, 12, return_logits=True)
    save_hf(model.cuda(), tmp_path / "export")  # exporting from the GPU writes CPU tensors
    gpu = load_hf(tmp_path / "export", device="cuda")
    gpu_ids, gpu_logits = generate(gpu, idx.cuda(), 12, return_logits=True)
    assert torch.equal(gpu_ids.cpu(), cpu_ids)
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=1e-4, atol=1e-4)
