"""The Hugging Face `config.json` of a LongCat-Flash folder, both ways (docs/design.md §1.6): `hf_config_dict` writes
ours, `config_from_hf` reads ours, transformers' or the hub's into a `ModelConfig`, and `check_config_fits` refuses
a config whose sizes the weights beside it cannot hold, before any model of that size is built.

`config.json` is a file we may not have written, so every value is checked for its type as well as its range: a
wrong one is a one-line ValueError naming the file, the field and what is allowed.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from longcat_lab._util import shown
from longcat_lab.model import presets
from longcat_lab.model.config import ModelConfig

ARCHITECTURE = "LongcatFlashForCausalLM"
MODEL_TYPE = "longcat_flash"
CONFIG_NAME = "config.json"

# ModelConfig fields that config.json stores under the same name (export is a rename, docs/design.md D1).
SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "head_dim",
    "ffn_hidden_size",
    "n_routed_experts",
    "zero_expert_num",
    "moe_topk",
    "expert_ffn_hidden_size",
    "routed_scaling_factor",
    "max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
)
# Size fields that are a dimension of some hub tensor, or a factor of one (heads: q_b_proj's rows; N + Z: the
# router's rows), so none can exceed the largest dimension stored. num_layers is checked against the layers present;
# max_position_embeddings sizes nothing that is loaded.
DIMENSION_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "ffn_hidden_size",
    "n_routed_experts",
    "zero_expert_num",
    "expert_ffn_hidden_size",
)
HUB_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def hf_config_dict(
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """The config.json of an exported model. bos/eos default to None because the ids depend on the tokenizer the
    model was trained with (transformers' own defaults, 1 and 2, would make its generate() stop at token 2)."""
    if config.layer_style != "scmoe":
        raise ValueError(
            f"layer_style={config.layer_style!r} cannot be exported: transformers' LongcatFlashForCausalLM (and "
            "vLLM/SGLang) implement only the shortcut-connected layer, layer_style='scmoe'"
        )
    if not config.mla_scale:
        raise ValueError(
            "mla_scale=False cannot be exported: transformers' LongcatFlashForCausalLM always applies the MLA scale "
            "correction (docs/design.md §1.2), so the exported model would compute something else"
        )
    out: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
    out.update({name: getattr(config, name) for name in SHARED_FIELDS})
    out.update(
        num_key_value_heads=config.num_attention_heads,
        qk_head_dim=config.qk_head_dim,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},  # transformers 5.x
        rope_theta=config.rope_theta,  # transformers 4.57
        rope_scaling=None,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        use_cache=True,
        # The release's extra keys (docs/design.md §1.6): what our forward does, stated for the serving engines.
        zero_expert_type="identity",
        mla_scale_q_lora=True,
        mla_scale_kv_lora=True,
        router_bias=False,
        dtype=str(dtype).removeprefix("torch."),
    )
    if config.num_nextn_predict_layers:  # the MTP module, under DeepSeek-V3's field name that vLLM reads
        out["num_nextn_predict_layers"] = config.num_nextn_predict_layers
    return out


def _object_field(data: dict[str, Any], field: str, source: str) -> dict[str, Any]:
    """An optional JSON-object field (null or absent: empty)."""
    value = data.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"{source}: {field}={shown(value)} is not allowed: it must be a JSON object (such as "
            '{"rope_type": "default"}) or null'
        )
    return value


def config_from_hf(data: Any, source: str = CONFIG_NAME) -> ModelConfig:
    """A ModelConfig from a LongCat-Flash config.json dict; ValueError (naming `source`) for anything else.

    Fields missing from the file take transformers' defaults, which are the released model's (docs/design.md §1.6),
    exactly as `LongcatFlashConfig` would fill them."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} holds a JSON {type(data).__name__}, expected an object of config fields")
    model_type = data.get("model_type")
    architectures = data.get("architectures") or []
    if not isinstance(architectures, list):
        raise ValueError(
            f"{source}: architectures={shown(architectures)} is not allowed: it must be a list of class names such "
            f"as [{ARCHITECTURE!r}]"
        )
    # The Meituan hub config.json has no model_type but names the architecture (docs/design.md §1.6).
    if model_type != MODEL_TYPE and not (model_type is None and ARCHITECTURE in architectures):
        raise ValueError(
            f"{source}: model_type={shown(model_type)}, architectures={shown(architectures)} does not describe a "
            f"LongCat-Flash model: expected model_type={MODEL_TYPE!r} or architectures [{ARCHITECTURE!r}]"
        )

    def require(field: str, value: Any, allowed: Any, why: str) -> None:
        if value != allowed:
            raise ValueError(f"{source}: {field}={shown(value)} is not supported: it must be {allowed!r} ({why})")

    require("hidden_act", data.get("hidden_act", "silu"), "silu", "the experts and FFNs are SwiGLU")
    require("attention_bias", bool(data.get("attention_bias", False)), False, "MLA projections have no bias")
    require("router_bias", bool(data.get("router_bias", False)), False, "the router classifier has no bias")
    require("zero_expert_type", data.get("zero_expert_type", "identity"), "identity", "zero experts are identities")
    rope = _object_field(data, "rope_parameters", source)
    scaling = _object_field(data, "rope_scaling", source)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
    require("rope_type", rope_type, "default", "longcat_lab implements plain RoPE, no scaling")
    tied = data.get("tie_word_embeddings")
    if tied is not None and not isinstance(tied, bool):
        raise ValueError(f"{source}: tie_word_embeddings={shown(tied)} is not allowed: it must be true or false")

    defaults = presets.released()
    fields: dict[str, Any] = {name: data.get(name, getattr(defaults, name)) for name in SHARED_FIELDS}
    if "num_layers" not in data and "num_hidden_layers" in data:  # transformers counts attention blocks there
        blocks = data["num_hidden_layers"]
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 2:
            raise ValueError(
                f"{source}: num_hidden_layers={shown(blocks)} is not allowed: it must be an integer >= 2 (the "
                "attention blocks, two per LongCat layer)"
            )
        fields["num_layers"] = blocks // 2
    fields["rope_theta"] = rope.get("rope_theta", data.get("rope_theta", defaults.rope_theta))
    fields["num_nextn_predict_layers"] = data.get("num_nextn_predict_layers", 0)
    try:
        config = ModelConfig(**fields, layer_style="scmoe")
    except (TypeError, ValueError) as err:  # ModelConfig names the field, the value and what is allowed
        raise ValueError(f"{source}: {err}") from None
    qk_head_dim = data.get("qk_head_dim")
    if qk_head_dim is not None and qk_head_dim != config.qk_head_dim:
        raise ValueError(
            f"{source}: qk_head_dim={shown(qk_head_dim)} is not supported: it must equal qk_nope_head_dim + "
            f"qk_rope_head_dim = {config.qk_head_dim}"
        )
    return config


def check_config_fits(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str, weights: str) -> None:
    """Refuse a config (read from `source`) whose sizes the hub tensors `shapes` (read from `weights`) cannot hold:
    more layers than the weights have, or a size past the largest dimension stored. Runs before the model is
    built, so an absurd size in config.json (n_routed_experts: 1000000000) costs nothing."""
    layers = {m.group(1) for key in shapes if (m := HUB_LAYER_KEY.match(key))}
    if config.num_layers > len(layers):
        raise ValueError(
            f"{source}: num_layers={config.num_layers} does not fit the weights: {weights} holds tensors of "
            f"{len(layers)} layer(s)"
        )
    largest = max((max(shape, default=1) for shape in shapes.values()), default=0)
    for name in DIMENSION_FIELDS:
        value = getattr(config, name)
        if value > largest:
            raise ValueError(
                f"{source}: {name}={value} does not fit the weights: no tensor in {weights} has a dimension "
                f"above {largest}"
            )


__all__ = [
    "ARCHITECTURE",
    "CONFIG_NAME",
    "MODEL_TYPE",
    "SHARED_FIELDS",
    "check_config_fits",
    "config_from_hf",
    "hf_config_dict",
]
