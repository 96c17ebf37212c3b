"""Checkpoints saved by several ranks, with `torch.distributed.checkpoint` (DCP; docs/design.md §14), that load on
any number of ranks or on one process.

A sharded checkpoint is the usual checkpoint folder (`train.checkpoint`) with `dcp/` in place of model.safetensors:
{"model": every tensor of the model's state dict, "optim": {parameter name: AdamW's step, exp_avg, exp_avg_sq}}.
An expert shard (and its two moments) goes in as a `DTensor`, Shard(0) over the mesh's "ep" dimension and
replicated over "dp", so DCP stores each expert once with its place in the whole [N, ...] tensor, and a reader with
another layout (more ranks, fewer, or one process with plain tensors) reads the rows it needs: that is the
resharding. Replicated tensors are written once. Optimizer moments are keyed by parameter name, not by torch's
index, so they survive the swap of the experts module. trainer_state.pt holds the rest (rank 0's, which every rank
shares: controller, data position, counters) and the optimizer's param_groups.

- `save_checkpoint(trainer)`: every rank calls it at the same step.
- `load_into(model, optimizer, ckpt, ctx=None, trainer_state=None)`: a sharded or a single-process checkpoint into
  a whole model (ctx None) or an expert-parallel one.
- `consolidate(ckpt, run_dir)`: a sharded checkpoint as an ordinary single-process checkpoint (which the Hugging
  Face export, `export.save_hf`, and plain `train(resume=True)` read); `checkpoint.load` reads sharded ones too.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, Replicate, Shard

from longcat_lab._util import replace_dir
from longcat_lab.model.model import LongCatLM
from longcat_lab.parallel.expert_parallel import expert_shard_parameters
from longcat_lab.parallel.mesh import ParallelContext
from longcat_lab.train import checkpoint
from longcat_lab.train.checkpoint import CheckpointError

if TYPE_CHECKING:
    from longcat_lab.train.trainer import Trainer

MOMENTS = ("exp_avg", "exp_avg_sq")


def _shard_names(model: LongCatLM) -> set[str]:
    shards = {id(p) for p in expert_shard_parameters(model)}
    return {name for name, p in model.named_parameters() if id(p) in shards}


def _ordered_names(model: LongCatLM, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's index order (the order of its state_dict's integer keys)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _global(t: torch.Tensor, ctx: ParallelContext | None, sharded: bool) -> torch.Tensor:
    """An expert shard as a DTensor of the whole tensor; anything else as it is (replicated)."""
    if ctx is None or not sharded:
        return t
    return DTensor.from_local(t, ctx.mesh, [Replicate(), Shard(0)], run_check=False)


def _state(model: LongCatLM, optimizer, ctx: ParallelContext | None, names_with_state: set[str] | None):
    """The DCP state dict of `model` (and `optimizer`). For loading, `names_with_state` names the parameters whose
    moments the checkpoint holds: zero targets are made for them (AdamW creates its state lazily)."""
    shards = _shard_names(model)
    state: dict[str, Any] = {"model": {k: _global(v, ctx, k in shards) for k, v in model.state_dict().items()}}
    if optimizer is None:
        return state
    params = dict(model.named_parameters())
    optim: dict[str, Any] = {}
    for name in _ordered_names(model, optimizer):
        p = params[name]
        st = optimizer.state.get(p)
        if names_with_state is not None:
            if name not in names_with_state:
                continue
            st = {"step": torch.zeros((), dtype=torch.float32), **{m: torch.zeros_like(p) for m in MOMENTS}}
        elif not st:
            continue
        optim[name] = {"step": st["step"], **{m: _global(st[m], ctx, name in shards) for m in MOMENTS}}
    state["optim"] = optim
    return state


def _local(t: Any) -> Any:
    return t.to_local() if isinstance(t, DTensor) else t


def _load_optimizer(model, optimizer, moments: dict[str, dict[str, torch.Tensor]], trainer_state) -> None:
    """Put per-name moments back as torch's index-keyed state, with the saved param_groups (LR multipliers...)."""
    index = {name: i for i, name in enumerate(_ordered_names(model, optimizer))}
    sd = optimizer.state_dict()
    if trainer_state is not None:
        sd["param_groups"] = trainer_state["optimizer"]["param_groups"]
    sd["state"] = {index[name]: {k: _local(v) for k, v in st.items()} for name, st in moments.items()}
    optimizer.load_state_dict(sd)


def _expert_rows(ctx: ParallelContext | None, n: int) -> slice:
    if ctx is None or ctx.ep == 1:
        return slice(None)
    i, per = ctx.mesh.get_local_rank("ep"), n // ctx.ep
    return slice(i * per, (i + 1) * per)


@torch.no_grad()
def load_into(
    model: LongCatLM,
    optimizer: torch.optim.Optimizer | None,
    ckpt: str | os.PathLike,
    ctx: ParallelContext | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> None:
    """Load checkpoint `ckpt` (sharded or single-process) into `model` (and `optimizer`, whose param_groups come
    from `trainer_state`). With `ctx`, every rank of the run calls it and gets its own expert rows; without, the
    whole model loads in this process alone."""
    ckpt = Path(ckpt)
    shards = _shard_names(model)
    if checkpoint.is_sharded(ckpt):
        reader = dcp.FileSystemReader(str(ckpt / checkpoint.SHARDED))
        keys = reader.read_metadata().state_dict_metadata
        with_state = {n for n, _ in model.named_parameters() if f"optim.{n}.exp_avg" in keys}
        state = _state(model, optimizer, ctx, with_state)
        with warnings.catch_warnings():  # DCP warns that it loads in one process: what ctx=None asks for
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, storage_reader=reader, no_dist=ctx is None)
        live = model.state_dict()
        for name, t in state["model"].items():
            live[name].copy_(_local(t))  # a no-op where DCP wrote into the parameter's own storage
        if optimizer is not None:
            _load_optimizer(model, optimizer, state["optim"], trainer_state)
        return
    # A single-process checkpoint: every rank reads the whole file and keeps its expert rows.
    try:
        full = load_file(str(ckpt / "model.safetensors"))
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{ckpt / 'model.safetensors'}: cannot be read ({type(err).__name__})") from None
    for name, t in model.state_dict().items():
        if name not in full:
            raise CheckpointError(f"{ckpt / 'model.safetensors'}: does not match the model (missing {name})")
        src = full[name]
        t.copy_(src[_expert_rows(ctx, src.shape[0])] if name in shards else src)
    if optimizer is not None:
        sd = (trainer_state or checkpoint.read_trainer_state(ckpt))["optimizer"]
        names = _ordered_names(model, optimizer)
        moments = {
            names[i]: {
                k: (v[_expert_rows(ctx, v.shape[0])] if names[i] in shards and v.dim() else v) for k, v in st.items()
            }
            for i, st in sd["state"].items()
        }
        _load_optimizer(model, optimizer, moments, {"optimizer": sd})


def save_checkpoint(t: Trainer) -> Path:
    """Every rank writes its shards of checkpoint `t.steps_done` into one staged folder; rank 0 writes the small
    files and meta.json (checksums of every file, the shards included), renames it into place and keeps the newest
    `keep_checkpoints`. A model with a non-finite value is refused on every rank, like `checkpoint.save`."""
    from longcat_lab.train.resume import checkpoint_meta, trainer_state

    ctx: ParallelContext = t.parallel.ctx
    name = checkpoint.step_dir_name(t.steps_done)
    folder = Path(t.run_dir) / checkpoint.CHECKPOINTS
    tmp = folder / f".tmp-{name}-sharded"  # one name that every rank knows
    finite = torch.tensor(
        [all(bool(torch.isfinite(v).all()) for v in t.model.state_dict().values() if v.is_floating_point())]
    )
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        raise CheckpointError(f"refusing to save step {t.steps_done}: non-finite values in the model")
    if ctx.is_main:
        checkpoint.prepare_folder(t.run_dir)
        tmp.mkdir()
    dist.barrier()
    try:
        dcp.save(_state(t.model, t.optimizer, ctx, None), checkpoint_id=str(tmp / checkpoint.SHARDED))
        if ctx.is_main:
            st = trainer_state(t)
            st["optimizer"] = {"param_groups": st["optimizer"]["param_groups"]}  # the moments are in dcp/
            meta = {**checkpoint_meta(t), "layout": checkpoint.SHARDED, "ranks": ctx.world, "ep": ctx.ep}
            meta["num_params"] = sum(
                p.numel() * (ctx.ep if n in _shard_names(t.model) else 1) for n, p in t.model.named_parameters()
            )
            checkpoint.write_rest(tmp, t.steps_done, t.mc, t.dataset.tokenizer, t.cfg.to_dict(), st, meta)
            replace_dir(tmp, folder / name)
            checkpoint.rotate(t.run_dir, t.cfg.keep_checkpoints)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return folder / name


def consolidate(ckpt: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Write the sharded checkpoint `ckpt` (a folder, or a run folder's newest) as an ordinary single-process
    checkpoint under `run_dir/checkpoints/` (same step, whole weights, torch's optimizer state); returns its folder.
    One process, no process group."""
    from longcat_lab.train import growth
    from longcat_lab.train.config import TrainConfig

    ckpt = checkpoint.resolve(ckpt)
    meta = checkpoint.verify(ckpt)
    if not checkpoint.is_sharded(ckpt):
        raise CheckpointError(f"{ckpt}: not a sharded checkpoint (it has no {checkpoint.SHARDED}/ folder)")
    model, tokenizer, _ = checkpoint.load(ckpt)
    cfg = TrainConfig.from_dict(json.loads((ckpt / "train_config.json").read_text()))
    optimizer = growth.adamw(model, cfg)
    st = checkpoint.read_trainer_state(ckpt)
    load_into(model, optimizer, ckpt, None, st)
    st["optimizer"] = optimizer.state_dict()
    keep = {k: v for k, v in meta.items() if k not in ("files", "format", "step", "versions", "layout", "ranks", "ep")}
    return checkpoint.save(run_dir, meta["step"], model, tokenizer, cfg.to_dict(), st, keep, keep=cfg.keep_checkpoints)


__all__ = ["consolidate", "load_into", "save_checkpoint"]
