"""`--set FIELD=VALUE`: `apply_overrides` resolves a flat field name across ModelConfig, TrainConfig (or
SFTConfig), DataConfig, ControllerConfig and LossConfig (or `section.field` where a name is ambiguous), parses the
text by the field's type (`_parse_value`) and lets each config's own checks validate the value. `settable_fields`
lists what can be set.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any

from longcat_lab.data import DataConfig
from longcat_lab.model.config import ModelConfig
from longcat_lab.train.config import TrainConfig
from longcat_lab.train.control import ControllerConfig
from longcat_lab.train.losses import LossConfig

# Section name -> the config class whose fields it holds.
_CLASSES: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "controller": ControllerConfig,
    "losses": LossConfig,
}
_SECTIONS = tuple(_CLASSES)


def settable_fields(train_class: type = TrainConfig) -> dict[str, list[str]]:
    """Field name -> the sections that have it (stages and nested configs themselves are not settable), for a
    training config of class `train_class` (an `SFTConfig` has the fine-tuning fields too)."""
    out: dict[str, list[str]] = {}
    for section, cls in {**_CLASSES, "train": train_class}.items():
        for f in dataclasses.fields(cls):
            if section == "train" and f.name in ("stages", "data", "controller", "losses"):
                continue
            out.setdefault(f.name, []).append(section)
    return out


def _parse_value(raw: str, tp: Any, name: str) -> Any:
    """Text -> a value of annotation `tp` (int, float, bool, str, X | None, tuple[...])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if raw.strip().lower() in ("none", "null", ""):
            return None
        return _parse_value(raw, next(a for a in args if a is not type(None)), name)
    if origin is tuple:
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        elem = args[0] if args else str
        return tuple(_parse_value(p, elem, name) for p in parts)
    if tp is bool:
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name}={raw!r} is not allowed: it must be true or false")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not allowed: it must be an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not allowed: it must be a number") from None
    return raw


def apply_overrides(
    model_config: ModelConfig, train_config: TrainConfig, assignments: Sequence[str]
) -> tuple[ModelConfig, TrainConfig]:
    """Apply `FIELD=VALUE` (or `section.FIELD=VALUE`, section one of model, train, data, controller, losses) to
    copies of the configs. Every value is parsed by the field's type and validated by the config's own checks;
    ValueError for an unknown or ambiguous field, a malformed assignment or a bad value."""
    classes = {**_CLASSES, "train": type(train_config)}
    fields_ = settable_fields(classes["train"])
    parts = {
        "model": model_config,
        "train": train_config,
        "data": train_config.data,
        "controller": train_config.controller,
        "losses": train_config.losses,
    }
    changes: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for item in assignments:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"--set {item!r} is not allowed: expected FIELD=VALUE, e.g. bias_controller=pid")
        key, raw = item.split("=", 1)
        key = key.strip()
        section, name = key.split(".", 1) if "." in key else (None, key)
        if section is not None and section not in _SECTIONS:
            raise ValueError(f"--set {item!r}: unknown section {section!r}; sections are {list(_SECTIONS)}")
        owners = fields_.get(name, [])
        if section is not None:
            owners = [o for o in owners if o == section]
        if not owners:
            close = difflib.get_close_matches(name, list(fields_), n=3)
            hint = f"did you mean {close}?" if close else f"settable fields are {sorted(fields_)}"
            raise ValueError(f"--set {item!r}: unknown field {key!r}; {hint}")
        if len(owners) > 1:
            raise ValueError(f"--set {item!r}: field {name!r} exists in {owners}; write e.g. {owners[0]}.{name}=...")
        owner = owners[0]
        tp = typing.get_type_hints(classes[owner])[name]
        changes[owner][name] = _parse_value(raw, tp, name)
    try:
        built = {s: dataclasses.replace(parts[s], **changes[s]) if changes[s] else parts[s] for s in _SECTIONS}
        train = dataclasses.replace(
            built["train"], data=built["data"], controller=built["controller"], losses=built["losses"]
        )
    except TypeError as err:
        raise ValueError(f"--set: {err}") from None
    return built["model"], train
