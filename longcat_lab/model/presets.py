"""Model presets as plain functions (like torchtitan's flavors): `tiny()` for tests, `mini()` for quick sweeps,
`ablation()` for the ablation study (experts carry the release's share of activated compute), `small()` to train on
a laptop CPU in minutes, `base()` for one GPU, and `released()`, the 560B LongCat-Flash config, for
accounting only.

Each preset states only the fields in which it differs from `ModelConfig()`'s defaults (which are `small`), and
every preset takes keyword overrides on top: `presets.tiny(layer_style="vanilla")`.
"""

from __future__ import annotations

from typing import Any

from longcat_lab.model.config import ModelConfig


def _preset(differences: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**{**differences, **overrides})


def tiny(**overrides: Any) -> ModelConfig:
    """Under 1M parameters: the shape of transformers' own LongCat tester (4 FFN + 2 zero experts, top-2)."""
    return _preset(
        {
            "vocab_size": 512,
            "hidden_size": 64,
            "num_layers": 2,
            "num_attention_heads": 2,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "head_dim": 8,
            "ffn_hidden_size": 128,
            "n_routed_experts": 4,
            "zero_expert_num": 2,
            "moe_topk": 2,
            "expert_ffn_hidden_size": 32,
            "max_position_embeddings": 512,
        },
        overrides,
    )


def mini(**overrides: Any) -> ModelConfig:
    """Between tiny and small, for sweeps: small enough that an ablation with several variants and seeds fits in
    minutes on a CPU. N:Z = 2:1 and top-3, so K_e = 2."""
    return _preset(
        {
            "vocab_size": 1024,
            "hidden_size": 96,
            "num_layers": 2,
            "num_attention_heads": 4,
            "q_lora_rank": 48,
            "kv_lora_rank": 24,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "head_dim": 8,
            "ffn_hidden_size": 192,
            "n_routed_experts": 8,
            "zero_expert_num": 4,
            "moe_topk": 3,
            "expert_ffn_hidden_size": 48,
            "max_position_embeddings": 512,
        },
        overrides,
    )


def ablation(**overrides: Any) -> ModelConfig:
    """The sweeps' design preset (docs/design.md §3.6): tiny's width, vocabulary and attention with mini's routing
    (8 FFN + 4 zero experts, top-3, so K_e = 2) and experts wide enough that they are 31% of the about 0.2M
    activated parameters, the release's share (mini: 12%): a change in FFN experts per token moves compute as much
    as in the release."""
    shape = {"num_attention_heads": 4, "ffn_hidden_size": 64, "n_routed_experts": 8, "zero_expert_num": 4}
    return tiny(**{**shape, "moe_topk": 3, "expert_ffn_hidden_size": 80, **overrides})


def small(**overrides: Any) -> ModelConfig:
    """About 12M parameters (about 6M activated): trains meaningfully on two CPU cores in about ten minutes. These
    are `ModelConfig()`'s defaults."""
    return _preset({}, overrides)


def base(**overrides: Any) -> ModelConfig:
    """A few hundred million parameters for one GPU; same ratios as the release (N:Z = 2:1, d/d_q = 2, m = 4)."""
    return _preset(
        {
            "vocab_size": 32768,
            "hidden_size": 1024,
            "num_layers": 8,
            "num_attention_heads": 16,
            "q_lora_rank": 512,
            "kv_lora_rank": 256,
            "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 32,
            "v_head_dim": 64,
            "head_dim": 32,
            "ffn_hidden_size": 2048,
            "n_routed_experts": 64,
            "zero_expert_num": 32,
            "moe_topk": 12,
            "expert_ffn_hidden_size": 512,
            "max_position_embeddings": 4096,
        },
        overrides,
    )


def released(**overrides: Any) -> ModelConfig:
    """The released LongCat-Flash (docs/design.md §1.6). For parameter accounting; far too large to instantiate."""
    return _preset(
        {
            "vocab_size": 131072,
            "hidden_size": 6144,
            "num_layers": 28,
            "num_attention_heads": 64,
            "q_lora_rank": 1536,
            "kv_lora_rank": 512,
            "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64,
            "v_head_dim": 128,
            "head_dim": 64,
            "ffn_hidden_size": 12288,
            "n_routed_experts": 512,
            "zero_expert_num": 256,
            "moe_topk": 12,
            "expert_ffn_hidden_size": 2048,
            "routed_scaling_factor": 6.0,
            "max_position_embeddings": 131072,
            "rope_theta": 1e7,
        },
        overrides,
    )


PRESETS = {"tiny": tiny, "mini": mini, "ablation": ablation, "small": small, "base": base}


def get(name: str, **overrides: Any) -> ModelConfig:
    """The preset called `name` ("tiny", "mini", "ablation", "small" or "base"), with overrides; a clear error for
    an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not allowed: it must be one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
