"""Rotary position embedding as LongCat-Flash and transformers apply it: interleaved pairs, emitted de-interleaved
(docs/design.md D1). The attention blocks, the MTP module and the decoding cache all take their angles from here."""

from __future__ import annotations

import torch

from longcat_lab.model.config import ModelConfig


def rope_angles(config: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [S, rope_dim/2] for the given positions, in fp32 whatever the model dtype."""
    dim = config.qk_rope_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions.device) / dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... and emit them de-interleaved as [even' | odd'], exactly as
    transformers' `apply_rotary_pos_emb_interleave` does (dot products do not care; parity does)."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


__all__ = ["apply_rope", "rope_angles"]
