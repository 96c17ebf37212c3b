"""The model: config, presets, and the LongCat-Flash network with its shortcut-connected MoE layer
(`longcat_lab.model.model`) and its parts: RMSNorm and SwiGLU (`blocks`), RoPE (`rope`), MLA with its absorbed
decoding form (`attention`), the MoE block with its few-token decoding path (`moe`), multi-token prediction (`mtp`),
the latent KV cache (one sequence, or a batch of different lengths) and decoding weights (`cache`), the routing
records, the MoE's token dispatcher seam, the grouped expert kernel (`ops/`), and parameter and FLOP accounting
(`accounting`). Generation loops, speculative decoding, quantisation and compilation live in
`longcat_lab.inference`, which builds on this package."""

from longcat_lab.model import accounting, presets
from longcat_lab.model.attention import MLA, absorbed_attention, absorbed_weights, segment_mask
from longcat_lab.model.blocks import RMSNorm, SwiGLU
from longcat_lab.model.cache import BatchLatentCache, DecodingWeights, LatentCache
from longcat_lab.model.config import IGNORE_INDEX, LAYER_STYLES, ModelConfig
from longcat_lab.model.dispatch import LocalDispatcher, MoEPending, region
from longcat_lab.model.model import EXPERTS_AFTER, CausalLMOutput, LongCatLayer, LongCatLM
from longcat_lab.model.moe import Experts, MoE, Router, experts_few_tokens, sort_pairs, zero_expert_output
from longcat_lab.model.rope import apply_rope, rope_angles
from longcat_lab.model.routing import LayerRouting, RouterOutput, Routing

__all__ = [
    "EXPERTS_AFTER",
    "IGNORE_INDEX",
    "LAYER_STYLES",
    "MLA",
    "BatchLatentCache",
    "CausalLMOutput",
    "DecodingWeights",
    "Experts",
    "LatentCache",
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
    "absorbed_attention",
    "absorbed_weights",
    "accounting",
    "apply_rope",
    "experts_few_tokens",
    "presets",
    "region",
    "rope_angles",
    "segment_mask",
    "sort_pairs",
    "zero_expert_output",
]
