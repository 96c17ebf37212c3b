"""The model: config, presets, and the LongCat-Flash network with its shortcut-connected MoE layer
(`longcat_lab.model.model`), the MoE block (`moe.py`), the routing records, the MoE's token dispatcher seam, and the
grouped expert kernel (`ops/`). Decoding and generation live in `longcat_lab.inference`."""

from longcat_lab.model import presets
from longcat_lab.model.config import IGNORE_INDEX, LAYER_STYLES, ModelConfig
from longcat_lab.model.dispatch import LocalDispatcher, MoEPending, region
from longcat_lab.model.model import (
    EXPERTS_AFTER,
    MLA,
    LongCatLayer,
    LongCatLM,
    RMSNorm,
    SwiGLU,
    apply_rope,
    rope_angles,
)
from longcat_lab.model.moe import Experts, MoE, Router, sort_pairs, zero_expert_output
from longcat_lab.model.routing import LayerRouting, RouterOutput, Routing

__all__ = [
    "EXPERTS_AFTER",
    "IGNORE_INDEX",
    "LAYER_STYLES",
    "MLA",
    "Experts",
    "LayerRouting",
    "LocalDispatcher",
    "LongCatLM",
    "LongCatLayer",
    "MoE",
    "MoEPending",
    "ModelConfig",
    "RMSNorm",
    "Router",
    "RouterOutput",
    "Routing",
    "SwiGLU",
    "apply_rope",
    "presets",
    "region",
    "rope_angles",
    "sort_pairs",
    "zero_expert_output",
]
