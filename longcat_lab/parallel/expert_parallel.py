"""Expert parallelism for the shortcut-connected MoE, and the overlapped layer schedule it exists for (paper 2.2,
5.3; docs/design.md §1, SBO).

- `ExpertParallelMoE`: the MoE of an existing `LongCatLayer` with its FFN experts sharded by expert across the ranks
  of a `torch.distributed` group (gloo on CPU, NCCL on GPUs). The router is replicated; each rank routes its own
  tokens, sends every (token, FFN expert) pair to the rank that owns the expert (all-to-all *dispatch*, uneven
  splits), runs its local experts, and sends the results back (all-to-all *combine*). Zero experts are the identity,
  so they are applied locally and never travel.
- The exchange is `torch.distributed.all_to_all_single` with split sizes, which gloo supports (it is an alltoallv),
  so no send/recv emulation is needed. Before each dispatch the ranks swap a [world, local experts] table of row
  counts (one small synchronous all-to-all and one host sync per MoE block): a receiver must know how many rows come
  from each rank, and for which of its experts, before it can allocate and use them.
- Autograd goes through the exchange: an exchange is two autograd nodes, launch and wait. In backward, the wait node
  launches the reverse exchange of the gradient and the launch node waits for it, so in training too the reverse
  combine runs while the dense branch's backward computes.
- `ExpertParallelLayer` runs one LongCat layer in one of two schedules. "sequential" is the vanilla order: dispatch,
  experts and combine each waited for before anything else runs. "overlapped" is the ScMoE order: dispatch is
  launched right after the first attention and the dense work runs while it is in flight, then the experts, then
  combine is launched and the rest of the dense work runs while it is in flight. `experts_after` picks where the
  experts sit: after FFN_0 and the second attention ("attn1", as the issue words it: dispatch hides FFN_0 + MLA_1,
  combine hides FFN_1) or right after FFN_0 ("ffn0", closer to the paper's SBO stages: dispatch hides FFN_0, combine
  hides MLA_1 + FFN_1). Both give the same numbers as the single-process model.
- `side_stream_forward`: the one-GPU version: the MoE branch on a side CUDA stream beside the dense branch.
- `launch` spawns ranks with torch.multiprocessing; workers live here (`parity_worker`, `overlap_worker`) so that a
  notebook can spawn them.

Every region of a layer runs under a `torch.profiler.record_function` label "ep.<part>" so that traces
(`longcat_lab.profiling`) can tell compute, waiting and communication apart.

Shape legend: T tokens on this rank, D model dim, K top-k, P (token, FFN expert) pairs this rank sends, R rows this
rank receives, W world size, L experts per rank.
"""

from __future__ import annotations

import copy
import datetime
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.profiler import record_function

from longcat_lab.model.config import ModelConfig, check_positive_int
from longcat_lab.model.model import IGNORE_INDEX, Experts, LongCatLayer, LongCatLM, MoE, rope_angles

SCHEDULES = ("sequential", "overlapped")
EXPERTS_AFTER = ("attn1", "ffn0")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: it must be one of {allowed}")


# The exchange ----------------------------------------------------------------------------------------------------
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
        ex.work = dist.all_to_all_single(out_RD, x_PD.contiguous(), ex.recv_splits, ex.send_splits,
                                         group=ex.group, async_op=True)
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
        ex.backward_work = dist.all_to_all_single(grad_PD, grad_RD.contiguous(), ex.send_splits, ex.recv_splits,
                                                  group=ex.group, async_op=True)
        ex.backward_out = grad_PD
        return grad_RD, None


def exchange(x_PD: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> Exchange:
    """Launch an uneven all-to-all of the rows of x (autograd-aware); call `.wait()` on the result for the rows."""
    if len(send_splits) != len(recv_splits) or sum(send_splits) != x_PD.shape[0]:
        raise ValueError(f"send_splits={send_splits} must sum to the {x_PD.shape[0]} rows of x and have one entry "
                         f"per rank like recv_splits={recv_splits}")
    ex = Exchange(list(send_splits), list(recv_splits), group)
    ex.out = _ExchangeLaunch.apply(x_PD, ex)
    return ex


# The expert-parallel MoE -----------------------------------------------------------------------------------------
@dataclass
class DispatchPlan:
    """What one rank decided for one MoE call: its routing, which pairs travel where, and what it will receive."""

    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor        # fp32, attached to the graph through the router
    token_idx_P: torch.Tensor            # the token of each travelling pair, pairs sorted by expert id
    weights_P: torch.Tensor              # the router weight of each travelling pair
    send_splits: list[int]               # pairs to each rank (the ranks own contiguous expert ranges)
    recv_splits: list[int]               # rows from each rank
    recv_expert_ids_R: torch.Tensor      # local expert id of each received row


class ExpertParallelMoE(nn.Module):
    """MoE(u) = sum over chosen i of gamma * p_i * E_i(u) (paper Eq. 1), with FFN expert i living on rank i // L.

    Built from an existing `MoE`: the router is shared with it (replicated on every rank); this rank's experts
    [rank * L, (rank + 1) * L) are copied into an `Experts` module of L experts, which runs the received rows as
    top-1 routing with weight 1. The router weights are applied on the sending side after combine, exactly as the
    single-process `Experts` applies them, so the router's gradient never travels."""

    def __init__(self, moe: MoE, config: ModelConfig, group=None):
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        N = moe.n_ffn
        if N % self.world:
            raise ValueError(f"n_routed_experts={N} is not allowed with a world size of {self.world}: "
                             "it must be a multiple of the number of ranks")
        self.n_ffn, self.top_k, self.local = N, config.moe_topk, N // self.world
        self.first = self.rank * self.local
        self.router = moe.router
        self.last_stats: dict[str, int] = {}         # rows moved by the last call, for tests and the notebook
        self.experts = Experts(config.replace(n_routed_experts=self.local, moe_topk=1))
        with torch.no_grad():
            self.experts.gate_up_proj.copy_(moe.experts.gate_up_proj[self.first:self.first + self.local])
            self.experts.down_proj.copy_(moe.experts.down_proj[self.first:self.first + self.local])

    def route(self, u_TD: torch.Tensor) -> DispatchPlan:
        """Router, sort the FFN pairs by expert, and swap the per-(rank, expert) row counts with every rank."""
        with record_function("ep.router"):
            topk_ids_TK, topk_weights_TK, _, _ = self.router(u_TD)
            ids_P = topk_ids_TK.reshape(-1)
            order_P = torch.argsort(ids_P, stable=True)                 # FFN experts (ids < N) sort first
            counts_WL = torch.bincount(ids_P, minlength=self.n_ffn + 1)[:self.n_ffn].view(self.world, self.local)
        with record_function("ep.counts"):
            recv_counts_WL = torch.empty_like(counts_WL)
            dist.all_to_all_single(recv_counts_WL, counts_WL, group=self.group)
            send_splits = counts_WL.sum(1).tolist()                     # the block's host sync
            recv_splits = recv_counts_WL.sum(1).tolist()
        n_pairs = sum(send_splits)
        pair_idx = order_P[:n_pairs]
        self.last_stats = {"pairs_sent": n_pairs, "pairs_sent_to_others": n_pairs - send_splits[self.rank],
                           "rows_received": sum(recv_splits), "zero_expert_pairs": int(ids_P.numel()) - n_pairs}
        # Rows from each source arrive sorted by expert: expert e's rows from source s are recv_counts_WL[s, e].
        local_ids = torch.arange(self.local, device=u_TD.device).repeat(self.world)
        return DispatchPlan(
            topk_ids_TK=topk_ids_TK, topk_weights_TK=topk_weights_TK,
            token_idx_P=pair_idx // self.top_k, weights_P=topk_weights_TK.reshape(-1)[pair_idx],
            send_splits=send_splits, recv_splits=recv_splits,
            recv_expert_ids_R=torch.repeat_interleave(local_ids, recv_counts_WL.flatten()))

    def dispatch(self, u_TD: torch.Tensor, plan: DispatchPlan) -> Exchange:
        with record_function("ep.dispatch.launch"):
            return exchange(u_TD[plan.token_idx_P], plan.send_splits, plan.recv_splits, self.group)

    def run_experts(self, x_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        with record_function("ep.experts"):
            ids_R1 = plan.recv_expert_ids_R[:, None]
            return self.experts(x_RD, ids_R1, torch.ones(ids_R1.shape, device=x_RD.device))

    def combine(self, y_RD: torch.Tensor, plan: DispatchPlan) -> Exchange:
        with record_function("ep.combine.launch"):
            return exchange(y_RD, plan.recv_splits, plan.send_splits, self.group)

    def finish(self, u_TD: torch.Tensor, y_PD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Weighted scatter-add of the returned rows, plus the zero (identity) experts, computed here."""
        with record_function("ep.finish"):
            out_TD = torch.zeros_like(u_TD)
            if y_PD.shape[0]:
                out_TD = out_TD.index_add(0, plan.token_idx_P, y_PD * plan.weights_P[:, None].to(u_TD.dtype))
            zero_weight_T = (plan.topk_weights_TK * (plan.topk_ids_TK >= self.n_ffn)).sum(dim=-1)
            return out_TD + zero_weight_T[:, None].to(u_TD.dtype) * u_TD

    def forward(self, u_TD: torch.Tensor) -> torch.Tensor:
        """The whole MoE with nothing overlapped (each exchange waited for at once)."""
        plan = self.route(u_TD)
        y_RD = self.run_experts(_waited(self.dispatch(u_TD, plan), "dispatch"), plan)
        return self.finish(u_TD, _waited(self.combine(y_RD, plan), "combine"), plan)


def _waited(ex: Exchange, name: str) -> torch.Tensor:
    with record_function(f"ep.{name}.wait"):
        return ex.wait()


class ExpertParallelLayer(nn.Module):
    """One shortcut-connected LongCat layer (docs/design.md §1) with an expert-parallel MoE:
        h1 = x + MLA_0(N_in0(x));  u = N_post0(h1);  m = MoE(u);  h2 = h1 + FFN_0(u)
        h3 = h2 + MLA_1(N_in1(h2));  y = h3 + FFN_1(N_post1(h3)) + m
    The dense modules are the source layer's own (shared, not copied); the experts are this rank's shard."""

    def __init__(self, layer: LongCatLayer, config: ModelConfig, group=None):
        super().__init__()
        if layer.style != "scmoe":
            raise ValueError(f"layer_style={layer.style!r} is not allowed: the expert-parallel layer implements "
                             "the shortcut-connected layer, layer_style='scmoe'")
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.self_attn = layer.self_attn
        self.mlps = layer.mlps
        self.mlp = ExpertParallelMoE(layer.mlp, config, group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, schedule: str = "overlapped",
                experts_after: str = "attn1") -> torch.Tensor:
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("experts_after", experts_after, EXPERTS_AFTER)
        B, S, D = x.shape
        with record_function("ep.attn0"):
            h1 = x + self.self_attn[0](self.input_layernorm[0](x), cos, sin)
            u = self.post_attention_layernorm[0](h1)
        u_TD = u.reshape(B * S, D)
        moe = self.mlp
        plan = moe.route(u_TD)
        if schedule == "sequential":
            y_RD = moe.run_experts(_waited(moe.dispatch(u_TD, plan), "dispatch"), plan)
            m_TD = moe.finish(u_TD, _waited(moe.combine(y_RD, plan), "combine"), plan)
            h3, f1 = self._dense_after_ffn0(h1, u, cos, sin, "all")
        else:
            pending = moe.dispatch(u_TD, plan)
            # The shortcut: nothing below needs the MoE until the last line, so the dense work hides the exchange.
            h3, f1 = self._dense_after_ffn0(h1, u, cos, sin, "upto_" + experts_after)
            y_RD = moe.run_experts(_waited(pending, "dispatch"), plan)
            pending = moe.combine(y_RD, plan)
            h3, f1 = self._dense_after_ffn0(h1, u, cos, sin, "after_" + experts_after, h3, f1)
            m_TD = moe.finish(u_TD, _waited(pending, "combine"), plan)
        return h3 + f1 + m_TD.view(B, S, D)

    def _dense_after_ffn0(self, h1, u, cos, sin, part: str, h3=None, f1=None):
        """The dense branch after the first attention, FFN_0 -> MLA_1 -> FFN_1, or the part of it on one side of
        the experts: "upto_ffn0" / "after_ffn0" splits after FFN_0, "upto_attn1" / "after_attn1" after MLA_1.
        h3 carries h2 between the halves when the split is after FFN_0."""
        if part in ("all", "upto_ffn0", "upto_attn1"):
            with record_function("ep.ffn0"):
                h3 = h1 + self.mlps[0](u)                              # h2
        if part in ("all", "upto_attn1", "after_ffn0"):
            with record_function("ep.attn1"):
                h3 = h3 + self.self_attn[1](self.input_layernorm[1](h3), cos, sin)
        if part in ("all", "after_ffn0", "after_attn1"):
            with record_function("ep.ffn1"):
                f1 = self.mlps[1](self.post_attention_layernorm[1](h3))
        return h3, f1


class ExpertParallelLM(nn.Module):
    """`LongCatLM` with expert-parallel MoE layers. Each rank feeds its own batch (data-parallel attention, as in
    wide-EP serving); the dense modules are the source model's own, so deep-copy the model first if the original
    must stay independent. `forward(idx, targets)` returns this rank's logits and mean loss over its tokens."""

    def __init__(self, model: LongCatLM, group=None):
        super().__init__()
        self.config = model.config
        self.group = group
        self.embed_tokens = model.embed_tokens
        self.layers = nn.ModuleList([ExpertParallelLayer(layer, model.config, group) for layer in model.layers])
        self.norm = model.norm
        self.lm_head = model.lm_head
        self._check_ids = model._check_ids          # the same input validation as the source model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, schedule: str = "overlapped",
                experts_after: str = "attn1"):
        _check_choice("schedule", schedule, SCHEDULES)
        _check_choice("experts_after", experts_after, EXPERTS_AFTER)
        self._check_ids("idx", idx)
        if targets is not None:
            self._check_ids("targets", targets, allow_ignore=True)
        with record_function("ep.embed"):
            cos, sin = rope_angles(self.config, torch.arange(idx.shape[1], device=idx.device))
            x = self.embed_tokens(idx.long())
        for layer in self.layers:
            x = layer(x, cos, sin, schedule, experts_after)
        with record_function("ep.head"):
            logits = self.lm_head(self.norm(x)).float()
            loss = None
            if targets is not None:
                loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.long().reshape(-1),
                                                   ignore_index=IGNORE_INDEX)
        return logits, loss

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.mlp.experts.parameters()]

    def sync_replicated_grads(self) -> None:
        """All-reduce (sum) the gradients of every replicated parameter. Expert shards need none: combine's
        backward already brought each rank the gradients of its experts from every rank's tokens."""
        shard = {id(p) for p in self.expert_parameters()}
        for p in self.parameters():
            if id(p) not in shard and p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)


# One GPU: the MoE branch on a side stream ------------------------------------------------------------------------
def side_stream_forward(model: LongCatLM, idx: torch.Tensor) -> torch.Tensor:
    """Logits of `model` (layer_style "scmoe", on a CUDA device) with each layer's MoE on a side CUDA stream while
    the dense branch runs on the current one. The router goes first on the side stream; the dense branch is then
    enqueued before the experts, whose slice sizes need a host sync, so that the GPU already has dense kernels
    queued while the host waits. Untested here: this project's CI and this session had no GPU."""
    if not idx.is_cuda:
        raise ValueError(f"idx is on {idx.device}: side_stream_forward needs CUDA tensors (one GPU)")
    if model.config.layer_style != "scmoe":
        raise ValueError(f"layer_style={model.config.layer_style!r} is not allowed: it must be 'scmoe'")
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    cos, sin = rope_angles(model.config, torch.arange(idx.shape[1], device=idx.device))
    x = model.embed_tokens(idx.long())
    for layer in model.layers:
        B, S, D = x.shape
        h1 = x + layer.self_attn[0](layer.input_layernorm[0](x), cos, sin)
        u = layer.post_attention_layernorm[0](h1)
        u_TD = u.reshape(B * S, D)
        side.wait_stream(main)                                      # u is ready before the side stream reads it
        with torch.cuda.stream(side), record_function("gpu.router"):
            ids_TK, weights_TK, _, _ = layer.mlp.router(u_TD)
        with record_function("gpu.dense"):
            h2 = h1 + layer.mlps[0](u)
            h3 = h2 + layer.self_attn[1](layer.input_layernorm[1](h2), cos, sin)
            f1 = layer.mlps[1](layer.post_attention_layernorm[1](h3))
        with torch.cuda.stream(side), record_function("gpu.experts"):
            m_TD = layer.mlp.experts(u_TD, ids_TK, weights_TK)
        main.wait_stream(side)
        m_TD.record_stream(main)                                    # freed later on main: keep the allocator honest
        x = h3 + f1 + m_TD.view(B, S, D)
    return model.lm_head(model.norm(x)).float()


def time_side_stream(model: LongCatLM, idx: torch.Tensor, reps: int = 20) -> dict:
    """Inference forward seconds of `model` as written (one stream) and of `side_stream_forward`, interleaved
    after one warm-up each, each step synchronised. Returns per-step times, medians and the ratio. CUDA only."""
    if not idx.is_cuda:
        raise ValueError(f"idx is on {idx.device}: time_side_stream needs CUDA tensors (one GPU)")
    check_positive_int("reps", reps)
    runs = {"sequential": lambda: model(idx), "side_stream": lambda: side_stream_forward(model, idx)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for i in range(reps + 1):
            for name, run in runs.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run()
                torch.cuda.synchronize()
                if i:                                               # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"times": times, "median_s": median, "ratio": median["sequential"] / median["side_stream"]}


# Spawning ranks --------------------------------------------------------------------------------------------------
def _entry(rank: int, fn: Callable, world_size: int, backend: str, init_file: str, out_dir: str,
           threads: int, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        tmp = Path(out_dir) / f".result_{rank}.pt.tmp"
        torch.save(result, tmp)
        os.replace(tmp, Path(out_dir) / f"result_{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world_size: int = 2, args: tuple = (), backend: str = "gloo", threads_per_rank: int = 1,
           timeout_s: float = 120.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes inside an initialised process group
    (file:// rendezvous in a temp dir, so nothing listens on a port) and return each rank's return value.
    `fn` must be importable (a module-level library function); a rank's exception is re-raised here, and a
    collective that hangs fails after `timeout_s`."""
    _check_choice("backend", backend, ("gloo", "nccl"))
    check_positive_int("world_size", world_size)
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend='nccl' with world_size={world_size} needs that many GPUs; "
                         f"{torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="longcat_ep_") as tmp:
        mp.start_processes(_entry, args=(fn, world_size, backend, os.path.join(tmp, "rendezvous"), tmp,
                                         threads_per_rank, timeout_s, args),
                           nprocs=world_size, join=True, start_method="spawn")
        return [torch.load(os.path.join(tmp, f"result_{r}.pt"), weights_only=False) for r in range(world_size)]


def seeded_model(config: ModelConfig, seed: int, device: str | torch.device = "cpu") -> LongCatLM:
    """A model whose weights depend only on `seed`, so every rank builds the same one."""
    model = LongCatLM(config)
    model.reset_parameters(generator=torch.Generator().manual_seed(seed))
    return model.to(device)


def _device(backend: str, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")


def _local_rows(batch: int, world: int, rank: int) -> slice:
    """This rank's share of the batch rows: contiguous, as even as possible (ranks may get different sizes)."""
    bounds = [round(batch * r / world) for r in range(world + 1)]
    return slice(bounds[rank], bounds[rank + 1])


def _gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's x along dim 0. Sizes may differ; gloo's all_gather wants equal ones, so pad."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device), group=group)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


# Workers ---------------------------------------------------------------------------------------------------------
def parity_worker(rank: int, world: int, config_dict: dict, seed: int, batch: int, seq_len: int,
                  backend: str = "gloo") -> dict | None:
    """Compare the expert-parallel model with the single-process model on the same batch, on every rank.

    Checks, for each schedule (and both `experts_after` for the overlapped one): full logits (gathered from all
    ranks) and loss, then every parameter's gradient (replicated ones all-reduced, expert shards gathered back to
    [N, ...]); the forward again with routing skewed so that no rank sends anything to the last rank (empty
    splits); and a forward with uneven per-rank batches. Returns the tensors from rank 0 for the caller to compare
    (None on other ranks), plus every rank's dispatch counts."""
    device = _device(backend, rank)
    config = ModelConfig.from_dict(config_dict)
    ref = seeded_model(config, seed, device)
    ep = ExpertParallelLM(copy.deepcopy(ref))
    gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    rows = _local_rows(batch, world, rank)
    n_local_tokens = inputs[rows].numel()
    ref_logits, ref_loss = ref(inputs, targets)
    ref_loss.backward()
    result: dict[str, Any] = {"ref_logits": ref_logits.detach().cpu(), "ref_loss": ref_loss.detach().cpu(),
                              "ref_grads": {n: p.grad.detach().cpu() for n, p in ref.named_parameters()},
                              "runs": {}}
    with torch.no_grad():
        _, _, routing = ref(inputs[rows], return_routing=True)
    ffn_pairs = [int((r.topk_ids < config.n_routed_experts).sum()) for r in routing.layers]
    variants = [("sequential", "attn1"), ("overlapped", "attn1"), ("overlapped", "ffn0")]
    for schedule, experts_after in variants:
        ep.zero_grad(set_to_none=True)
        logits, loss = ep(inputs[rows], targets[rows], schedule=schedule, experts_after=experts_after)
        # Global mean over all tokens = sum over ranks of (local mean * local tokens / all tokens).
        (loss * n_local_tokens / inputs.numel()).backward()
        ep.sync_replicated_grads()
        global_loss = (loss.detach() * n_local_tokens / inputs.numel()).reshape(1)
        dist.all_reduce(global_loss)
        grads = {}
        for name, p in ep.named_parameters():
            grads[name] = (_gather_rows(p.grad) if "mlp.experts." in name else p.grad).detach().cpu()
        result["runs"][f"{schedule}/{experts_after}"] = {
            "logits": _gather_rows(logits.detach()).cpu(), "loss": global_loss[0].cpu(), "grads": grads}
    # What moved in the last run, beside what the single-process router chose for this rank's tokens.
    result["errors"] = {}
    for name, bad in (("schedule", lambda: ep(inputs[rows], schedule="async")),
                      ("experts_after", lambda: ep(inputs[rows], experts_after="attn0")),
                      ("n_routed_experts", lambda: ExpertParallelLM(seeded_model(config.replace(
                          n_routed_experts=2 * world + 1), seed)))):
        try:
            bad()
            result["errors"][name] = None
        except ValueError as err:
            result["errors"][name] = str(err)
    result["moved"] = _gather_objects([{**layer.mlp.last_stats, "ref_ffn_pairs": n, "tokens": inputs[rows].numel()}
                                       for layer, n in zip(ep.layers, ffn_pairs)])
    with torch.no_grad():
        # Uneven batches: rank r holds r + 1 sequences.
        sizes = [r + 1 for r in range(world)]
        lo = sum(sizes[:rank])
        uneven = torch.randint(0, config.vocab_size, (sum(sizes), seq_len), generator=gen).to(device)
        ref_uneven, _ = ref(uneven)
        ep_uneven, _ = ep(uneven[lo:lo + sizes[rank]])
        result["uneven"] = {"logits": _gather_rows(ep_uneven).cpu(), "ref_logits": ref_uneven.cpu()}
        # Skewed routing: the last rank's experts are never chosen, so it receives nothing.
        last = list(range(config.n_routed_experts - config.n_routed_experts // world, config.n_routed_experts))
        for model in (ref, ep):
            for layer in model.layers:
                layer.mlp.router.e_score_correction_bias[last] = -10.0
        ref_skew, _ = ref(inputs)
        result["skewed"] = {"ref_logits": ref_skew.cpu()}
        for schedule in SCHEDULES:
            logits, _ = ep(inputs[rows], schedule=schedule)
            result["skewed"][schedule] = _gather_rows(logits).cpu()
        result["skewed"]["moved"] = _gather_objects([layer.mlp.last_stats for layer in ep.layers])
    return result if rank == 0 else None


def _gather_objects(obj: Any, group=None) -> list[Any]:
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def overlap_worker(rank: int, world: int, config_dict: dict, seed: int, batch: int, seq_len: int, reps: int,
                   trace_dir: str | None, backend: str = "gloo", experts_after: str = "attn1",
                   profile_steps: int = 1) -> dict:
    """Time inference forward steps of the sequential and the overlapped schedule, interleaved (so drift from
    other load hits both alike), and optionally write `profile_steps` profiled steps of each into a Chrome/Perfetto
    trace `trace_dir/rank{rank}.json`. Each step starts after a barrier; returns per-step seconds by schedule."""
    device = _device(backend, rank)
    config = ModelConfig.from_dict(config_dict)
    ep = ExpertParallelLM(seeded_model(config, seed, device)).eval()
    gen = torch.Generator().manual_seed(seed + 1 + rank)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(schedule: str) -> float:
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        with record_function(f"ep.step.{schedule}"):
            ep(idx, schedule=schedule, experts_after=experts_after)
        sync()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {s: [] for s in SCHEDULES}
    with torch.no_grad():
        for schedule in SCHEDULES:                                   # warm-up: allocator, gloo buffers
            step(schedule)
        for _ in range(reps):
            for schedule in SCHEDULES:
                times[schedule].append(step(schedule))
        trace = None
        if trace_dir is not None:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            trace = str(Path(trace_dir) / f"rank{rank}.json")
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)

            def export(prof) -> None:                                # atomic: a reader never sees half a trace
                prof.export_chrome_trace(trace + ".tmp")
                os.replace(trace + ".tmp", trace)

            # One unrecorded round first: the profiler's own start-up would otherwise land in the first step.
            warnings.filterwarnings("ignore", message=".*Profiler clears events")   # intended: skip the warm-up
            with torch.profiler.profile(activities=activities, on_trace_ready=export,
                                        schedule=torch.profiler.schedule(wait=0, warmup=1, active=1)) as prof:
                for rounds in (1, profile_steps):
                    for _ in range(rounds):
                        for schedule in SCHEDULES:
                            step(schedule)
                    prof.step()
    return {"rank": rank, "times": times, "trace": trace, "tokens": idx.numel(),
            "moved": [layer.mlp.last_stats for layer in ep.layers],
            "median_s": {s: statistics.median(t) for s, t in times.items()}}


def measure_overlap(config: ModelConfig, seed: int = 0, batch: int = 4, seq_len: int = 64, reps: int = 5,
                    trace_dir: str | os.PathLike | None = None, world_size: int = 2, backend: str = "gloo",
                    experts_after: str = "attn1", profile_steps: int = 1) -> dict:
    """Spawn `world_size` ranks running `overlap_worker` and summarise: a step ends when its slowest rank ends, so
    the step time of repetition i is the max over ranks. `ratio` is median(sequential) / median(overlapped);
    `paired_ratios` are sequential_i / overlapped_i of the same round (run back to back, so they share the load
    of the moment), summarised by their median and quartiles; `ratio_of_minima` is the least-disturbed view."""
    for name, value in (("batch", batch), ("seq_len", seq_len), ("reps", reps), ("profile_steps", profile_steps)):
        check_positive_int(name, value)
    _check_choice("experts_after", experts_after, EXPERTS_AFTER)
    results = launch(overlap_worker, world_size, args=(config.to_dict(), seed, batch, seq_len, reps,
                                                       None if trace_dir is None else str(trace_dir), backend,
                                                       experts_after, profile_steps), backend=backend)
    step = {s: [max(r["times"][s][i] for r in results) for i in range(reps)] for s in SCHEDULES}
    median = {s: statistics.median(v) for s, v in step.items()}
    paired = [a / b for a, b in zip(step["sequential"], step["overlapped"])]
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    return {"step_s": step, "median_s": median, "ratio": median["sequential"] / median["overlapped"],
            "paired_ratios": paired, "paired_ratio_quartiles": quartiles,
            "ratio_of_minima": min(step["sequential"]) / min(step["overlapped"]),
            "ranks": results, "traces": [r["trace"] for r in results]}


__all__ = ["ExpertParallelMoE", "ExpertParallelLayer", "ExpertParallelLM", "Exchange", "exchange", "launch",
           "seeded_model", "side_stream_forward", "time_side_stream", "parity_worker", "overlap_worker",
           "measure_overlap", "SCHEDULES", "EXPERTS_AFTER"]
