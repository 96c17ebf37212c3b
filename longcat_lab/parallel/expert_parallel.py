"""Expert parallelism for the shortcut-connected MoE (paper 2.2, 5.3; docs/design.md §8.1, SBO), as a swap of the
MoE's token dispatcher inside an existing `LongCatLM`: the layer equation stays the model's own.

- `AllToAllDispatcher`: the FFN experts are sharded by expert across the ranks of a `torch.distributed` group (gloo
  on CPU, NCCL on GPUs). The router is the model's own, replicated; each rank routes its own tokens, sends every
  (token, FFN expert) pair to the rank that owns the expert (all-to-all *dispatch*, uneven splits, `exchange`),
  runs its local experts, and sends the results back (all-to-all *combine*). Zero experts are the identity, so they
  are applied locally and never travel. Before each dispatch the ranks swap a [world, local experts] table of row
  counts (one small synchronous all-to-all and one host sync per MoE block): a receiver must know how many rows
  come from each rank, and for which of its experts, before it can allocate and use them.
- The schedule is the layer's: `LongCatLayer.forward` starts the MoE right after the first attention, computes it
  after FFN_0 or after the second attention (`experts_after`), and finishes it at the end of the layer, so the dense
  work in between hides the exchanges. `overlap=False` waits for each exchange at once instead: the "sequential"
  schedule, the vanilla order, to compare against.
- `apply_expert_parallel` swaps this into a model; `all_reduce_replicated_grads` sums the gradients of everything
  but the expert shards after backward (the exchange's backward already brought each shard its gradients).

Every region runs under a profiler label (`region`) "ep.<part>" (here: router, counts,
dispatch.launch, dispatch.wait, experts, combine.launch, combine.wait, finish) that `longcat_lab.perf.trace` reads.

Shape legend: T tokens on this rank, D model dim, K top-k, P (token, FFN expert) pairs this rank sends, R rows this
rank receives, W world size, L experts per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from longcat_lab._util import check_choice
from longcat_lab.model.dispatch import MoEPending, region
from longcat_lab.model.model import EXPERTS_AFTER, LongCatLM
from longcat_lab.model.moe import Experts, MoE, sort_pairs, zero_expert_output
from longcat_lab.model.routing import RouterOutput
from longcat_lab.parallel.exchange import Exchange, exchange


@dataclass
class _InFlight:
    """One MoE call between start and finish: which pairs travel where, and the exchange in flight (or its rows)."""

    token_idx_P: torch.Tensor  # the token of each travelling pair, pairs sorted by expert id
    weights_P: torch.Tensor  # the router weight of each travelling pair (fp32, in the graph)
    send_splits: list[int]  # pairs to each rank (the ranks own contiguous expert ranges)
    recv_splits: list[int]  # rows from each rank
    recv_expert_ids_R: torch.Tensor  # local expert id of each received row
    dispatch: Exchange | torch.Tensor  # in flight, or the received rows once waited for
    combine: Exchange | torch.Tensor | None = None


def _waited(ex: Exchange | torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(ex, torch.Tensor):
        return ex
    with region(f"ep.{name}.wait"):
        return ex.wait()


class AllToAllDispatcher:
    """MoE(u) = sum over chosen i of gamma * p_i * E_i(u) (paper Eq. 1), with FFN expert i living on rank i // L.

    The MoE's `experts` must be this rank's shard (`apply_expert_parallel` puts it there): an `Experts` of L experts
    [rank * L, (rank + 1) * L), which runs the received rows as top-1 routing with weight 1. The router weights are
    applied on the sending side after combine, so the router's gradient never travels. Holds no tensors;
    `last_stats` counts the rows the last call moved (for tests and notebook 04)."""

    def __init__(self, group, n_ffn: int, overlap: bool = True):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_ffn % self.world:
            raise ValueError(
                f"n_routed_experts={n_ffn} is not allowed with a world size of {self.world}: "
                "it must be a multiple of the number of ranks"
            )
        self.n_ffn, self.local = n_ffn, n_ffn // self.world
        self.overlap = overlap
        self.last_stats: dict[str, int] = {}

    def start(self, moe: MoE, u_TD: torch.Tensor, routed: RouterOutput, cache=None) -> _InFlight:
        """Sort the FFN pairs by expert, swap the per-(rank, expert) row counts, launch dispatch."""
        with region("ep.sort"):
            K = routed.topk_ids_TK.shape[1]
            order_P, counts_N = sort_pairs(routed.topk_ids_TK, self.n_ffn)
            counts_WL = counts_N.view(self.world, self.local)
        with region("ep.counts"):
            recv_counts_WL = torch.empty_like(counts_WL)
            dist.all_to_all_single(recv_counts_WL, counts_WL, group=self.group)
            send_splits = counts_WL.sum(1).tolist()  # the block's host sync
            recv_splits = recv_counts_WL.sum(1).tolist()
        n_pairs = sum(send_splits)
        pair_idx = order_P[:n_pairs]
        self.last_stats = {
            "pairs_sent": n_pairs,
            "pairs_sent_to_others": n_pairs - send_splits[self.rank],
            "rows_received": sum(recv_splits),
            "zero_expert_pairs": int(order_P.numel()) - n_pairs,
        }
        token_idx_P = pair_idx // K
        with region("ep.dispatch.launch"):
            dispatch = exchange(u_TD[token_idx_P], send_splits, recv_splits, self.group)
        # Rows from each source arrive sorted by expert: expert e's rows from source s are recv_counts_WL[s, e].
        local_ids = torch.arange(self.local, device=u_TD.device).repeat(self.world)
        flight = _InFlight(
            token_idx_P,
            routed.topk_weights_TK.reshape(-1)[pair_idx],
            send_splits,
            recv_splits,
            torch.repeat_interleave(local_ids, recv_counts_WL.flatten()),
            dispatch,
        )
        if not self.overlap:
            flight.dispatch = _waited(dispatch, "dispatch")
        return flight

    def compute(self, moe: MoE, pending: MoEPending) -> _InFlight:
        """Wait for dispatch, run this rank's experts on what arrived, launch combine."""
        flight: _InFlight = pending.state
        x_RD = _waited(flight.dispatch, "dispatch")
        with region("ep.experts"):
            ids_R1 = flight.recv_expert_ids_R[:, None]
            y_RD = moe.experts(x_RD, ids_R1, torch.ones(ids_R1.shape, device=x_RD.device))
        with region("ep.combine.launch"):
            flight.combine = exchange(y_RD, flight.recv_splits, flight.send_splits, self.group)
        if not self.overlap:
            flight.combine = _waited(flight.combine, "combine")
        return flight

    def finish(self, moe: MoE, pending: MoEPending) -> torch.Tensor:
        """Wait for combine; weighted scatter-add of the returned rows, plus the zero (identity) experts."""
        flight: _InFlight = pending.state
        u_TD, routed = pending.u_TD, pending.routed
        y_PD = _waited(flight.combine, "combine")
        with region("ep.finish"):
            out_TD = torch.zeros_like(u_TD)
            if y_PD.shape[0]:
                out_TD = out_TD.index_add(0, flight.token_idx_P, y_PD * flight.weights_P[:, None].to(u_TD.dtype))
            return out_TD + zero_expert_output(u_TD, routed.topk_ids_TK, routed.topk_weights_TK, self.n_ffn)


def _shard(experts: Experts, first: int, count: int, config) -> Experts:
    """An `Experts` of experts [first, first + count) of `experts`, holding copies of their weights as new
    Parameters (a view would keep the whole stacked tensor alive)."""
    shard = Experts(config.replace(n_routed_experts=count, moe_topk=1))
    shard.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[first : first + count].clone())
    shard.down_proj = nn.Parameter(experts.down_proj.detach()[first : first + count].clone())
    return shard


def set_schedule(model: LongCatLM, overlap: bool = True, experts_after: str = "attn1") -> LongCatLM:
    """Switch an expert-parallel model between the sequential schedule (`overlap=False`: every exchange waited for
    at once) and the overlapped one, and pick where the experts sit (`experts_after`, see `LongCatLayer`)."""
    check_choice("experts_after", experts_after, EXPERTS_AFTER)
    check_choice("overlap", overlap, (True, False))
    dispatchers = [moe.dispatcher for moe in model.moe_blocks()]
    if not dispatchers or not all(isinstance(d, AllToAllDispatcher) for d in dispatchers):
        raise ValueError("model is not expert-parallel: call apply_expert_parallel(model) first")
    for d in dispatchers:
        d.overlap = overlap
    for layer in model.layers:
        layer.experts_after = experts_after
    return model


def apply_expert_parallel(
    model: LongCatLM, group=None, overlap: bool = True, experts_after: str = "attn1"
) -> LongCatLM:
    """Make `model` (layer_style "scmoe") expert-parallel over `group` (default: the whole world) in place and return
    it: each MoE keeps only this rank's shard of FFN experts and dispatches through `AllToAllDispatcher`; everything
    else stays replicated. Build the same model on every rank first (e.g. from one seed or one checkpoint).

    Each rank then feeds its own batch (data-parallel attention, as in wide-EP serving); `model(idx, targets=...)`
    returns this rank's logits and mean loss over its tokens. To train, call `all_reduce_replicated_grads(model)`
    after backward. The router's `expert_counts` (read by the bias controller, docs/design.md §2.1) count this rank's
    tokens only: they are not all-reduced, so under expert parallelism each rank's controller sees its own load."""
    if model.config.layer_style != "scmoe":
        raise ValueError(
            f"layer_style={model.config.layer_style!r} is not allowed: expert parallelism here "
            "overlaps the shortcut-connected layer, layer_style='scmoe'"
        )
    check_choice("experts_after", experts_after, EXPERTS_AFTER)
    check_choice("overlap", overlap, (True, False))
    if not dist.is_initialized():
        raise ValueError(
            "apply_expert_parallel needs an initialised torch.distributed process group "
            "(see longcat_lab.parallel.launch)"
        )
    if any(isinstance(moe.dispatcher, AllToAllDispatcher) for moe in model.moe_blocks()):
        raise ValueError("model is expert-parallel already: use set_schedule to change its schedule")
    for moe in model.moe_blocks():
        dispatcher = AllToAllDispatcher(group, moe.n_ffn, overlap)
        moe.experts = _shard(moe.experts, dispatcher.rank * dispatcher.local, dispatcher.local, model.config)
        moe.dispatcher = dispatcher
    return set_schedule(model, overlap, experts_after)


def expert_shard_parameters(model: LongCatLM) -> list[nn.Parameter]:
    """This rank's expert weights in an expert-parallel model (every other parameter is replicated)."""
    return [
        p
        for moe in model.moe_blocks()
        if isinstance(moe.dispatcher, AllToAllDispatcher)
        for p in moe.experts.parameters()
    ]


def all_reduce_replicated_grads(model: LongCatLM, group=None) -> None:
    """Sum the gradients of every replicated parameter over the ranks. Expert shards need none: combine's backward
    already brought each rank the gradients of its experts from every rank's tokens. Scale each rank's loss by its
    share of the global tokens before backward for the gradient of the global mean."""
    shard = {id(p) for p in expert_shard_parameters(model)}
    for p in model.parameters():
        if id(p) not in shard and p.grad is not None:
            dist.all_reduce(p.grad, group=group)


__all__ = [
    "AllToAllDispatcher",
    "all_reduce_replicated_grads",
    "apply_expert_parallel",
    "expert_shard_parameters",
    "set_schedule",
]
