"""Tests of expert parallelism (`longcat_lab.parallel`) and trace reading (`longcat_lab.profiling`).

Two gloo ranks are spawned once for the whole module (spawning costs seconds): the expert-parallel model, in both
schedules, must give the single-process model's logits, loss and every gradient to fp32 tolerance, also with
uneven per-rank batches and with routing that leaves one rank nothing to receive; zero experts must never travel.
The trace reader is checked on a small hand-written trace whose overlaps are known. GPU paths (one-GPU side
stream, NCCL with two GPUs) skip with a reason where there is no GPU.

Run: `.venv/bin/python -m pytest tests/test_parallel.py -q`
"""

import json

import pytest
import torch

from longcat_lab.model import presets
from longcat_lab.parallel.expert_parallel import SCHEDULES, launch, measure_overlap, parity_worker, seeded_model, side_stream_forward
from longcat_lab.perf.trace import load_trace, overlap_stats, stats_table, timeline_figure

CONFIG = presets.tiny()
VARIANTS = ["sequential/attn1", "overlapped/attn1", "overlapped/ffn0"]


@pytest.fixture(scope="module")
def parity():
    """One spawn of two gloo ranks, batch 4 x 8 tokens split 2 + 2; rank 0's view of every check."""
    return launch(parity_worker, 2, args=(CONFIG.to_dict(), 0, 4, 8))[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_loss_match_single_process(parity, variant):
    run = parity["runs"][variant]
    torch.testing.assert_close(run["logits"], parity["ref_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run["loss"], parity["ref_loss"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_gradient_matches_single_process(parity, variant):
    grads, ref = parity["runs"][variant]["grads"], parity["ref_grads"]
    assert set(grads) == set(ref)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-6, rtol=1e-4, msg=name)
    # The expert gradients reach every expert shard through combine's and dispatch's backward exchange.
    experts = [n for n in ref if "mlp.experts." in n]
    assert experts and all(grads[n].abs().sum() > 0 for n in experts)


def test_zero_experts_never_travel(parity):
    K = CONFIG.moe_topk
    per_rank = parity["moved"]
    assert len(per_rank) == 2
    for layers in per_rank:
        for moved in layers:
            # Exactly the FFN selections the single-process router made travel; the identity ones stay home.
            assert moved["pairs_sent"] == moved["ref_ffn_pairs"]
            assert moved["pairs_sent"] + moved["zero_expert_pairs"] == moved["tokens"] * K
            assert moved["zero_expert_pairs"] > 0
    for layer in range(CONFIG.num_layers):
        assert sum(r[layer]["pairs_sent"] for r in per_rank) == sum(r[layer]["rows_received"] for r in per_rank)


def test_uneven_batches_per_rank(parity):
    torch.testing.assert_close(parity["uneven"]["logits"], parity["uneven"]["ref_logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_rank_that_receives_nothing(parity, schedule):
    skew = parity["skewed"]
    assert [layer["rows_received"] for layer in skew["moved"][1]] == [0] * CONFIG.num_layers
    assert all(layer["pairs_sent_to_others"] == 0 for layer in skew["moved"][0])
    torch.testing.assert_close(skew[schedule], skew["ref_logits"], atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_field(parity):
    errors = parity["errors"]
    assert "schedule='async'" in errors["schedule"]
    assert "experts_after='attn0'" in errors["experts_after"]
    assert "n_routed_experts=5" in errors["n_routed_experts"]
    with pytest.raises(ValueError, match="backend='mpi'"):
        launch(parity_worker, 2, backend="mpi")
    with pytest.raises(ValueError, match="world_size=0"):
        launch(parity_worker, 0)
    with pytest.raises(ValueError, match="reps=0"):
        measure_overlap(CONFIG, reps=0)
    with pytest.raises(ValueError, match="idx is on cpu"):
        side_stream_forward(seeded_model(CONFIG, 0), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream path needs a CUDA GPU; none here")
def test_side_stream_matches_model_on_gpu():
    model = seeded_model(CONFIG, 0, "cuda")
    idx = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        torch.testing.assert_close(side_stream_forward(model, idx), model(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL expert parallelism needs two GPUs; fewer here")
def test_nccl_parity_on_two_gpus():
    result = launch(parity_worker, 2, args=(CONFIG.to_dict(), 0, 4, 8, "nccl"), backend="nccl")[0]
    for variant in VARIANTS:
        torch.testing.assert_close(result["runs"][variant]["logits"], result["ref_logits"], atol=1e-4, rtol=1e-4)


# Trace reading ---------------------------------------------------------------------------------------------------
def _event(name, ts, dur, tid, cat="user_annotation"):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "cat": cat}


def _write_trace(path, rank):
    """Overlapped step 1 (0-100 us): compute 10-40 and 60-90, an exchange 20-50 (20 us of it under compute), a
    counts exchange 5-8 inside a counts region, a wait 40-50. Overlapped step 2 (400-500): an exchange 420-440
    wholly under compute 410-450. A sequential step (200-300) whose exchange 220-240 runs inside a wait."""
    events = [
        _event("ep.step.overlapped", 0, 100, 1), _event("ep.attn0", 10, 30, 1), _event("ep.ffn1", 60, 30, 1),
        _event("ep.counts", 4, 5, 1), _event("gloo:all_to_all", 5, 3, 2), _event("gloo:all_to_all", 20, 30, 2),
        _event("ep.dispatch.wait", 40, 10, 1), _event("aten::mm", 12, 5, 1, "cpu_op"),
        _event("ep.step.sequential", 200, 100, 1), _event("ep.attn0", 200, 20, 1),
        _event("ep.dispatch.wait", 220, 20, 1), _event("gloo:all_to_all", 220, 20, 2),
        _event("ep.ffn0", 240, 60, 1), _event("gloo:barrier", 0, 300, 3),
        _event("ep.step.overlapped", 400, 100, 1), _event("ep.attn1", 410, 40, 1),
        _event("gloo:all_to_all", 420, 20, 2),
    ]
    path.write_text(json.dumps({"distributedInfo": {"rank": rank}, "traceEvents": events}))


def test_overlap_stats_on_a_known_trace(tmp_path):
    _write_trace(tmp_path / "r1.json", rank=1)
    spans = load_trace(tmp_path / "r1.json")
    assert {s.rank for s in spans} == {1}
    ovl = overlap_stats(spans, "overlapped")                      # per-step means over the two steps
    assert ovl["steps"] == 2 and ovl["step_us"] == 100 and ovl["comm_us"] == 25 and ovl["hidden_us"] == 20
    assert ovl["hidden_fraction"] == pytest.approx(40 / 50)
    assert ovl["counts_us"] == 1.5 and ovl["wait_us"] == 7.5 and ovl["compute_us"] == 50
    seq = overlap_stats(spans, "sequential")
    assert seq["comm_us"] == 20 and seq["hidden_us"] == 0 and seq["hidden_fraction"] == 0
    rows = stats_table([spans])
    assert [(r["schedule"], r["rank"]) for r in rows] == [("sequential", 1), ("overlapped", 1)]
    fig = timeline_figure([spans], "overlapped")
    assert {t.name for t in fig.data} >= {"attn0", "ffn1", "exchange", "counts exchange", "dispatch.wait"}
    assert timeline_figure([spans], "overlapped", step=1).data
    with pytest.raises(ValueError, match="step=2"):
        timeline_figure([spans], "overlapped", step=2)
    with pytest.raises(ValueError, match="schedule='tbo'"):
        overlap_stats(spans, "tbo")
    with pytest.raises(ValueError, match="path="):
        load_trace(tmp_path / "missing.json")
