"""`inference.compiled.compile_decoding`: the MLA blocks and dense FFNs compiled (traced by dynamo; the "eager"
backend skips code generation, which takes minutes on a CPU), greedy decoding unchanged, the MoE left eager.

Run: .venv/bin/python -m pytest tests/inference/test_compiled.py -q
"""

import copy

import pytest
import torch

from longcat_lab.inference.compiled import compile_decoding, is_compiled
from longcat_lab.inference.generate import generate
from longcat_lab.testing import random_ids, random_model


@pytest.mark.slow
def test_compiled_decoding_writes_the_same_tokens(one_thread):
    torch._dynamo.reset()
    model = random_model(seed=9, bias_std=0.05)
    compiled = compile_decoding(copy.deepcopy(model), backend="eager")
    assert is_compiled(compiled) and not is_compiled(model)
    assert compiled.layers[0].self_attn[0]._compiled_call_impl is not None
    assert compiled.layers[0].mlp._compiled_call_impl is None  # the MoE stays eager
    ids = random_ids(model.config, (1, 6))
    want, want_logits = generate(model, ids, 5, return_logits=True)
    got, got_logits = generate(compiled, ids, 5, return_logits=True)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="LongCatLM"):
        compile_decoding(torch.nn.Linear(2, 2))
