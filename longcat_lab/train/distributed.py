"""Training on several processes (docs/design.md §8.3): the parallelism strategy the trainer is handed for it, and
`train_distributed`, the entry point each torchrun worker calls.

- `DataExpertParallel(ctx)`: the `train.parallelism.Parallelism` of a `ParallelContext`. `shard` makes the model
  expert-parallel over the mesh's "ep" dimension (and its checkpoints sharded alike: `sharding`); `rows` is this
  rank's share of a global batch; `global_statistics` makes the balance loss count selections over all ranks;
  `synchronize` runs after the step's backward: it sums the gradients (replicated weights over all ranks, expert
  shards over "dp"), divides by the world size (each rank's loss is the mean over its own rows, so the global mean
  is their average), clips by the global norm, averages the logged losses and sums the routers' counts, so that
  every rank's bias controller takes the same step (docs/design.md §2.1).
- `RankTelemetry`: the metrics row of every rank, written by rank 0 only; tokens/s counts the global batch, and MFU
  divides by the peak of all ranks together.
- `consolidate(ckpt, run_dir)`: a sharded checkpoint rewritten as an ordinary single-process one.
- `train_ranks(...)`: `train_distributed` on local ranks spawned without torchrun (tests, notebooks, benchmarks).

The global batch (`TrainConfig.batch_size`) is split evenly over the ranks: 2 ranks with `batch_size=8` see the
rows that 1 process with `batch_size=8` sees, and reach the same losses up to fp32 summation order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longcat_lab import checkpoint
from longcat_lab.checkpoint import CheckpointError, Sharding
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LongCatLM
from longcat_lab.parallel.expert_parallel import apply_expert_parallel, expert_shard_parameters
from longcat_lab.parallel.launch import launch
from longcat_lab.parallel.mesh import ParallelContext, init_parallel
from longcat_lab.train import growth, losses
from longcat_lab.train.config import TrainConfig
from longcat_lab.train.results import TrainResult
from longcat_lab.train.resume import read_train_config, read_trainer_state
from longcat_lab.train.runtime import check_runtime, run_trainer
from longcat_lab.train.telemetry import Telemetry
from longcat_lab.train.trainer import Trainer


def _all_reduce_flat(tensors: list[torch.Tensor], group) -> None:
    """Sum `tensors` over `group` in place, as one flat message (one collective instead of one per tensor)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class DataExpertParallel:
    """Data parallelism over every rank, with the FFN experts sharded over the mesh's "ep" dimension."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.is_main = ctx.is_main
        self.shards: list[torch.nn.Parameter] = []
        self.sharding = Sharding(ctx.mesh, frozenset(), "ep")

    def device(self, cfg: TrainConfig) -> torch.device:
        return self.ctx.device

    def rows(self, batch_size: int) -> slice:
        return self.ctx.rows(batch_size)

    def shard(self, model: LongCatLM) -> LongCatLM:
        """Keep this rank's experts (ep > 1); the same seed built the same model on every rank before."""
        if self.ctx.ep > 1:
            apply_expert_parallel(model, self.ctx.ep_group)
            self.shards = expert_shard_parameters(model)
            ids = {id(p) for p in self.shards}
            names = frozenset(n for n, p in model.named_parameters() if id(p) in ids)
            self.sharding = Sharding(self.ctx.mesh, names, "ep")
        return model

    def telemetry(self, *args: Any, **kwargs: Any) -> RankTelemetry:
        return RankTelemetry(self.ctx, *args, **kwargs)

    def global_statistics(self) -> contextlib.AbstractContextManager:
        """The balance loss's f_j from the selections of every rank (docs/design.md §8.3)."""
        return losses.global_statistics(dist.group.WORLD if self.ctx.world > 1 else None)

    @torch.no_grad()
    def synchronize(self, model: LongCatLM, step_losses: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, float]:
        """After backward: gradients and routers' counts summed, gradients clipped by the global norm. Returns the
        losses averaged over the ranks and the global pre-clip gradient norm."""
        ctx = self.ctx
        shard_ids = {id(p) for p in self.shards}
        # A rank whose tokens never reached some experts has no gradient for them, where one process on the whole
        # batch has zeros (AdamW still moves such a weight by its momentum): zeros wherever any rank has one.
        trainable = [p for p in model.parameters() if p.requires_grad]
        has_grad = torch.tensor([p.grad is not None for p in trainable], dtype=torch.uint8)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
        for p, flag in zip(trainable, has_grad.tolist()):
            if flag and p.grad is None:
                p.grad = torch.zeros_like(p)
        params = [p for p in trainable if p.grad is not None]
        replicated = [p.grad for p in params if id(p) not in shard_ids]
        sharded = [p.grad for p in params if id(p) in shard_ids]
        _all_reduce_flat(replicated, None)
        if ctx.dp > 1:
            _all_reduce_flat(sharded, ctx.dp_group)
        for g in replicated + sharded:
            g.div_(ctx.world)
        _all_reduce_flat([b.router.expert_counts for b in model.moe_blocks()], None)
        step_losses = step_losses.clone()
        dist.all_reduce(step_losses)
        step_losses /= ctx.world
        if not sharded:
            return step_losses, float(torch.nn.utils.clip_grad_norm_([p for p in params], max_norm))
        # The global norm counts each expert shard once: its square summed over the "ep" ranks.
        norm_rep = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in replicated]))
        sq_shard = torch.stack([torch.linalg.vector_norm(g) for g in sharded]).square().sum()
        dist.all_reduce(sq_shard, group=ctx.ep_group)
        total = torch.sqrt(norm_rep.square() + sq_shard)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        for g in replicated + sharded:
            g.mul_(coef)
        return step_losses, float(total)


class RankTelemetry(Telemetry):
    """`Telemetry` on every rank (the alert state stays the same everywhere); only rank 0 writes rows."""

    def __init__(self, ctx: ParallelContext, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ctx = ctx
        if not ctx.is_main:  # every rank sees the same alerts: rank 0 warns
            logging.getLogger(Telemetry.__module__).setLevel(logging.ERROR)

    def write(self, row: dict[str, Any]) -> None:
        if self.ctx.is_main:
            super().write({**row, "ranks": self.ctx.world, "ep": self.ctx.ep} if row.get("kind") == "start" else row)

    def truncate(self, upto: int) -> None:
        if self.ctx.is_main:
            super().truncate(upto)

    def row(self, r) -> dict[str, Any]:
        row = super().row(r)
        if row.get("mfu") is not None:
            row["mfu"] /= self.ctx.world  # the probe measured one rank; the run has `world` of them
        return row


def train_distributed(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: str | os.PathLike,
    ep: int = 1,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> TrainResult:
    """`train` on every rank of a torchrun job (or inside a process group that is already initialised): the same
    arguments, plus `ep`, the number of ranks that share the FFN experts. Checkpoints are sharded
    (`checkpoint.sharded`) and resume on any number of ranks, or on one process with plain `train`. Returns
    each rank's `TrainResult`; its model holds this rank's expert shard only (load the checkpoint for the whole)."""
    check_runtime(train_config)
    if train_config.init_from:
        raise ValueError(
            f"init_from={train_config.init_from!r} is not allowed on several ranks: grow the model on one process "
            "(its first checkpoint then resumes on any number of ranks)"
        )
    ctx = init_parallel(ep)
    ctx.check_batch(train_config.batch_size)
    parallel = DataExpertParallel(ctx)
    return run_trainer(Trainer, model_config, train_config, out_dir, resume, progress, callback, parallel)


def _rank_worker(rank: int, world: int, mc: dict, tc: dict, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for job in runs:
        if job.get("start_from") and rank == 0:
            src = Path(job["start_from"])
            shutil.copytree(src, Path(job["out_dir"]) / checkpoint.CHECKPOINTS / src.name)
        dist.barrier()
        result = train_distributed(
            ModelConfig.from_dict(mc),
            TrainConfig.from_dict(tc),
            job["out_dir"],
            job.get("ep", 1),
            resume=bool(job.get("start_from") or job.get("resume")),
            progress=False,
        )
        out.append(
            {
                "step": result.step,
                "checkpoint": str(result.checkpoint),
                "bias": [b.router.e_score_correction_bias.clone() for b in result.model.moe_blocks()],
                "resumed_from": result.resumed_from,
            }
        )
    return out


def train_ranks(
    model_config: ModelConfig, train_config: TrainConfig, runs: list[dict[str, Any]], nproc: int = 2
) -> list[list[dict[str, Any]]]:
    """`train_distributed` on `nproc` local ranks spawned once by `parallel.launch` (gloo, one thread each; no
    torchrun: for tests and notebooks), for each of `runs` in turn: {"out_dir", "ep" (default 1), "resume",
    "start_from" (a checkpoint folder copied into the run folder first, then resumed: another layout's, too)}.
    Returns, per rank, per run: step, checkpoint, the expert biases and the step it resumed from."""
    return launch(_rank_worker, nproc, args=(model_config.to_dict(), train_config.to_dict(), runs), timeout_s=300.0)


def consolidate(ckpt: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Write the sharded checkpoint `ckpt` (a folder, or a run folder's newest) as an ordinary single-process
    checkpoint under `run_dir/checkpoints/` (same step, whole weights, torch's optimizer state); returns its folder.
    One process, no process group. (It rebuilds the run's optimizer to learn torch's order of the parameters.)"""
    ckpt = checkpoint.resolve(ckpt)
    meta = checkpoint.verify(ckpt)
    if not checkpoint.is_sharded(ckpt):
        raise CheckpointError(f"{ckpt}: not a sharded checkpoint (it has no {checkpoint.SHARDED}/ folder)")
    model, tokenizer, _ = checkpoint.load(ckpt)
    cfg = read_train_config(ckpt)
    optimizer = growth.adamw(model, cfg)
    states = read_trainer_state(ckpt)
    checkpoint.load_into(model, optimizer, ckpt, None, states)
    states["optimizer"] = optimizer.state_dict()
    keep = {k: v for k, v in meta.items() if k not in ("files", "format", "step", "versions", "layout", "ranks", "ep")}
    return checkpoint.save(
        run_dir, meta["step"], model, tokenizer, cfg.to_dict(), states, keep, keep=cfg.keep_checkpoints
    )


__all__ = ["DataExpertParallel", "RankTelemetry", "consolidate", "train_distributed", "train_ranks"]
