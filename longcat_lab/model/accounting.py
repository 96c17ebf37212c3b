"""Parameter and FLOP accounting from a `ModelConfig` alone (no model needed, so the 560B release can be counted).

Activated parameters follow the paper's convention (docs/design.md §1.4, §11.10): every parameter except the input
embedding table, plus the FFN experts a token actually uses. Zero experts cost nothing.
"""

from __future__ import annotations

from longcat_lab._util import check_int
from longcat_lab.model.config import ModelConfig


def mla_params(c: ModelConfig) -> int:
    """One MLA block: q_a, q_a_norm, q_b, kv_a, kv_a_norm, kv_b, o."""
    H = c.num_attention_heads
    return (
        c.hidden_size * c.q_lora_rank
        + c.q_lora_rank
        + c.q_lora_rank * H * c.qk_head_dim
        + c.hidden_size * c.kv_latent_dim
        + c.kv_lora_rank
        + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
        + H * c.v_head_dim * c.hidden_size
    )


def param_counts(c: ModelConfig) -> dict[str, int]:
    """Closed-form parameter counts by part, summed over layers; `total` is what `LongCatLM.num_params()` returns."""
    D, L = c.hidden_size, c.num_layers
    expert = 3 * D * c.expert_ffn_hidden_size
    moe = c.layer_style != "dense"
    counts = {
        "embedding": c.vocab_size * D,
        "lm_head": c.vocab_size * D,
        "attention": L * 2 * mla_params(c),
        "dense_ffn": L * 2 * 3 * D * c.ffn_hidden_size,
        "norms": L * 4 * D + D,
        "router": L * c.num_experts * D if moe else 0,
        "experts": L * c.n_routed_experts * expert if moe else 0,
        "dense_moe_replacement": 0 if moe else L * 3 * D * c.dense_moe_width,
    }
    counts["total"] = sum(counts.values())
    counts["per_expert_all_layers"] = L * expert if moe else 0
    return counts


def activated_params(c: ModelConfig, ffn_experts_per_token: float | None = None) -> dict[str, float]:
    """Activated parameters per token: `min` (as few FFN experts as top-k allows: K - Z), `max` (min(K, N)) and
    `mean` at `ffn_experts_per_token` FFN experts per token per layer (default: uniform routing, K*N/(N+Z))."""
    counts = param_counts(c)
    always = counts["total"] - counts["embedding"] - counts["experts"]
    if c.layer_style == "dense":
        return {"min": always, "mean": always, "max": always, "ffn_experts_per_token": 0.0}
    lo, hi = c.min_ffn_experts, c.max_ffn_experts
    k = c.uniform_ffn_experts if ffn_experts_per_token is None else float(ffn_experts_per_token)
    if not lo <= k <= hi:
        raise ValueError(
            f"ffn_experts_per_token={k} is not allowed: with moe_topk={c.moe_topk}, "
            f"n_routed_experts={c.n_routed_experts}, zero_expert_num={c.zero_expert_num} "
            f"it must be between {lo} and {hi}"
        )
    per = counts["per_expert_all_layers"]
    return {"min": always + lo * per, "mean": always + k * per, "max": always + hi * per, "ffn_experts_per_token": k}


def flops_per_token(
    c: ModelConfig, seq_len: int, ffn_experts_per_token: float | None = None, training: bool = True
) -> float:
    """Model FLOPs per token for MFU: 2 * activated params per matmul pass (x3 for forward + backward), plus
    attention scores and weighted values, 2 * H * (qk_head_dim + v_head_dim) * seq_len per attention block per pass
    (PaLM's convention, not discounted for causality)."""
    check_int("seq_len", seq_len)
    passes = 3 if training else 1
    dense = 2 * activated_params(c, ffn_experts_per_token)["mean"]
    attention = 2 * c.num_layers * 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len
    return passes * (dense + attention)
