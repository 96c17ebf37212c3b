"""The multi-token-prediction module (docs/design.md §1.5): off by default, its loss against a position-by-position
reference, cached decoding equal to the full forward, a late training stage that trains it, checkpoints and growth
init that carry it. Run: `.venv/bin/python -m pytest tests/model/test_mtp.py -q`."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from longcat_lab import checkpoint
from longcat_lab.model import presets
from longcat_lab.model.cache import LatentCache
from longcat_lab.model.config import IGNORE_INDEX, ModelConfig
from longcat_lab.model.mtp import mtp_logits, mtp_loss
from longcat_lab.testing import random_ids, random_model, tiny_train_config
from longcat_lab.train.step import step_loss_keys
from longcat_lab.train.trainer import Trainer, train

MTP_CONFIG = presets.tiny(num_nextn_predict_layers=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "longcat_lab_cache")


def test_off_by_default_and_validated():
    assert ModelConfig().num_nextn_predict_layers == 0 and random_model().mtp is None
    assert not any(k.startswith("mtp.") for k in random_model().state_dict())
    for bad in (2, -1, 1.0, True):
        with pytest.raises(ValueError, match="num_nextn_predict_layers"):
            presets.tiny(num_nextn_predict_layers=bad)


def test_adding_mtp_keeps_the_main_model():
    """The module registers after the LM head, so a seeded init gives the main model the same weights."""
    plain, with_mtp = random_model(seed=3), random_model(MTP_CONFIG, seed=3)
    mtp_state = with_mtp.state_dict()
    assert all(torch.equal(v, mtp_state[k]) for k, v in plain.state_dict().items())
    idx = random_ids(MTP_CONFIG, (2, 12))
    assert torch.equal(plain(idx).logits, with_mtp(idx).logits)
    assert with_mtp.mtp.block_index == 2 * MTP_CONFIG.num_layers


def test_loss_matches_a_position_by_position_reference():
    """mtp_loss against the equation written out: for each t, the logits of the prefix-only MTP forward (causal
    attention must make the full forward equal to it) and the cross-entropy with x_{t+2}. An ignored input token
    drops its position (and the one predicting it); all ignored is a 0 loss, not NaN."""
    model = random_model(MTP_CONFIG, seed=1)
    x = random_ids(MTP_CONFIG, (2, 11), seed=2)
    idx, targets = x[:, :-1], x[:, 1:]
    masked = targets.clone()
    masked[:, 3] = IGNORE_INDEX
    with torch.no_grad():
        routing = model(idx, targets=targets, return_routing=True).routing
        hidden = model.norm(routing.last_hidden)
        for tgt, dropped in ((targets, ()), (masked, (2, 3))):
            inputs = tgt.clamp_min(0)
            per_token = [
                F.cross_entropy(mtp_logits(model, hidden[:, : t + 1], inputs[:, : t + 1])[:, -1], tgt[:, t + 1])
                for t in range(idx.shape[1] - 1)
                if t not in dropped
            ]
            want = float(torch.stack(per_token).mean())
            assert float(mtp_loss(model, routing.last_hidden, tgt)) == pytest.approx(want, rel=1e-5)
        assert float(mtp_loss(model, routing.last_hidden, torch.full_like(targets, IGNORE_INDEX))) == 0.0


def test_cached_decoding_equals_the_full_forward():
    """The MTP's cache slot: positions fed one and two at a time give the full forward's logits."""
    model = random_model(MTP_CONFIG, seed=4)
    hidden = torch.randn(1, 9, MTP_CONFIG.hidden_size, generator=torch.Generator().manual_seed(5))
    ids = random_ids(MTP_CONFIG, (1, 9), seed=6)
    with torch.inference_mode():
        full = mtp_logits(model, hidden, ids)
        cache = LatentCache(2 * MTP_CONFIG.num_layers + 1, 9)
        parts, start = [], 0
        for size in (1, 2, 1, 3, 2):
            parts.append(mtp_logits(model, hidden[:, start : start + size], ids[:, start : start + size], cache))
            start += size
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.lengths[model.mtp.block_index] == 9 and cache.seq_len == 0


def test_gradients_reach_the_main_model_and_weight_zero_leaves_mtp_alone():
    model = random_model(MTP_CONFIG, seed=7, train=True)
    x = random_ids(MTP_CONFIG, (2, 12))
    out = model(x[:, :-1], targets=x[:, 1:], return_routing=True)
    lm, routing = out.loss, out.routing
    (lm + 0.3 * mtp_loss(model, routing.last_hidden, x[:, 1:])).backward()
    assert model.mtp.layers[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.mtp.embed_tokens.weight.grad.abs().sum() > 0
    assert model.layers[0].self_attn[0].q_a_proj.weight.grad.abs().sum() > 0


def test_late_stage_trains_mtp_and_checkpoint_round_trips(cache, tmp_path):
    """A two-stage run whose second stage has mtp_loss_weight > 0: the MTP is untouched in the first stage, its loss
    falls in the second, and the checkpoint reloads it bit for bit. A model without MTP refuses a weight > 0."""
    cfg = tiny_train_config(cache, 16, eval_every=0, ckpt_every=0, rg_every=0)
    cfg.stages[1] = dataclasses.replace(cfg.stages[1], steps=cfg.stages[1].steps + 4, mtp_loss_weight=0.5)
    cfg.stages[0] = dataclasses.replace(cfg.stages[0], steps=cfg.stages[0].steps - 4)
    result = train(MTP_CONFIG, cfg, tmp_path / "run", progress=False)
    rows = result.rows("train")
    first = cfg.stages[0].steps
    assert all(r["mtp_loss"] == 0.0 for r in rows[:first])
    mtp_losses = [r["mtp_loss"] / 0.5 for r in rows[first:]]
    assert all(math.isfinite(v) and v > 0 for v in mtp_losses)
    assert mtp_losses[-1] < mtp_losses[0]
    assert all(
        math.isclose(r["loss"], r["lm_loss"] + sum(r[k] for k in step_loss_keys(result.model)), rel_tol=1e-5)
        for r in rows
    )
    loaded, _, _ = checkpoint.load(result.checkpoint)
    assert loaded.config.num_nextn_predict_layers == 1
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.raises(ValueError, match="mtp_loss_weight=0.5 is not allowed for a model without an MTP module"):
        train(presets.tiny(), cfg, tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match="mtp_loss_weight"):
        dataclasses.replace(cfg.stages[0], mtp_loss_weight=-1.0)


def test_init_from_a_checkpoint_without_mtp_adds_it(cache, tmp_path):
    """The late-stage recipe: a plain run's checkpoint starts an MTP run; the main model is copied, the MTP's
    embedding starts as the main embedding."""
    cfg = tiny_train_config(cache, 2, eval_every=0, rg_every=0)
    plain = train(presets.tiny(), cfg, tmp_path / "plain", progress=False)
    stage = dataclasses.replace(cfg.stages[-1], mtp_loss_weight=0.3)
    late = dataclasses.replace(cfg, stages=[stage], init_from=str(plain.checkpoint), stop_after=0)
    trainer_cfg = dataclasses.replace(late, stages=[dataclasses.replace(stage, steps=1, warmup=0)])
    t = Trainer(MTP_CONFIG, trainer_cfg, tmp_path / "late", progress=False)
    try:
        src = plain.model.state_dict()
        assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in src.items())
        assert torch.equal(t.model.mtp.embed_tokens.weight, plain.model.embed_tokens.weight)
    finally:
        t.close()


def test_segments_keep_the_mtp_attention_apart():
    """Packed rows: with segment ids, the loss over the second segment does not depend on the first one's tokens."""
    model = random_model(MTP_CONFIG, seed=8)
    x = random_ids(MTP_CONFIG, (1, 17), seed=9)
    seg = torch.tensor([[0] * 8 + [1] * 8])
    other = x.clone()
    other[:, :6] = (other[:, :6] + 1) % MTP_CONFIG.vocab_size
    losses = []
    with torch.no_grad():
        for ids in (x, other):
            targets = ids[:, 1:].clone()
            targets[:, :8] = IGNORE_INDEX  # only the second segment's positions count
            routing = model(ids[:, :-1], return_routing=True, segment_ids=seg).routing
            losses.append(float(mtp_loss(model, routing.last_hidden, targets, seg)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
