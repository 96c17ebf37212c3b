"""Helpers for tests, benchmarks and notebooks: seeded random models and token batches. Not used by training."""

from __future__ import annotations

import torch

from longcat_lab.model import presets
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LongCatLM


def random_model(config: ModelConfig | None = None, seed: int = 0, *, bias_std: float = 0.0,
                 device: str | torch.device = "cpu", train: bool = False) -> LongCatLM:
    """A `LongCatLM` (default: the tiny preset) whose weights depend only on `seed`, so that every process and every
    call builds the same one. `bias_std` > 0 draws the router's expert bias from N(0, bias_std) with the same
    generator, so that expert selection depends on the bias (as after training). Returned in eval mode unless
    `train`."""
    g = torch.Generator().manual_seed(seed)
    model = LongCatLM(config if config is not None else presets.tiny())
    model.reset_parameters(generator=g)
    if bias_std:
        with torch.no_grad():
            for moe in model.moe_blocks():
                moe.router.e_score_correction_bias.normal_(0.0, bias_std, generator=g)
    return model.to(device).train(train)


def random_ids(config: ModelConfig, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """Uniform random token ids for `config`'s vocabulary, from their own seeded generator."""
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))
