"""Tests of the export and performance figures of longcat_lab.viz (`viz.export`, `viz.perf`): each figure carries
the numbers it was given. The profiler timeline (`viz.perf.timeline_figure`) is tested with trace reading, in
tests/perf/test_trace.py.

Run: `bash tools/test.sh tests/viz/test_figures.py`
"""

import pytest
import torch

from longcat_lab.export import PADDING
from longcat_lab.perf import costmodel as cm
from longcat_lab.viz import cache_bytes_figure, checkpoint_bytes_figure, gantt_figure, logits_parity_figure, tpot_figure


def test_export_figures_carry_the_numbers():
    ours = torch.linspace(-3, 3, 50).view(5, 10)
    fig = logits_parity_figure(ours, ours + 1e-6)
    assert "max |difference| 1.0e-06" in fig.layout.title.text
    assert len(fig.data[0].x) == 50
    fig = cache_bytes_figure({"ours": 10, "full K/V": 40})
    assert list(fig.data[0].y) == [10, 40]
    fig = checkpoint_bytes_figure({"a": 3_000_000, PADDING: 1_000_000, "empty": 0})
    assert list(fig.data[0].y) == ["a", PADDING]
    with pytest.raises(ValueError, match="must match"):
        logits_parity_figure(ours, ours[:2])


def test_gantt_bars_are_the_schedule_in_microseconds():
    times = cm.LayerTimes(attn0=3e-6, dense0=2e-6, dispatch=4e-6, moe=1e-6, combine=5e-6, dense1=6e-6)
    fig = gantt_figure(times, schedules=("sbo",))
    bars = {(bar.y[0], bar.name): (bar.base[0], bar.x[0]) for bar in fig.data}
    spans = {
        (f"sbo · {lane}", stage): (start * 1e6, (end - start) * 1e6)
        for lane, stage, start, end in cm.layer_gantt(times, "sbo")
    }
    assert bars.keys() == spans.keys()
    for key, (base, width) in spans.items():
        assert bars[key] == pytest.approx((base, width))
    assert max(b + w for b, w in bars.values()) == pytest.approx(cm.layer_time(times, "sbo") * 1e6)


def test_tpot_bars_are_milliseconds_per_schedule():
    results = {
        "paper": {
            "sequential": {"tpot_s": 0.020, "cost_per_million": 0.12},
            "sbo": {"tpot_s": 0.016, "cost_per_million": 0.09},
        }
    }
    fig = tpot_figure(results)
    assert list(fig.data[0].x) == [cm.SCHEDULE_NAMES["sequential"], cm.SCHEDULE_NAMES["sbo"]]
    assert list(fig.data[0].y) == pytest.approx([20.0, 16.0])
    assert fig.data[0].text[1] == "16.0 ms<br>$0.090/M"
