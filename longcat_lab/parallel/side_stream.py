"""One GPU: the MoE's experts on a side CUDA stream beside the dense branch, as a swap of the MoE's token dispatcher
(`SideStreamDispatcher`, `apply_side_stream`), and `time_side_stream` to time it against the plain model.

The layer (`LongCatLayer.forward`) starts the MoE right after the first attention and computes it after FFN_0 or the
second attention, so the dense kernels before that point are already queued on the main stream when the experts'
host sync (their slice sizes) blocks the host; the experts then run on the side stream beside FFN_1. Untested here:
this project's CI has no GPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from longcat_lab._util import check_int
from longcat_lab.model.dispatch import LocalDispatcher, MoEPending, region
from longcat_lab.model.model import LongCatLM
from longcat_lab.model.moe import MoE
from longcat_lab.model.routing import RouterOutput


class SideStreamDispatcher:
    """`LocalDispatcher`'s arithmetic with the experts on a side CUDA stream. Its state is the cache after `start`,
    and the experts' output [T, D] (still being computed on the side stream) after `compute`."""

    def __init__(self):
        self.side = torch.cuda.Stream()

    def start(self, moe: MoE, u_TD: torch.Tensor, routed: RouterOutput, cache: Any = None) -> Any:
        if not u_TD.is_cuda:
            raise ValueError(f"the MoE input is on {u_TD.device}: SideStreamDispatcher needs CUDA tensors (one GPU)")
        self.side.wait_stream(torch.cuda.current_stream())  # u and the routing are ready before it reads
        return cache

    def compute(self, moe: MoE, pending: MoEPending) -> torch.Tensor:
        routed = pending.routed
        with torch.cuda.stream(self.side), region("ep.experts"):
            return moe.experts(pending.u_TD, routed.topk_ids_TK, routed.topk_weights_TK, pending.state)

    def finish(self, moe: MoE, pending: MoEPending) -> torch.Tensor:
        main = torch.cuda.current_stream()
        with region("ep.finish"):
            main.wait_stream(self.side)
            out_TD = pending.state
            out_TD.record_stream(main)  # freed later on main: keep the allocator honest
            return out_TD


def _check_cuda(model: LongCatLM, what: str) -> None:
    if model.config.layer_style != "scmoe":
        raise ValueError(f"layer_style={model.config.layer_style!r} is not allowed: it must be 'scmoe'")
    if model.device.type != "cuda":
        raise ValueError(f"the model is on {model.device}: {what} needs a CUDA device (one GPU)")


def apply_side_stream(model: LongCatLM) -> LongCatLM:
    """Run each MoE's experts of `model` (layer_style "scmoe", on a CUDA device) on a side CUDA stream, in place."""
    _check_cuda(model, "apply_side_stream")
    for moe in model.moe_blocks():
        moe.dispatcher = SideStreamDispatcher()
    return model


def time_side_stream(model: LongCatLM, idx: torch.Tensor, reps: int = 20) -> dict:
    """Inference forward seconds of `model` with its experts on the main stream and on a side stream, interleaved
    after one warm-up each, each step synchronised. Returns per-step times, medians and the ratio. CUDA only; the
    model's dispatchers are put back afterwards."""
    _check_cuda(model, "time_side_stream")
    check_int("reps", reps)
    moes = model.moe_blocks()
    own = [moe.dispatcher for moe in moes]
    dispatchers = {
        "sequential": [LocalDispatcher() for _ in moes],
        "side_stream": [SideStreamDispatcher() for _ in moes],
    }
    times: dict[str, list[float]] = {name: [] for name in dispatchers}
    try:
        with torch.no_grad():
            for i in range(reps + 1):
                for name, chosen in dispatchers.items():
                    for moe, dispatcher in zip(moes, chosen):
                        moe.dispatcher = dispatcher
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    model(idx)
                    torch.cuda.synchronize()
                    if i:  # the first round warms up
                        times[name].append(time.perf_counter() - t0)
    finally:
        for moe, dispatcher in zip(moes, own):
            moe.dispatcher = dispatcher
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"times": times, "median_s": median, "ratio": median["sequential"] / median["side_stream"]}


__all__ = ["SideStreamDispatcher", "apply_side_stream", "time_side_stream"]
