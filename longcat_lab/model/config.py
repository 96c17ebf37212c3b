"""`ModelConfig`: the shape of a LongCat-Flash model, with the Hugging Face field names.

Field names follow `transformers.LongcatFlashConfig` (docs/design.md §1.6) so that export is a rename. The defaults are
a small CPU-trainable model (the `small` preset), not the 560B release; `presets.released()` holds the release
for accounting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from longcat_lab._util import check_choice, check_int, check_positive_float, from_known_fields

LAYER_STYLES = ("scmoe", "vanilla", "dense")
IGNORE_INDEX = -100  # a target id that the loss skips (F.cross_entropy's default)


@dataclass
class ModelConfig:
    """Everything that fixes a model's parameters and forward pass (not how it is trained)."""

    # Byte-level BPE over our three corpora; 4096 keeps the embedding a small share of a CPU-sized model.
    vocab_size: int = 4096
    # Model width d; the released model uses 6144.
    hidden_size: int = 256
    # LongCat "layers": each holds two attention blocks, two dense FFNs and one MoE (docs/design.md §1.1).
    num_layers: int = 4
    num_attention_heads: int = 4
    # Low-rank query latent d_q; the release has d/d_q = 4, so alpha_q = 2.
    q_lora_rank: int = 128
    # Compressed KV latent d_kv, the part of the KV cache that is not RoPE; the release has d/d_kv = 12.
    kv_lora_rank: int = 64
    # Per-head query/key dims without and with RoPE, and the value dim (the release: 128 / 64 / 128).
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # transformers uses head_dim for the RoPE frequencies, so it must equal qk_rope_head_dim (docs/design.md D1).
    head_dim: int = 16
    # Width of the two dense SwiGLU FFNs per layer; the release has 12288 = 2d.
    ffn_hidden_size: int = 512
    # N FFN experts and Z zero (identity) experts; the release has N:Z = 2:1.
    n_routed_experts: int = 16
    zero_expert_num: int = 8
    # K experts chosen per token out of N + Z; uniform routing then picks K*N/(N+Z) FFN experts on average.
    moe_topk: int = 6
    # Expert width; fine-grained experts are 1/m of the dense FFN (the release: 12288 / 2048 = 6).
    expert_ffn_hidden_size: int = 128
    # gamma of Eq. 8, = m (dense width / expert width) as in the release; multiplies every chosen weight.
    routed_scaling_factor: float = 4.0
    # Longest sequence (prompt + generation) the model accepts.
    max_position_embeddings: int = 1024
    # RoPE base; the release uses 1e7 for 128k contexts, 1e4 is the usual choice for short ones.
    rope_theta: float = 10000.0
    # Hidden-size RMSNorm eps as in the release (the MLA latent norms use 1e-6, fixed, as transformers does).
    rms_norm_eps: float = 1e-5
    # Std of the normal init of every weight matrix, as transformers' LongcatFlashPreTrainedModel.
    initializer_range: float = 0.02
    # "scmoe" (the paper), or the ablation baselines "vanilla" (MoE after the second attention) and "dense".
    layer_style: str = "scmoe"
    # MLA scale correction alpha_q, alpha_kv (docs/design.md §1.2); off only for the ablation of paper Fig. 5a.
    mla_scale: bool = True
    # Multi-token prediction modules (docs/design.md §1.5): the release has one; 0 (no MTP) keeps models, checkpoints
    # and transformers parity as they were. DeepSeek-V3's field name, which vLLM reads for LongCat's MTP too.
    num_nextn_predict_layers: int = 0

    def __post_init__(self) -> None:
        # Every size is a positive int (zero experts may be absent); every float is a finite positive number.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                check_int(f.name, value, 0 if f.name in ("zero_expert_num", "num_nextn_predict_layers") else 1)
            elif f.type == "float":
                check_positive_float(f.name, value)
            elif f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name}={value!r} is not allowed: it must be true or false")
        total = self.n_routed_experts + self.zero_expert_num
        if self.moe_topk > total:
            raise ValueError(
                f"moe_topk={self.moe_topk} is not allowed: it must be between 1 and "
                f"n_routed_experts + zero_expert_num = {total}"
            )
        if self.head_dim != self.qk_rope_head_dim:
            raise ValueError(
                f"head_dim={self.head_dim} is not allowed: it must equal qk_rope_head_dim={self.qk_rope_head_dim} "
                "(transformers takes the RoPE frequencies from head_dim)"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim={self.qk_rope_head_dim} is not allowed: RoPE rotates pairs, so it must be even"
            )
        check_choice("layer_style", self.layer_style, LAYER_STYLES)
        if self.num_nextn_predict_layers > 1:
            raise ValueError(
                f"num_nextn_predict_layers={self.num_nextn_predict_layers} is not allowed: it must be 0 or 1 (the "
                "release has one MTP module)"
            )

    # Derived sizes ---------------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        """N + Z: the router scores FFN and zero experts together."""
        return self.n_routed_experts + self.zero_expert_num

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uniform_ffn_experts(self) -> float:
        """FFN experts per token under uniform routing, K*N/(N+Z); 8 for the release (the paper's ~27B average)."""
        return self.moe_topk * self.n_routed_experts / self.num_experts

    @property
    def min_ffn_experts(self) -> int:
        """The fewest FFN experts a token can use: K - Z when it picks every zero expert (0 if Z >= K)."""
        return max(0, self.moe_topk - self.zero_expert_num)

    @property
    def max_ffn_experts(self) -> int:
        """The most FFN experts a token can use: K, or N when there are fewer FFN experts than K."""
        return min(self.moe_topk, self.n_routed_experts)

    @property
    def kv_latent_dim(self) -> int:
        """Numbers one attention block caches per token: the KV latent c_KV and the shared RoPE key k_R
        (docs/design.md §1.2), instead of per-head keys and values."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def kv_cache_bytes_per_token(self, bytes_per_value: int) -> int:
        """KV-cache bytes per token and sequence of the main model (2 * num_layers attention blocks), at
        `bytes_per_value` bytes per cached number (4 for fp32, 2 for bf16)."""
        check_int("bytes_per_value", bytes_per_value)
        return self.kv_latent_dim * 2 * self.num_layers * bytes_per_value

    @property
    def dense_moe_width(self) -> int:
        """Width of the dense FFN that replaces the MoE in layer_style="dense": the MoE's activated width under
        uniform routing, so the ablation compares equal activated compute."""
        return max(1, round(self.uniform_ffn_experts * self.expert_ffn_hidden_size))

    # Inputs ----------------------------------------------------------------------------------------------------
    def check_ids(self, name: str, ids: Any, past: int = 0, allow_ignore: bool = False) -> None:
        """Raise a ValueError naming `name` unless `ids` is a 2-D integer tensor of token ids in this vocabulary
        that fits after `past` cached positions (`allow_ignore`: targets may also hold IGNORE_INDEX). Costs one
        host sync (the id range)."""
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"{name} has shape {tuple(ids.shape)}: expected 2 dims (batch, sequence)")
        if ids.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"{name} has dtype {ids.dtype}: expected an integer dtype such as torch.long")
        if ids.shape[1] == 0:
            raise ValueError(f"{name} has shape {tuple(ids.shape)}: the sequence is empty")
        if ids.shape[0] == 0:
            raise ValueError(f"{name} has shape {tuple(ids.shape)}: the batch is empty")
        limit = self.max_position_embeddings
        if past + ids.shape[1] > limit:
            raise ValueError(
                f"{name}: {past} cached + {ids.shape[1]} new positions exceed max_position_embeddings={limit}"
            )
        lo, hi = (int(v) for v in torch.aminmax(ids.long()))
        low_ok = lo >= 0 or (allow_ignore and lo == IGNORE_INDEX and not bool((ids < IGNORE_INDEX).any()))
        if not low_ok or hi >= self.vocab_size:
            allowed = f"0..{self.vocab_size - 1}" + (f" (or {IGNORE_INDEX} to ignore)" if allow_ignore else "")
            raise ValueError(f"{name} holds token ids from {lo} to {hi}; allowed ids are {allowed}")
        if allow_ignore and hi == IGNORE_INDEX:
            raise ValueError(f"{name} ignores every position ({IGNORE_INDEX}): there is no target to take a loss on")

    # Serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict (a config.json read back, say), refusing keys that are not ModelConfig fields."""
        if not isinstance(data, dict):
            raise ValueError(f"a ModelConfig is built from a JSON object of fields, not a {type(data).__name__}")
        return from_known_fields(cls, data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


__all__ = ["IGNORE_INDEX", "LAYER_STYLES", "ModelConfig"]
