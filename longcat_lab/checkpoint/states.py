"""The objects a checkpoint saves beside the model, the way torchtitan and torch.distributed.checkpoint take them: a
dict {name: object}, each object `Stateful` (it has `state_dict()` and `load_state_dict(state)`: an optimizer, the
bias controller, a data sampler, `RNGState`, the trainer's own counters) or a plain value stored as it is. The
checkpoint code therefore knows nothing of the trainer: the trainer hands it its states and gets them back.

- `state_dicts(states)`: {name: state dict (or the value)}, what trainer_state.pt holds.
- `load_state_dicts(states, saved, where)`: each object's entry put back; a missing entry, or one its object
  refuses (a wrong type, a wrong shape), is a one-line CheckpointError naming the file and the entry.
- `RNGState(device)`: torch's global RNG (and the device's, on CUDA) as a Stateful.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from longcat_lab.checkpoint.layout import CheckpointError, one_line


def state_dicts(states: Mapping[str, Any]) -> dict[str, Any]:
    return {name: obj.state_dict() if isinstance(obj, Stateful) else obj for name, obj in states.items()}


def load_state_dicts(states: Mapping[str, Stateful], saved: Mapping[str, Any], where: str | os.PathLike) -> None:
    """Call `obj.load_state_dict(saved[name])` for every (name, obj) of `states`, in order."""
    for name, obj in states.items():
        if name not in saved:
            raise CheckpointError(f"{Path(where)}: has no {name!r} entry (it holds {sorted(map(str, saved))})")
        try:
            obj.load_state_dict(saved[name])
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as err:
            raise CheckpointError(f"{Path(where)}: the {name!r} entry cannot be loaded ({one_line(err)})") from None


class RNGState:
    """torch's global random state (CPU, and the device's generator on CUDA) as a Stateful, so that whatever draws
    from it continues on resume where the run stopped."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("torch"), torch.Tensor):
            raise ValueError("rng state must be a dict whose 'torch' entry is torch's RNG state (a uint8 tensor)")
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


__all__ = ["RNGState", "Stateful", "load_state_dicts", "state_dicts"]
