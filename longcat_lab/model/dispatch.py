"""The MoE's token dispatcher: how routed tokens reach their experts and come back (docs/design.md §8.1, §10).

`MoE` routes, then hands the tokens to its `dispatcher` in three stages, so that the layer can run dense work while
the experts' tokens are in flight (the point of the shortcut-connected layer, paper 2.2):
    state = dispatcher.start(moe, u_TD, routed, cache)   # e.g. sort pairs and launch an exchange
    state = dispatcher.compute(moe, pending)             # run the experts (pending.state is start's state)
    out_TD = dispatcher.finish(moe, pending)             # FFN experts and zero experts, [T, D]
Each stage receives the calling `MoE` as `moe` (typed `nn.Module` here: `moe.py` builds on this module).
`LocalDispatcher` runs every expert in this process; `longcat_lab.parallel` swaps in dispatchers that exchange
tokens between ranks or run the experts on a side CUDA stream, on the same model. `region` labels each part of a
layer for the profiler.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longcat_lab.model.routing import RouterOutput


def region(name: str) -> contextlib.AbstractContextManager:
    """A profiler label "ep.<part>" for a region of a layer, or a no-op context when no torch profiler is running,
    so that decoding pays nothing for the labels. `longcat_lab.perf.trace` reads these labels."""
    if torch.autograd.profiler._is_profiler_enabled:  # read at call time: the profiler flips this module flag
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


@dataclass
class MoEPending:
    """One MoE block's work between `MoE.start` and `MoE.finish`: its input tokens, the router's decision, the
    input's [B, S, D] shape, the dispatcher's own `state`, and whether `MoE.compute` has run."""

    u_TD: torch.Tensor
    routed: RouterOutput
    shape: tuple[int, int, int]
    state: Any = None
    computed: bool = False


class LocalDispatcher:
    """Every expert runs here, in this process, when the layer calls `MoE.compute`. Its state is the decoding
    cache (or None) after `start` and the experts' output [T, D] after `compute`."""

    def start(self, moe: nn.Module, u_TD: torch.Tensor, routed: RouterOutput, cache: Any = None) -> Any:
        return cache

    def compute(self, moe: nn.Module, pending: MoEPending) -> torch.Tensor:
        routed = pending.routed
        return moe.experts(pending.u_TD, routed.topk_ids_TK, routed.topk_weights_TK, pending.state)

    def finish(self, moe: nn.Module, pending: MoEPending) -> torch.Tensor:
        return pending.state
