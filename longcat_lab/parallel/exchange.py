"""The token exchange of expert parallelism: an uneven all-to-all that autograd can go through.

`torch.distributed.all_to_all_single` with split sizes is an alltoallv, which gloo supports too, so no send/recv
emulation is needed. An exchange is two autograd nodes, launch and wait, so that work can run between them: in
forward the caller computes while the rows travel; in backward the wait node launches the reverse exchange of the
gradient and the launch node waits for it, so the reverse exchange also runs while other backward work computes.

Shape legend: P rows this rank sends, R rows this rank receives, D row width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Exchange:
    """One all-to-all in flight. `send_splits[r]` rows go to rank r, `recv_splits[r]` rows come from rank r.
    The backward fields are filled by the wait node's backward and consumed by the launch node's backward."""

    send_splits: list[int]
    recv_splits: list[int]
    group: Any
    work: Any = None
    out: torch.Tensor | None = None
    backward_work: Any = None
    backward_out: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        """Block until the rows have arrived and return them (attached to the autograd graph)."""
        return _ExchangeWait.apply(self.out, self)


class _ExchangeLaunch(torch.autograd.Function):
    """Forward: start the all-to-all and return its (not yet filled) output buffer.
    Backward: wait for the reverse exchange that `_ExchangeWait.backward` started, and return its result."""

    @staticmethod
    def forward(ctx, x_PD: torch.Tensor, ex: Exchange) -> torch.Tensor:
        out_RD = x_PD.new_empty((sum(ex.recv_splits), *x_PD.shape[1:]))
        ex.work = dist.all_to_all_single(
            out_RD, x_PD.contiguous(), ex.recv_splits, ex.send_splits, group=ex.group, async_op=True
        )
        ctx.ex = ex
        return out_RD

    @staticmethod
    def backward(ctx, _grad_RD: torch.Tensor):
        # _grad_RD is the gradient `_ExchangeWait.backward` passed through; the real one is travelling back.
        ex = ctx.ex
        ex.backward_work.wait()
        grad_PD, ex.backward_work, ex.backward_out = ex.backward_out, None, None
        return grad_PD, None


class _ExchangeWait(torch.autograd.Function):
    """Forward: wait for the exchange. Backward: launch the reverse exchange (splits swapped) of the incoming
    gradient and return at once, so whatever autograd runs next (the dense branch's backward) overlaps it."""

    @staticmethod
    def forward(ctx, out_RD: torch.Tensor, ex: Exchange) -> torch.Tensor:
        ex.work.wait()
        ex.work = None
        ctx.ex = ex
        return out_RD

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        ex = ctx.ex
        grad_PD = grad_RD.new_empty((sum(ex.send_splits), *grad_RD.shape[1:]))
        ex.backward_work = dist.all_to_all_single(
            grad_PD, grad_RD.contiguous(), ex.send_splits, ex.recv_splits, group=ex.group, async_op=True
        )
        ex.backward_out = grad_PD
        return grad_RD, None


def exchange(x_PD: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> Exchange:
    """Launch an uneven all-to-all of the rows of x (autograd-aware); call `.wait()` on the result for the rows."""
    if len(send_splits) != len(recv_splits) or sum(send_splits) != x_PD.shape[0]:
        raise ValueError(
            f"send_splits={send_splits} must sum to the {x_PD.shape[0]} rows of x and have one entry "
            f"per rank like recv_splits={recv_splits}"
        )
    ex = Exchange(list(send_splits), list(recv_splits), group)
    ex.out = _ExchangeLaunch.apply(x_PD, ex)
    return ex


__all__ = ["Exchange", "exchange"]
