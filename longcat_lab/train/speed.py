"""Training-step speed switches (docs/design.md §3.4).

`TrainConfig.torch_compile` compiles, with torch.compile (inductor; on CPU it needs a C++ compiler), the parts of
the model whose shapes are fixed: the attention blocks and dense FFNs. Inductor fuses their
elementwise work (norms, RoPE, scales, SwiGLU) into a few generated kernels; the GEMMs stay library calls. The MoE
stays eager: its per-expert slice sizes are data, read once per block on the host, so dynamo would break the graph
there and recompile for every new set of sizes. `graph_breaks` counts those breaks for the whole model, which is
why the scope is what it is (benchmarks/train_step.py prints it).

`TrainConfig.bf16` (autocast) is the other switch; the step applies it (`longcat_lab.train.step`).
"""

from __future__ import annotations

from typing import Any

import torch

from longcat_lab.inference.compiled import compile_decoding
from longcat_lab.model.attention import MLA
from longcat_lab.model.blocks import SwiGLU
from longcat_lab.model.model import LongCatLM
from longcat_lab.train.config import TrainConfig


def compiled_parts(model: LongCatLM) -> list[torch.nn.Module]:
    """The modules `compile_dense` compiles: every attention block and dense FFN."""
    return [m for m in model.modules() if isinstance(m, (MLA, SwiGLU))]


def compile_dense(model: LongCatLM) -> int:
    """Compile `compiled_parts(model)` in place, with static shapes (the same parts as decoding compiles,
    `inference.compiled.compile_decoding`; parameter names, the state dict and checkpoints are unchanged).
    Compilation happens at the first forward of each new input shape or grad mode, so a training run pays it at its
    first step and again at its first evaluation. Returns how many modules."""
    compile_decoding(model, dynamic=False)
    return len(compiled_parts(model))


def prepare(model: LongCatLM, cfg: TrainConfig) -> None:
    """Apply `cfg`'s speed switches that act on the model (the trainer calls this once it has built the model)."""
    if cfg.torch_compile:
        compile_dense(model)


def graph_breaks(model: LongCatLM, idx: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """What dynamo makes of the whole model's training forward on (idx, targets): the number of graphs, graph
    breaks, and each distinct break reason (`torch._dynamo.explain`). It runs that forward once (a training one
    adds to the routers' counts) and compiles nothing, then resets dynamo, so compiled modules recompile."""
    explanation = torch._dynamo.explain(model)(idx, targets=targets, return_routing=True, validate=False)
    torch._dynamo.reset()
    reasons = sorted({str(b.reason).splitlines()[0] for b in explanation.break_reasons})
    return {
        "graphs": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
        "reasons": reasons,
    }


__all__ = ["compiled_parts", "compile_dense", "prepare", "graph_breaks"]
