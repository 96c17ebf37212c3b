"""Tests of the serving cost model (`longcat_lab.perf.costmodel`): the paper's Table 7 figures for LongCat-Flash
give its theoretical time per output token (about 16 ms) and cost ($0.09 per 1M output tokens); the schedules
relate as they must; the roofline estimate responds to hardware and serving settings as hand arithmetic says; bad
input names the field.

Run: `bash tools/test.sh tests/perf/test_costmodel.py`
"""

import dataclasses

import pytest

from longcat_lab.model import presets
from longcat_lab.perf import costmodel as cm


def test_paper_table7_gives_16ms_and_9_cents():
    p = cm.PAPER_TABLE7
    times = cm.paper_table7_times()
    t = cm.tpot(times, p["num_layers"], "sbo", p["mtp_tokens"], p["mtp_acceptance"])
    assert round(t * 1e3) == p["tpot_ms"] == 16
    # The reconstruction in docs/design.md §7.1: 28 layers x 1032 us per layer / 1.8 tokens per step.
    assert t == pytest.approx(28 * 1032e-6 / 1.8, rel=1e-12)
    cost = cm.cost_per_million(t, p["batch_per_device"], p["price_per_hour"])
    assert round(cost, 2) == p["cost_per_million"] == 0.09
    assert cost == pytest.approx(0.0929, abs=5e-5)


def test_sbo_hides_dense_work_up_to_the_exchange_and_no_more():
    base = cm.paper_table7_times()
    t0 = cm.layer_time(base, "sbo")
    hidden = dataclasses.replace(base, dense0=base.dispatch, dense1=base.combine)
    assert cm.layer_time(hidden, "sbo") == pytest.approx(t0)
    longer = dataclasses.replace(base, dense0=base.dispatch + 50e-6, dense1=base.combine + 30e-6)
    assert cm.layer_time(longer, "sbo") == pytest.approx(t0 + 80e-6)


def test_schedules_relate_and_gantt_agrees_with_the_formula():
    times = cm.LayerTimes(attn0=3.0, dense0=2.0, dispatch=4.0, moe=1.0, combine=5.0, dense1=6.0)
    assert cm.layer_time(times, "sequential") == 21.0
    assert cm.layer_time(times, "sbo") == 3.0 + 4.0 + 1.0 + 6.0
    assert cm.layer_time(times, "tbo") == max(12.0, 9.0)  # 2 x max(C/2, M/2), times linear in batch
    half = times.scaled(0.75)  # half the batch costs 3/4: weight reads
    assert cm.layer_time(times, "tbo", half) == 2 * 0.75 * 12.0
    for schedule in ("sequential", "sbo"):
        spans = cm.layer_gantt(times, schedule)
        assert max(end for *_, end in spans) == pytest.approx(cm.layer_time(times, schedule))
        compute = sorted((s, e) for lane, _, s, e in spans if lane == "compute")
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(compute, compute[1:])), "one compute unit at a time"
    est = cm.estimate(presets.released())
    s = {k: v["tpot_s"] for k, v in est["schedules"].items()}
    assert s["sbo"] <= s["sequential"] and s["tbo"] <= s["sequential"]


def test_roofline_responds_as_hand_arithmetic_says():
    cfg = presets.released()
    hw, sv = cm.Hardware(), cm.Serving()
    t = cm.layer_times(cfg, hw, sv)
    # Dispatch moves (96 x 2 tokens) x 8 FFN experts x 6144 values x 127/128 off the device, 1 byte each.
    rows = 96 * 2 * 8
    assert t.dispatch == pytest.approx(rows * 6144 * 127 / 128 / hw.net_bw + hw.net_latency)
    assert (t.combine - hw.net_latency) == pytest.approx(2 * (t.dispatch - hw.net_latency))
    fast = cm.layer_times(cfg, dataclasses.replace(hw, net_bw=2 * hw.net_bw), sv)
    assert fast.dispatch - hw.net_latency == pytest.approx((t.dispatch - hw.net_latency) / 2)
    assert fast.attn0 == t.attn0 and fast.moe == t.moe
    # A memory-bound expert stage (one token) halves when twice as many devices share the experts.
    one = cm.Serving(batch_per_device=1, mtp_tokens=0, expert_parallel=64)
    e64 = cm.layer_times(cfg, hw, one).moe
    e128 = cm.layer_times(cfg, hw, dataclasses.replace(one, expert_parallel=128)).moe
    assert e128 == pytest.approx(e64 / 2)
    assert e64 == pytest.approx(8 * 3 * 6144 * 2048 * 2 / hw.mem_bw)
    # No MTP: TPOT is layers x layer time.
    assert cm.tpot(t, 28, "sbo", mtp_tokens=0) == pytest.approx(28 * cm.layer_time(t, "sbo"))


def test_cost_per_million_by_hand():
    # A device emitting 1 token per second per sequence, one sequence, at $3.60/hour: $0.001 per token.
    assert cm.cost_per_million(1.0, 1, 3.6) == pytest.approx(1000.0)


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="batch_per_device=0"):
        cm.Serving(batch_per_device=0)
    with pytest.raises(ValueError, match="mtp_acceptance=1.5"):
        cm.Serving(mtp_acceptance=1.5)
    with pytest.raises(ValueError, match="net_bw=-1"):
        cm.Hardware(net_bw=-1)
    with pytest.raises(ValueError, match="moe=-1"):
        cm.LayerTimes(attn0=1, dense0=1, dispatch=1, moe=-1, combine=1, dense1=1)
    with pytest.raises(ValueError, match="schedule='pipeline'"):
        cm.layer_time(cm.paper_table7_times(), "pipeline")
    with pytest.raises(ValueError, match="expert_parallel=96"):
        cm.layer_times(presets.released(), serving=cm.Serving(expert_parallel=96))
    with pytest.raises(ValueError, match="ffn_experts_per_token=13"):
        cm.layer_times(presets.released(), serving=cm.Serving(ffn_experts_per_token=13))
