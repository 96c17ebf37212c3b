"""Continuous batching (`inference.batch.BatchDecoder`, `model.cache.BatchLatentCache`): sequences of different prompt
lengths that join (prefilled together) and leave at different steps decode exactly what each decodes alone with
`generate`, greedy and seeded sampling alike, for every layer style and for both expert paths (few tokens and
sorted); a row that leaves is freed and reused; the per-sequence logits hook steers its own row only.

Run:  .venv/bin/python -m pytest tests/inference/test_batch.py -q
"""

from __future__ import annotations

import pytest
import torch

from longcat_lab.inference.batch import BatchDecoder, Sequence
from longcat_lab.inference.generate import generate
from longcat_lab.model import BatchLatentCache, LatentCache, presets
from longcat_lab.testing import random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LENGTHS = (5, 17, 9, 30, 3, 12, 1)
NEW = (10, 4, 15, 7, 12, 9, 6)


def prompts(model, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


def alone(model, prompt: list[int], n: int, **options) -> list[int]:
    return generate(model, torch.tensor([prompt]), n, **options)[0, len(prompt) :].tolist()


@pytest.mark.parametrize("style", ["scmoe", "vanilla", "dense"])
@pytest.mark.parametrize("max_batch", [1, 3, 7])  # 7 rows take the sorted expert path, 3 the few-token one
def test_greedy_batched_decoding_equals_decoding_alone(style, max_batch):
    model = random_model(presets.tiny(layer_style=style), seed=3, bias_std=0.05)
    ps = prompts(model)
    want = [alone(model, p, n) for p, n in zip(ps, NEW)]
    # max_batch < 7: later sequences join at different steps, as earlier ones finish and leave
    assert BatchDecoder(model, max_batch).run([Sequence(p, n) for p, n in zip(ps, NEW)]) == want


def test_seeded_sampling_draws_what_each_sequence_draws_alone():
    model = random_model(seed=4, bias_std=0.05)
    ps = prompts(model, 1)

    def gen(i):
        return torch.Generator().manual_seed(100 + i)

    opts = {"temperature": 1.0, "top_p": 0.9}
    want = [alone(model, p, n, generator=gen(i), **opts) for i, (p, n) in enumerate(zip(ps, NEW))]
    seqs = [Sequence(p, n, generator=gen(i), **opts) for i, (p, n) in enumerate(zip(ps, NEW))]
    assert BatchDecoder(model, 4).run(seqs) == want


def test_sequences_join_mid_decoding_and_a_leaving_row_is_reused():
    model = random_model(seed=5, bias_std=0.05)
    ps = prompts(model, 2)
    want = [alone(model, p, 12) for p in ps[:3]]
    dec = BatchDecoder(model, 2)
    a, b, c = (Sequence(p, 12) for p in ps[:3])
    dec.join(a)
    dec.step()
    dec.step()
    dec.join(b)  # joins two steps after a, with a different prompt length
    for _ in range(3):
        dec.step()
    with pytest.raises(ValueError, match="the batch is full"):
        dec.join(c)
    dec.leave(a)  # a leaves early: its row is free at once
    assert len(dec) == 1 and dec.cache.rows == 1
    dec.join(c)  # into a's row
    while len(c.tokens) < 12:
        dec.step()
    assert a.tokens == want[0][:6] and b.tokens[:12] == want[1] and c.tokens == want[2]


def test_the_logits_mask_steers_only_its_own_row():
    model = random_model(seed=6, bias_std=0.05)
    ps = prompts(model, 3)[:3]
    script = [7, 8, 9, 10, 11]

    def forced(ids, logits):
        out = torch.full_like(logits, float("-inf"))
        out[:, script[len(ids)]] = 0.0
        return out

    seqs = [Sequence(ps[0], 5), Sequence(ps[1], 5, logits_mask=forced), Sequence(ps[2], 5)]
    got = BatchDecoder(model, 3).run(seqs)
    assert got[1] == script
    assert got[0] == alone(model, ps[0], 5) and got[2] == alone(model, ps[2], 5)


def test_the_batch_cache_decodes_one_position_per_row_only():
    model = random_model(seed=7)
    cache = BatchLatentCache(2 * model.config.num_layers, 2, model.decoding_weights)
    with torch.no_grad(), pytest.raises(ValueError, match="no rows"):
        model(torch.tensor([[1]]), cache=cache)
    one = LatentCache(2 * model.config.num_layers)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=one)
        cache.add(one)
        with pytest.raises(ValueError, match="one position per row, not 2"):
            model(torch.tensor([[1, 2]]), cache=cache)


def test_prompts_prefilled_together_decode_what_each_decodes_alone_and_a_bad_one_joins_none():
    model = random_model(seed=8, bias_std=0.05)
    ps = prompts(model, 4)[:4]  # lengths 5, 17, 9, 30: right-padded to 30 in one prefill
    want = [alone(model, p, 6) for p in ps]
    dec = BatchDecoder(model, 4)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        dec.join_many([Sequence(ps[0], 6), Sequence(ps[1], 10**6)])
    assert len(dec) == 0 and dec.cache.rows == 0
    seqs = [Sequence(p, 6) for p in ps]
    first = dec.join_many(seqs)
    assert first == [w[0] for w in want]
    while len(seqs[0].tokens) < 6:
        dec.step()
    assert [s.tokens for s in seqs] == want
