"""The two small blocks every part of the network is built from: `RMSNorm` and the dense `SwiGLU` FFN. The layer
(`model.py`), the attention (`attention.py`) and the MTP module (`mtp.py`) share them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longcat_lab.model.cache import LatentCache


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 (as transformers' LongcatFlashRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.rms_norm is w * x * rsqrt(mean(x^2) + eps) in one call, bitwise equal (forward and gradient) to the
        # elementwise ops it replaces, which matters when decoding spends its time in op calls. Below fp32 the weight
        # stays outside, to keep transformers' order: normalise in fp32, cast, then scale.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * torch.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: LatentCache | None = None) -> torch.Tensor:
        if cache is not None and not torch.is_grad_enabled():  # decoding: gate and up in one matmul
            gate, up = (x @ cache.transposed(self.gate_proj, self.up_proj)).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ cache.transposed(self.down_proj)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


__all__ = ["RMSNorm", "SwiGLU"]
