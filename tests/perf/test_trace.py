"""Tests of trace reading (`longcat_lab.perf.trace`) on a small hand-written trace whose overlaps are known, and of
the timeline drawn from it (`longcat_lab.viz.perf.timeline_figure`).

Run: `.venv/bin/python -m pytest tests/perf/test_trace.py -q`
"""

import json

import pytest

from longcat_lab.perf.trace import (
    COMPUTE_PARTS,
    LAUNCH_PARTS,
    WAIT_PARTS,
    load_trace,
    overlap_stats,
    stats_table,
    work_under_exchange,
)
from longcat_lab.viz.perf import PART_COLORS, timeline_figure


def _event(name, ts, dur, tid, cat="user_annotation"):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "cat": cat}


def _write_trace(path, rank):
    """Overlapped step 1 (0-100 us): compute 10-40 and 60-90, an exchange 20-50 (20 us of it under compute), a
    counts exchange 5-8 inside a counts region, a wait 40-50. Overlapped step 2 (400-500): an exchange 420-440
    wholly under compute 410-450. A sequential step (200-300) whose exchange 220-240 runs inside a wait."""
    events = [
        _event("ep.step.overlapped", 0, 100, 1),
        _event("ep.attn0", 10, 30, 1),
        _event("ep.ffn1", 60, 30, 1),
        _event("ep.counts", 4, 5, 1),
        _event("gloo:all_to_all", 5, 3, 2),
        _event("gloo:all_to_all", 20, 30, 2),
        _event("ep.dispatch.wait", 40, 10, 1),
        _event("aten::mm", 12, 5, 1, "cpu_op"),
        _event("ep.step.sequential", 200, 100, 1),
        _event("ep.attn0", 200, 20, 1),
        _event("ep.dispatch.wait", 220, 20, 1),
        _event("gloo:all_to_all", 220, 20, 2),
        _event("ep.ffn0", 240, 60, 1),
        _event("gloo:barrier", 0, 300, 3),
        _event("ep.step.overlapped", 400, 100, 1),
        _event("ep.attn1", 410, 40, 1),
        _event("gloo:all_to_all", 420, 20, 2),
    ]
    path.write_text(json.dumps({"distributedInfo": {"rank": rank}, "traceEvents": events}))


def test_overlap_stats_on_a_known_trace(tmp_path):
    _write_trace(tmp_path / "r1.json", rank=1)
    spans = load_trace(tmp_path / "r1.json")
    assert {s.rank for s in spans} == {1}
    ovl = overlap_stats(spans, "overlapped")  # per-step means over the two steps
    assert ovl["steps"] == 2 and ovl["step_us"] == 100 and ovl["comm_us"] == 25 and ovl["hidden_us"] == 20
    assert ovl["hidden_fraction"] == pytest.approx(40 / 50)
    assert ovl["counts_us"] == 1.5 and ovl["wait_us"] == 7.5 and ovl["compute_us"] == 50
    seq = overlap_stats(spans, "sequential")
    assert seq["comm_us"] == 20 and seq["hidden_us"] == 0 and seq["hidden_fraction"] == 0
    rows = stats_table([spans])
    assert [(r["schedule"], r["rank"]) for r in rows] == [("sequential", 1), ("overlapped", 1)]
    with pytest.raises(ValueError, match="schedule='tbo'"):
        overlap_stats(spans, "tbo")
    with pytest.raises(ValueError, match="path="):
        load_trace(tmp_path / "missing.json")


def test_work_under_exchange_reads_program_order(tmp_path):
    # (part, start, duration) on the main thread: an overlapped step that computes between launch and wait, then a
    # sequential one that waits at once.
    overlapped = [("step.overlapped", 0, 100), ("dispatch.launch", 0, 5), ("ffn0", 5, 20), ("attn1", 25, 20)]
    overlapped += [("dispatch.wait", 45, 5), ("experts", 50, 10)]
    sequential = [("step.sequential", 200, 100), ("dispatch.launch", 200, 5), ("dispatch.wait", 205, 30)]
    sequential += [("ffn0", 235, 20)]
    events = [_event(f"ep.{part}", ts, dur, 1) for part, ts, dur in overlapped + sequential]
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": events}))
    spans = load_trace(tmp_path / "t.json")
    assert work_under_exchange(spans, "overlapped") == [["ffn0", "attn1"]]
    assert work_under_exchange(spans, "sequential") == [[]]


def test_timeline_of_a_known_trace(tmp_path):
    _write_trace(tmp_path / "r1.json", rank=1)
    spans = load_trace(tmp_path / "r1.json")
    fig = timeline_figure([spans], "overlapped")
    assert {t.name for t in fig.data} >= {"attn0", "ffn1", "exchange", "counts exchange", "dispatch.wait"}
    assert timeline_figure([spans], "overlapped", step=1).data
    # Every part the timeline can draw has a colour of its own.
    parts = [*COMPUTE_PARTS, *LAUNCH_PARTS, *WAIT_PARTS, "exchange", "counts exchange"]
    assert len({PART_COLORS[p] for p in parts}) == len(parts)
    assert len({t.marker.color for t in fig.data}) == len(fig.data)
    with pytest.raises(ValueError, match="step=2"):
        timeline_figure([spans], "overlapped", step=2)
