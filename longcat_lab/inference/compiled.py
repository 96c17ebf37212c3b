"""`torch.compile` for decoding (docs/design.md §6.4): `compile_decoding(model)` compiles the parts of the model's
decoding step whose work does not depend on the data: each MLA block (absorbed attention against the latent cache)
and each dense SwiGLU FFN. The MoE block stays eager: at one token its experts are chosen by the router and run as a
loop over the chosen ids with their weights as Python numbers (`model.moe.experts_few_tokens`), so a compiled version
would specialise on, and recompile for, every new choice (measured: the recompile limit is hit within a few
tokens). The cache is the usual `LatentCache`, preallocated for prompt + new tokens; the growing cache length is
compiled as a dynamic dimension, so decoding steps reuse one graph per block.

The default everywhere is eager: on the CPUs measured here the compiled step was not faster (benchmarks/RESULTS.md
"compile"), and compiling costs minutes.
"""

from __future__ import annotations

import torch

from longcat_lab.model.attention import MLA
from longcat_lab.model.blocks import SwiGLU
from longcat_lab.model.model import LongCatLM

RECOMPILE_LIMIT = 64  # compiled variants per code object: prefill and decoding of every block of a preset


def compile_decoding(model: LongCatLM, **options) -> LongCatLM:
    """Compile `model`'s MLA blocks and dense FFNs in place (`nn.Module.compile`, `dynamic=True` unless `options`
    say otherwise; `options` go to `torch.compile`, e.g. backend="eager" to check tracing without code generation).
    Returns the model; generation and evaluation work as before, the first calls pay the compilation."""
    if not isinstance(model, LongCatLM):
        raise ValueError(f"model={type(model).__name__} is not allowed: compile_decoding takes a LongCatLM")
    options = {"dynamic": True, **options}
    # All MLA blocks share one code object and dynamo guards on the instance; with the default limit of 8 variants
    # per code object, the blocks after the eighth variant would silently run eager. Raised, never lowered.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for module in model.modules():
        if isinstance(module, (MLA, SwiGLU)):
            module.compile(**options)
    return model


def is_compiled(model: LongCatLM) -> bool:
    """Whether `compile_decoding` has been applied to `model`."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


__all__ = ["compile_decoding", "is_compiled"]
