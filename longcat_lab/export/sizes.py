"""What an exported model weighs: bytes on disk per tensor group of a Hugging Face folder (read from the safetensors
headers only), and KV-cache bytes per token, measured and by the MLA formula (docs/design.md §1.2, §1.6)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from longcat_lab.export.hf import (
    CONFIG_NAME,
    HUB_EXPERT_KEY,
    WEIGHTS_NAME,
    config_from_hf,
    read_headers,
    read_json_file,
)
from longcat_lab.model.cache import LatentCache
from longcat_lab.model.model import LongCatLM

# Tensor groups of the hub layout, first match wins; zero experts' gate/up tensors are counted apart as padding.
TENSOR_GROUPS = (
    ("MTP module", re.compile(r"^model\.mtp\.")),  # the multi-token-prediction module (docs/design.md §1.5)
    ("embedding + LM head", re.compile(r"embed_tokens|lm_head")),
    ("FFN experts", re.compile(r"\.mlp\.experts\.")),
    ("router + expert bias", re.compile(r"\.mlp\.router\.")),
    ("attention (MLA)", re.compile(r"\.self_attn\.")),
    ("dense FFNs", re.compile(r"\.mlps\.")),
    ("norms", re.compile(r"norm")),
)
PADDING = "zero-expert padding (5.x)"
DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def checkpoint_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of every tensor group in an exported folder, read from the safetensors headers only."""
    path = Path(path)
    config = config_from_hf(read_json_file(path / CONFIG_NAME), str(path / CONFIG_NAME))
    files = [path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).is_file() else sorted(path.glob("model-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (nor shards)")
    sizes = {name: 0 for name, _ in TENSOR_GROUPS} | {PADDING: 0, "other": 0}
    for file in files:
        for key, (dtype, shape) in read_headers(file).items():
            if dtype not in DTYPE_BYTES:
                raise ValueError(f"{file}: tensor {key} has dtype {dtype}, not one of {list(DTYPE_BYTES)}")
            nbytes = DTYPE_BYTES[dtype]
            for dim in shape:
                nbytes *= dim
            expert = HUB_EXPERT_KEY.match(key)
            if expert and int(expert.group(2)) >= config.n_routed_experts:
                group = PADDING
            else:
                group = next((name for name, rx in TENSOR_GROUPS if rx.search(key)), "other")
            sizes[group] += nbytes
    return sizes


def cache_bytes_per_token(model: LongCatLM, idx: torch.Tensor, hf_model=None) -> dict[str, int]:
    """KV-cache bytes per token and sequence after a prefill of idx[:1]: our LatentCache (measured), transformers'
    cache (measured, when `hf_model` is given), the MLA formula (kv_lora_rank + qk_rope_head_dim) x attention
    blocks x dtype size, and what full per-head keys and values would take."""
    c = model.config
    blocks, dtype_size = 2 * c.num_layers, model.lm_head.weight.element_size()
    cache = LatentCache(blocks)
    was_training = model.training
    with torch.no_grad():
        model.eval()(idx[:1], cache=cache)
        model.train(was_training)
        out = {"longcat_lab LatentCache": cache.bytes_per_token()}
        if hf_model is not None:
            hf_cache = hf_model(idx[:1].to(hf_model.device), use_cache=True).past_key_values
            total = sum(t.numel() * t.element_size() for layer in hf_cache.layers for t in (layer.keys, layer.values))
            out["transformers cache"] = total // idx.shape[1]
    out["MLA formula"] = c.kv_cache_bytes_per_token(dtype_size)
    out["full K/V"] = blocks * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * dtype_size
    return out
