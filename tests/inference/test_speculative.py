"""Self-speculative decoding with the MTP draft (docs/design.md §6.2): greedy output identical to plain greedy for
many prompts (with the real, untrained draft and with a planted draft that is right 70% of the time, so both the
accept and the reject path run often), the cache rolled back on rejection, the sampling rule keeping the target
distribution (checked statistically), and bad input. Run: `.venv/bin/python -m pytest
tests/inference/test_speculative.py -q`."""

import random

import pytest
import torch

from longcat_lab.inference import speculative
from longcat_lab.inference.generate import generate
from longcat_lab.inference.speculative import SpeculativeStats, accept_or_resample, speculative_generate
from longcat_lab.model import presets
from longcat_lab.model.cache import LatentCache
from longcat_lab.testing import random_ids, random_model

CONFIG = presets.tiny(num_nextn_predict_layers=1, vocab_size=64)


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=1, bias_std=0.01)


def test_greedy_equals_plain_greedy_with_the_real_draft(model, one_thread):
    for seed in range(12):
        prompt = random_ids(CONFIG, (1, 1 + seed % 9), seed=seed)
        n = 1 + 7 * seed % 23
        got, stats = speculative_generate(model, prompt, n)
        assert torch.equal(got, generate(model, prompt, n)), seed
        assert stats.drafted <= n - 1


def test_a_few_positions_against_the_cache_equal_the_full_forward(model):
    """Verification's path: chunks of 2-4 positions after a prefix take absorbed attention and the token-by-token
    experts (`LatentCache.absorbs`); their logits and the cache match one full forward."""
    x = random_ids(CONFIG, (1, 20), seed=11)
    with torch.inference_mode():
        full = model(x).logits
        cache = LatentCache(2 * CONFIG.num_layers, 20)
        parts, start = [], 0
        for size in (5, 2, 3, 1, 2, 4, 3):
            assert cache.absorbs(0, size) == (start > 0 and size <= LatentCache.ABSORB_MAX)
            parts.append(model(x[:, start : start + size], cache=cache).logits)
            start += size
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.seq_len == 20


def planted_draft(monkeypatch, reference: torch.Tensor, right: float, seed: int) -> None:
    """Replace the MTP's logits by a one-hot on the reference continuation's token (probability `right`) or on a
    wrong one: the loop must give plain greedy's tokens whatever the draft says. The real module still runs, so its
    cache slot fills as usual."""
    real, rng = speculative.mtp_logits, random.Random(seed)

    def draft(model, hidden, next_ids, cache):
        logits = real(model, hidden, next_ids, cache).clone()
        at = cache.lengths[model.mtp.block_index] + 1  # the MTP at position j predicts token j + 2
        token = int(reference[0, at]) if at < reference.shape[1] else 0
        if rng.random() >= right:
            token = (token + 1) % CONFIG.vocab_size
        logits[:, -1] = -1e4
        logits[:, -1, token] = 1e4
        return logits

    monkeypatch.setattr(speculative, "mtp_logits", draft)


def test_greedy_equals_plain_greedy_when_drafts_are_often_right(model, monkeypatch, one_thread):
    rates = []
    for seed in range(12):
        prompt = random_ids(CONFIG, (1, 2 + seed % 5), seed=100 + seed)
        n = 5 + 3 * seed
        reference = generate(model, prompt, n + 2)
        planted_draft(monkeypatch, reference, 0.7, seed)
        got, stats = speculative_generate(model, prompt, n)
        assert torch.equal(got, reference[:, : got.shape[1]]), seed
        assert len(stats.from_draft) == n and sum(stats.from_draft) == sum(stats.accepted)
        rates.append(stats.acceptance_rate)
    assert 0.5 < sum(rates) / len(rates) < 0.9  # both paths ran


def test_rejection_rolls_the_cache_back(model, monkeypatch):
    """Every draft wrong: each verification writes two positions and keeps one."""
    prompt = random_ids(CONFIG, (1, 4), seed=3)
    reference = generate(model, prompt, 8)
    planted_draft(monkeypatch, reference, 0.0, 0)
    made = []
    original = LatentCache.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(LatentCache, "__init__", record)
    got, stats = speculative_generate(model, prompt, 6)
    assert torch.equal(got, reference[:, :10]) and stats.accepted == [False] * 5
    (cache,) = made
    # Main blocks: the prompt and the first five new tokens (the sixth is never fed); the MTP slot: the prompt and
    # one position after each of the first four rejections (the run ends after the fifth).
    assert cache.lengths[: 2 * CONFIG.num_layers] == [9] * (2 * CONFIG.num_layers)
    assert cache.lengths[model.mtp.block_index] == 8


def test_acceptance_rule_keeps_the_target_distribution():
    """200k draws of the rule with drafts from q: the tokens follow p (each frequency within 5 standard errors), and
    the acceptance rate is sum_v min(p_v, q_v), as the rule implies; drafts taken as they are would follow q."""
    g = torch.Generator().manual_seed(0)
    V, n = 6, 200_000
    p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.07, 0.03])
    q = torch.tensor([0.05, 0.10, 0.40, 0.05, 0.30, 0.10])
    drafts = torch.multinomial(q.expand(n, V), 1, replacement=True, generator=g)
    tokens, accepted = accept_or_resample(p.expand(n, V) * 3.0, q.expand(n, V), drafts, g)  # unnormalised p is fine
    freq = torch.bincount(tokens[:, 0], minlength=V).double() / n
    stderr = (p.double() * (1 - p.double()) / n).sqrt()
    assert ((freq - p.double()).abs() < 5 * stderr).all(), (freq, p)
    assert float(accepted.double().mean()) == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.005)
    assert torch.equal(tokens[accepted], drafts[accepted])
    draft_freq = torch.bincount(drafts[:, 0], minlength=V).double() / n
    assert (draft_freq - p.double()).abs().max() > 0.2  # the check above can fail


@pytest.mark.slow
def test_sampling_end_to_end_follows_the_model(one_thread):
    """400 speculative runs of two tokens at temperature 1 from one prompt: the joint frequency of (t1, t2) against
    the model's exact p(t1) p(t2 | t1). The LM head is scaled so p is peaked and the (untrained) draft is accepted
    only about a quarter of the time, so t2 mostly comes from the corrected distribution. Total variation must stay
    below 0.25: measured 0.08-0.11 for this rule over four seeds, 0.74 for a rule that keeps every draft."""
    cfg = presets.tiny(num_nextn_predict_layers=1, vocab_size=12)
    m = random_model(cfg, seed=5)
    with torch.no_grad():
        m.lm_head.weight.mul_(15.0)
    prompt = random_ids(cfg, (1, 5), seed=9)
    V = cfg.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(m(prompt).logits[0, -1], -1)
        both = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        p2 = torch.softmax(m(both).logits[:, -1], -1)  # [t1, t2]
    exact = p1[:, None] * p2
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V, V)
    stats = SpeculativeStats()
    for _ in range(400):
        out = list(speculative.speculative_stream(m, prompt, 2, temperature=1.0, generator=g, stats=stats))
        counts[int(out[0]), int(out[1])] += 1
    tv = 0.5 * float((counts / counts.sum() - exact).abs().sum())
    assert tv < 0.25, tv
    assert 0.1 < stats.acceptance_rate < 0.5


def test_bad_input(model):
    with pytest.raises(ValueError, match="batch size 2"):
        speculative_generate(model, random_ids(CONFIG, (2, 3)), 4)
    with pytest.raises(ValueError, match="num_nextn_predict_layers=1"):
        speculative_generate(random_model(), random_ids(presets.tiny(), (1, 3)), 4)
    with pytest.raises(ValueError, match="top_p=0"):
        speculative_generate(model, random_ids(CONFIG, (1, 3)), 4, top_p=0)
    assert speculative_generate(model, random_ids(CONFIG, (1, 3)), 0)[0].shape == (1, 3)


def test_figure_marks_each_token(model, monkeypatch):
    pytest.importorskip("plotly", reason="figures need the notebooks extra")
    from longcat_lab.viz.speculative import speculative_figure

    prompt = random_ids(CONFIG, (1, 4), seed=4)
    planted_draft(monkeypatch, generate(model, prompt, 14), 0.7, 1)
    _, stats = speculative_generate(model, prompt, 12)
    fig = speculative_figure(stats, [f"t{i}" for i in range(12)])
    drafts, main, line = fig.data
    assert sorted([*drafts.x, *main.x]) == list(range(12)) and len(drafts.x) == sum(stats.accepted)
    assert line.y[-1] == pytest.approx(stats.acceptance_rate)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        speculative_figure(stats, ["a", "b", "c"])
