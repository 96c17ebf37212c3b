"""Tests of expert parallelism and the side stream (`longcat_lab.parallel`): dispatcher swaps inside the real model.

Two gloo ranks are spawned once for the whole module (spawning costs seconds): the model after
`apply_expert_parallel`, in both schedules and both `experts_after`, must give the single-process model's logits,
loss and every gradient to fp32 tolerance, take the same optimizer step, and match also with uneven per-rank batches
and with routing that leaves one rank nothing to receive; zero experts must never travel. GPU paths (one-GPU side
stream, NCCL with two GPUs) skip with a reason where there is no GPU.

Run: `.venv/bin/python -m pytest tests/parallel/test_parallel.py -q`
"""

import pytest
import torch

from longcat_lab.model import presets
from longcat_lab.model.dispatch import LocalDispatcher
from longcat_lab.parallel import apply_expert_parallel, apply_side_stream, launch, set_schedule, time_side_stream
from longcat_lab.perf.overlap import measure_overlap
from longcat_lab.testing import EP_VARIANTS, parity_worker, random_ids, random_model

CONFIG = presets.tiny()


@pytest.fixture(scope="module")
def parity():
    """One spawn of two gloo ranks, batch 4 x 8 tokens split 2 + 2; rank 0's view of every check."""
    return launch(parity_worker, 2, args=(CONFIG.to_dict(), 0, 4, 8))[0]


@pytest.mark.parametrize("variant", EP_VARIANTS)
def test_logits_and_loss_match_single_process(parity, variant):
    run = parity["runs"][variant]
    torch.testing.assert_close(run["logits"], parity["ref_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run["loss"], parity["ref_loss"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", EP_VARIANTS)
def test_every_gradient_matches_single_process(parity, variant):
    grads, ref = parity["runs"][variant]["grads"], parity["ref_grads"]
    assert set(grads) == set(ref)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-6, rtol=1e-4, msg=name)
    # The expert gradients reach every expert shard through combine's and dispatch's backward exchange.
    experts = [n for n in ref if "mlp.experts." in n]
    assert experts and all(grads[n].abs().sum() > 0 for n in experts)


def test_each_rank_holds_its_slice_of_the_experts_and_their_gradients(parity):
    per_rank = parity["shards"]
    assert len(per_rank) == 2
    half = CONFIG.n_routed_experts // 2
    for shards in per_rank:
        assert {s["name"] for s in shards} == {n for n in parity["ref_grads"] if "mlp.experts." in n}
        for s in shards:
            assert s["grad"].shape[0] == half
            torch.testing.assert_close(s["grad"], s["ref_slice"], atol=1e-6, rtol=1e-4, msg=s["name"])


def test_an_optimizer_step_matches_single_process(parity):
    step = parity["step"]
    assert set(step["params"]) == set(step["ref_params"])
    for name, ref in step["ref_params"].items():
        torch.testing.assert_close(step["params"][name], ref, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(step["logits"], step["ref_logits"], atol=1e-5, rtol=1e-5)
    # The step moved the logits, so the comparison above is of the trained model, not of the initial one.
    assert (step["ref_logits"] - parity["ref_logits"]).abs().max() > 1e-3


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


@pytest.mark.parametrize("schedule", ["sequential", "overlapped"])
def test_a_rank_that_receives_nothing(parity, schedule):
    skew = parity["skewed"]
    assert [layer["rows_received"] for layer in skew["moved"][1]] == [0] * CONFIG.num_layers
    assert all(layer["pairs_sent_to_others"] == 0 for layer in skew["moved"][0])
    torch.testing.assert_close(skew[schedule], skew["ref_logits"], atol=1e-5, rtol=1e-5)


def test_bad_input_names_the_field(parity):
    assert "n_routed_experts=5" in parity["uneven_experts_error"]
    with pytest.raises(ValueError, match="experts_after='attn0'"):
        apply_expert_parallel(random_model(CONFIG), experts_after="attn0")
    with pytest.raises(ValueError, match="layer_style='vanilla'"):
        apply_expert_parallel(random_model(CONFIG.replace(layer_style="vanilla")))
    with pytest.raises(ValueError, match="process group"):
        apply_expert_parallel(random_model(CONFIG))
    with pytest.raises(ValueError, match="not expert-parallel"):
        set_schedule(random_model(CONFIG), overlap=False)
    with pytest.raises(ValueError, match="backend='mpi'"):
        launch(parity_worker, 2, backend="mpi")
    with pytest.raises(ValueError, match="world_size=0"):
        launch(parity_worker, 0)
    with pytest.raises(ValueError, match="reps=0"):
        measure_overlap(CONFIG, reps=0)
    with pytest.raises(ValueError, match="the model is on cpu"):
        apply_side_stream(random_model(CONFIG))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream path needs a CUDA GPU; none here")
def test_side_stream_matches_model_on_gpu():
    model = random_model(CONFIG, device="cuda")
    idx = random_ids(CONFIG, (2, 16)).cuda()
    with torch.no_grad():
        expected = model(idx).logits
        torch.testing.assert_close(apply_side_stream(model)(idx).logits, expected, atol=1e-5, rtol=1e-5)
        timing = time_side_stream(model, idx, reps=2)
    assert timing["ratio"] > 0
    assert not any(isinstance(moe.dispatcher, LocalDispatcher) for moe in model.moe_blocks())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL expert parallelism needs two GPUs; fewer here")
def test_nccl_parity_on_two_gpus():
    result = launch(parity_worker, 2, args=(CONFIG.to_dict(), 0, 4, 8, "nccl"), backend="nccl")[0]
    for variant in EP_VARIANTS:
        torch.testing.assert_close(result["runs"][variant]["logits"], result["ref_logits"], atol=1e-4, rtol=1e-4)
