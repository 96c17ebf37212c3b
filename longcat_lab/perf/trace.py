"""Read torch.profiler Chrome/Perfetto traces of expert-parallel steps (written by `perf.overlap`) and
measure how much of the communication ran under compute. `longcat_lab.viz.perf.timeline_figure` draws the spans.

What a trace holds, and how it is read:
- "ep.<part>" user annotations on the rank's main thread (the model's layers and their dispatchers label every region):
  compute parts (attn0, ffn0, attn1, ffn1, router, experts, finish, embed, head), host-side exchange work
  ("launch": gathering the rows and starting the exchange), and time spent blocked ("wait": dispatch.wait,
  combine.wait, and counts, the small synchronous exchange of row counts).
- Communication itself: on CPU, gloo runs each collective on its own worker thread and the profiler records it as a
  "gloo:<op>" event there, so its start and end are on the same clock as the annotations. On GPU, NCCL kernels
  ("nccl..." kernel events); other kernels are GPU compute. The GPU reading is written but untested (no GPU here).
- "ep.step.<schedule>" brackets one whole forward step of a schedule.

Hidden fraction = |communication intervals ∩ compute intervals| / |communication intervals|, unions taken within
each profiled step, summed over steps. A gloo collective's span runs from when its thread picks it up until the
data has arrived, so it includes waiting for the other rank to reach the same collective. On CPU "compute" is where
the main thread was inside a compute region, which includes moments when the OS ran the gloo thread instead on a
shared core: the fraction says what overlapped in time, not what was free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

COMPUTE_PARTS = ("embed", "attn0", "router", "sort", "ffn0", "attn1", "experts", "ffn1", "finish", "head")
LAUNCH_PARTS = ("dispatch.launch", "combine.launch")
WAIT_PARTS = ("counts", "dispatch.wait", "combine.wait")
LANES = ("compute", "launch", "wait", "comm")


@dataclass(frozen=True)
class Span:
    """One interval of a trace, in microseconds on the trace clock (shared by ranks on one host)."""

    rank: int
    lane: str  # "compute", "launch", "wait", "comm", or "step"
    name: str  # the part ("attn0", "dispatch.wait", ...), "exchange"/"counts exchange" for comm, or a schedule
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def load_trace(path: str | os.PathLike, rank: int | None = None) -> list[Span]:
    """Spans of one rank's Chrome trace. The rank comes from the trace's distributedInfo unless given."""
    if not os.path.isfile(path):
        raise ValueError(f"path={str(path)!r} is not a trace file: it must be a Chrome trace JSON that exists")
    with open(path) as f:
        trace = json.load(f)
    if rank is None:
        rank = int(trace.get("distributedInfo", {}).get("rank", 0))
    spans, comm, kernels = [], [], []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name, start = e["name"], float(e["ts"])
        end = start + float(e["dur"])
        if name.startswith("ep.step."):
            spans.append(Span(rank, "step", name[len("ep.step.") :], start, end))
        elif name.startswith("ep."):
            part = name[3:]
            lane = (
                "compute"
                if part in COMPUTE_PARTS
                else "launch"
                if part in LAUNCH_PARTS
                else "wait"
                if part in WAIT_PARTS
                else None
            )
            if lane:
                spans.append(Span(rank, lane, part, start, end))
        elif name.startswith("gloo:") and name != "gloo:barrier":
            comm.append((start, end))
        elif e.get("cat") == "kernel":
            (comm if "nccl" in name.lower() else kernels).append((start, end))
    counts = _union([(s.start, s.end) for s in spans if s.name == "counts"])
    for start, end in comm:
        # The row-count exchange is the collective that runs inside a "counts" region; the rest move tokens.
        is_counts = _overlap(_union([(start, end)]), counts) > 0.5 * (end - start)
        spans.append(Span(rank, "comm", "counts exchange" if is_counts else "exchange", start, end))
    if kernels:
        # On GPU the compute lane is the kernels themselves; the host-side annotations only show launch order.
        spans = [s for s in spans if s.lane != "compute"]
        spans += [Span(rank, "compute", "gpu kernel", s, e) for s, e in kernels]
    return sorted(spans, key=lambda s: (s.start, s.lane))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def step_windows(spans: list[Span], schedule: str) -> list[tuple[float, float]]:
    """(start, end) of every profiled step of `schedule`, in trace order."""
    steps = [(s.start, s.end) for s in spans if s.lane == "step" and s.name == schedule]
    if not steps:
        found = sorted({s.name for s in spans if s.lane == "step"})
        raise ValueError(f"schedule={schedule!r} has no 'ep.step.{schedule}' span in this trace; found {found}")
    return sorted(steps)


def _clipped(spans: list[Span], lo: float, hi: float, pred) -> list[tuple[float, float]]:
    """The union of the spans that `pred` accepts, clipped to the window [lo, hi]."""
    return _union([(max(s.start, lo), min(s.end, hi)) for s in spans if pred(s) and s.end > lo and s.start < hi])


def overlap_stats(spans: list[Span], schedule: str) -> dict[str, float]:
    """One rank's figures in microseconds per step, averaged over its profiled steps of `schedule`: step time,
    token-exchange time (union of the dispatch and combine collectives), how much of it ran under compute and that
    fraction (total hidden / total exchange), the row-count exchange, time blocked, and time in compute regions."""
    totals = dict.fromkeys(("step_us", "comm_us", "hidden_us", "counts_us", "wait_us", "compute_us"), 0.0)
    windows = step_windows(spans, schedule)
    for lo, hi in windows:
        exchange = _clipped(spans, lo, hi, lambda s: s.lane == "comm" and s.name == "exchange")
        compute = _clipped(spans, lo, hi, lambda s: s.lane == "compute")
        totals["step_us"] += hi - lo
        totals["comm_us"] += _length(exchange)
        totals["hidden_us"] += _overlap(exchange, compute)
        totals["counts_us"] += _length(
            _clipped(spans, lo, hi, lambda s: s.lane == "comm" and s.name == "counts exchange")
        )
        totals["wait_us"] += _length(_clipped(spans, lo, hi, lambda s: s.lane == "wait"))
        totals["compute_us"] += _length(compute)
    out = {k: v / len(windows) for k, v in totals.items()}
    out["hidden_fraction"] = totals["hidden_us"] / totals["comm_us"] if totals["comm_us"] else 0.0
    out["steps"] = len(windows)
    return out


def work_under_exchange(spans: list[Span], schedule: str) -> list[list[str]]:
    """For each token dispatch in the first profiled step of `schedule`, in order: the compute parts the main thread
    ran after launching it and before waiting for it. This is program order, so unlike the hidden time it does not
    depend on how busy the machine is: empty for the sequential schedule, the dense branch for the overlapped one."""
    lo, hi = step_windows(spans, schedule)[0]
    main = [s for s in spans if lo <= s.start < hi and s.lane in ("compute", "launch", "wait")]
    out = []
    for i, launch in enumerate(main):
        if launch.name != "dispatch.launch":
            continue
        wait = next((s for s in main[i + 1 :] if s.name == "dispatch.wait"), None)
        end = wait.start if wait is not None else hi
        out.append([s.name for s in main[i + 1 :] if s.lane == "compute" and s.start >= launch.end and s.end <= end])
    return out


def stats_table(traces: list[list[Span]], schedules: tuple[str, ...] = ("sequential", "overlapped")) -> list[dict]:
    """One row per (schedule, rank) of `overlap_stats`, in milliseconds, for printing or a DataFrame."""
    rows = []
    for schedule in schedules:
        for spans in traces:
            st = overlap_stats(spans, schedule)
            rank = next(s.rank for s in spans)
            rows.append(
                {
                    "schedule": schedule,
                    "rank": rank,
                    **{k.replace("_us", "_ms"): (v / 1e3 if k.endswith("_us") else v) for k, v in st.items()},
                }
            )
    return rows


__all__ = ["Span", "load_trace", "overlap_stats", "step_windows", "stats_table", "work_under_exchange", "LANES"]
