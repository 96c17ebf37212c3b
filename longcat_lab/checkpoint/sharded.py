"""Checkpoints saved by several ranks, with `torch.distributed.checkpoint` (DCP; docs/design.md §8.4), that load on
any number of ranks or on one process.

A sharded checkpoint is the usual checkpoint folder (`checkpoint.layout`) with `dcp/` in place of
model.safetensors: {"model": every tensor of the model's state dict, "optim": {parameter name: AdamW's step,
exp_avg, exp_avg_sq}}. A row-sharded parameter (an expert-parallel rank's experts) and its two moments go in as a
`DTensor`, Shard(0) over the `Sharding`'s mesh dimension and replicated over the others, so DCP stores each row
block once with its place in the whole tensor, and a reader with another layout (more ranks, fewer, or one process
with plain tensors) reads the rows it needs: that is the resharding. Replicated tensors are written once.
Optimizer moments are keyed by parameter name, not by torch's index, so they survive the swap of a module.
trainer_state.pt holds the other states (rank 0's, which every rank shares) and the optimizer's param_groups.

- `Sharding(mesh, sharded, dim)`: which parameters a rank holds rows of, split over which mesh dimension.
- `save_sharded(run_dir, step, model, tokenizer, train_config, states, sharding, meta, keep)`: every rank calls it
  at the same step (`checkpoint.save` with a `sharding` does).
- `load_into(model, optimizer, ckpt, sharding=None, trainer_state=None)`: a sharded or a single-process
  checkpoint into a whole model (no sharding: this process alone) or a sharded one (every rank calls it).
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from longcat_lab._util import replace_dir
from longcat_lab.checkpoint.folders import prepare_folder, rotate
from longcat_lab.checkpoint.integrity import write_meta
from longcat_lab.checkpoint.layout import (
    CHECKPOINTS,
    SHARDED,
    TRAINER_STATE,
    CheckpointError,
    is_sharded,
    one_line,
    read_trainer_state,
    step_dir_name,
    write_files,
)
from longcat_lab.checkpoint.states import state_dicts
from longcat_lab.model.model import LongCatLM

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Sharding:
    """How a model lies over the ranks of `mesh`: each parameter named in `sharded` holds, on the rank at index i of
    the mesh dimension `dim` (of size k), rows [i n / k, (i + 1) n / k) of the whole [n, ...] tensor, the same on
    every rank of the other dimensions; every other tensor is whole on every rank."""

    mesh: DeviceMesh
    sharded: frozenset[str] = frozenset()
    dim: str = "ep"

    @property
    def parts(self) -> int:
        return self.mesh.size(self.mesh.mesh_dim_names.index(self.dim))

    def rows(self, n: int) -> slice:
        """This rank's rows of a whole tensor of `n` rows."""
        if self.parts == 1:
            return slice(None)
        i, per = self.mesh.get_local_rank(self.dim), n // self.parts
        return slice(i * per, (i + 1) * per)

    def as_global(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A sharded parameter's rows (or a moment of it) as a DTensor of the whole tensor; anything else as it is."""
        if name not in self.sharded:
            return t
        placements = [Shard(0) if d == self.dim else Replicate() for d in self.mesh.mesh_dim_names]
        return DTensor.from_local(t, self.mesh, placements, run_check=False)


def _ordered_names(model: LongCatLM, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's index order (the order of its state_dict's integer keys)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _global(sharding: Sharding | None, name: str, t: torch.Tensor) -> torch.Tensor:
    return t if sharding is None else sharding.as_global(name, t)


def _state(model: LongCatLM, optimizer, sharding: Sharding | None, names_with_state: set[str] | None):
    """The DCP state dict of `model` (and `optimizer`). For loading, `names_with_state` names the parameters whose
    moments the checkpoint holds: zero targets are made for them (AdamW creates its state lazily)."""
    state: dict[str, Any] = {"model": {k: _global(sharding, k, v) for k, v in model.state_dict().items()}}
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
        optim[name] = {"step": st["step"], **{m: _global(sharding, name, st[m]) for m in MOMENTS}}
    state["optim"] = optim
    return state


def _local(t: Any) -> Any:
    return t.to_local() if isinstance(t, DTensor) else t


def _load_optimizer(model, optimizer, moments: dict[str, dict[str, torch.Tensor]], param_groups) -> None:
    """Put per-name moments back as torch's index-keyed state, with the saved param_groups (LR multipliers...)."""
    index = {name: i for i, name in enumerate(_ordered_names(model, optimizer))}
    sd = optimizer.state_dict()
    if param_groups is not None:
        sd["param_groups"] = param_groups
    sd["state"] = {index[name]: {k: _local(v) for k, v in st.items()} for name, st in moments.items()}
    optimizer.load_state_dict(sd)


def _saved_optimizer(trainer_state: Any, where: Path) -> dict[str, Any]:
    opt = trainer_state.get("optimizer") if isinstance(trainer_state, dict) else None
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
        raise CheckpointError(f"{where}: its 'optimizer' entry is not a dict with a 'param_groups' list")
    return opt


@torch.no_grad()
def load_into(
    model: LongCatLM,
    optimizer: torch.optim.Optimizer | None,
    ckpt: str | os.PathLike,
    sharding: Sharding | None = None,
    trainer_state: dict[str, Any] | None = None,
) -> None:
    """Load checkpoint `ckpt` (sharded or single-process) into `model` (and `optimizer`, whose param_groups come
    from `trainer_state`, read from the checkpoint when not given). With `sharding`, every rank of its mesh calls
    it and gets its own rows; without, the whole model loads in this process alone."""
    ckpt = Path(ckpt)
    where = ckpt / TRAINER_STATE
    shards = sharding.sharded if sharding is not None else frozenset()
    if optimizer is not None and trainer_state is None:
        trainer_state = read_trainer_state(ckpt)
    if is_sharded(ckpt):
        reader = dcp.FileSystemReader(str(ckpt / SHARDED))
        keys = reader.read_metadata().state_dict_metadata
        with_state = {n for n, _ in model.named_parameters() if f"optim.{n}.exp_avg" in keys}
        state = _state(model, optimizer, sharding, with_state)
        with warnings.catch_warnings():  # DCP warns that it loads in one process: what sharding=None asks for
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, storage_reader=reader, no_dist=sharding is None)
        live = model.state_dict()
        for name, t in state["model"].items():
            live[name].copy_(_local(t))  # a no-op where DCP wrote into the parameter's own storage
        if optimizer is not None:
            param_groups = _saved_optimizer(trainer_state, where)["param_groups"]
            try:
                _load_optimizer(model, optimizer, state["optim"], param_groups)
            except (ValueError, TypeError, KeyError) as err:
                raise CheckpointError(f"{where}: the 'optimizer' entry cannot be loaded ({one_line(err)})") from None
        return
    # A single-process checkpoint: every rank reads the whole file and keeps its rows.
    rows = sharding.rows if sharding is not None else (lambda n: slice(None))
    try:
        full = load_file(str(ckpt / "model.safetensors"))
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{ckpt / 'model.safetensors'}: cannot be read ({type(err).__name__})") from None
    for name, t in model.state_dict().items():
        if name not in full:
            raise CheckpointError(f"{ckpt / 'model.safetensors'}: does not match the model (missing {name})")
        src = full[name]
        t.copy_(src[rows(src.shape[0])] if name in shards else src)
    if optimizer is not None:
        sd = _saved_optimizer(trainer_state, where)
        names = _ordered_names(model, optimizer)
        try:
            moments = {
                names[i]: {k: (v[rows(v.shape[0])] if names[i] in shards and v.dim() else v) for k, v in st.items()}
                for i, st in sd["state"].items()
            }
            _load_optimizer(model, optimizer, moments, sd["param_groups"])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise CheckpointError(f"{where}: the 'optimizer' entry cannot be loaded ({one_line(err)})") from None


def save_sharded(
    run_dir: str | os.PathLike,
    step: int,
    model: LongCatLM,
    tokenizer,
    train_config: dict[str, Any],
    states: dict[str, Any],
    sharding: Sharding,
    meta: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Every rank writes its shards of checkpoint `step` into one staged folder; rank 0 writes the small files
    (`states["optimizer"]`, if there, keeps only its param_groups in trainer_state.pt: its moments are in dcp/)
    and meta.json (checksums of every file, the shards included; the number of ranks and of parts of the sharded
    dimension, under its name), renames it into place and keeps the newest `keep`. A model with a non-finite
    value is refused on every rank, like `checkpoint.save`."""
    name = step_dir_name(step)
    folder = Path(run_dir) / CHECKPOINTS
    tmp = folder / f".tmp-{name}-sharded"  # one name that every rank knows
    finite = torch.tensor(
        [all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())]
    )
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        raise CheckpointError(f"refusing to save step {step}: non-finite values in the model")
    main = dist.get_rank() == 0
    if main:
        prepare_folder(run_dir)
        tmp.mkdir()
    dist.barrier()
    optimizer = states.get("optimizer")
    try:
        dcp.save(_state(model, optimizer, sharding, None), checkpoint_id=str(tmp / SHARDED))
        if main:
            saved = state_dicts(states)
            if optimizer is not None:
                saved["optimizer"] = {"param_groups": saved["optimizer"]["param_groups"]}
            whole = sum(
                p.numel() * (sharding.parts if n in sharding.sharded else 1) for n, p in model.named_parameters()
            )
            layout = {"layout": SHARDED, "ranks": dist.get_world_size(), sharding.dim: sharding.parts}
            write_files(tmp, model.config, tokenizer, train_config, saved)
            write_meta(tmp, step, {**(meta or {}), "num_params": whole, **layout})
            replace_dir(tmp, folder / name)
            rotate(run_dir, keep)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    return folder / name


__all__ = ["Sharding", "load_into", "save_sharded"]
