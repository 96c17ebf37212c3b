"""Exporting the MTP module (docs/design.md §1.5): the release's `model.mtp.*` key names (what vLLM's and SGLang's
LongCat MTP loaders read), `num_nextn_predict_layers` in config.json, an exact round trip through `load_hf`,
transformers still loading the folder (it drops those keys) with the main model's logits unchanged, a folder with
MTP weights but no field, and the serving commands' speculative settings.

Run: `.venv/bin/python -m pytest tests/export/test_mtp_export.py -q`
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from longcat_lab.export import checkpoint_bytes, load_hf, save_hf, serve_commands
from longcat_lab.inference.speculative import speculative_generate
from longcat_lab.model import presets
from longcat_lab.testing import random_ids, random_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CONFIG = presets.tiny(num_nextn_predict_layers=1)

# The release's MTP keys (vLLM longcat_flash_mtp.py maps exactly these; docs/design.md §1.5).
RELEASE_MTP_KEYS = {
    "model.mtp.embed_tokens.weight",
    "model.mtp.norm.weight",
    *(
        f"model.mtp.layers.0.{name}.weight"
        for name in (
            "eh_proj",
            "enorm.m",
            "hnorm.m",
            "input_layernorm",
            "post_attention_layernorm",
            "self_attn.q_a_proj",
            "self_attn.q_a_layernorm",
            "self_attn.q_b_proj",
            "self_attn.kv_a_proj_with_mqa",
            "self_attn.kv_a_layernorm",
            "self_attn.kv_b_proj",
            "self_attn.o_proj",
            "transformer_layer.mlp.gate_proj",
            "transformer_layer.mlp.up_proj",
            "transformer_layer.mlp.down_proj",
        )
    ),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = random_model(CONFIG, seed=3, bias_std=0.1)
    path = save_hf(model, tmp_path_factory.mktemp("mtp") / "export")
    return model, path


def test_keys_and_config_are_the_releases(exported):
    model, path = exported
    keys = set(load_file(path / "model.safetensors"))
    assert {k for k in keys if k.startswith("model.mtp.")} == RELEASE_MTP_KEYS
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    mtp_bytes = sum(p.numel() * p.element_size() for p in model.mtp.parameters())
    assert checkpoint_bytes(path)["MTP module"] == mtp_bytes and checkpoint_bytes(path)["other"] == 0
    plain = save_hf(random_model(presets.tiny()), path.parent / "plain")
    assert "num_nextn_predict_layers" not in json.loads((plain / "config.json").read_text())
    assert not any(k.startswith("model.mtp.") for k in load_file(plain / "model.safetensors"))


def test_round_trip_is_exact_and_speculates_the_same(exported):
    model, path = exported
    loaded = load_hf(path)
    assert loaded.config == model.config
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    prompt = random_ids(CONFIG, (1, 6))
    assert torch.equal(speculative_generate(loaded, prompt, 12)[0], speculative_generate(model, prompt, 12)[0])


def test_mtp_weights_without_the_config_field_are_loaded(exported, tmp_path):
    """A folder that has model.mtp.* tensors but no num_nextn_predict_layers gets one MTP module (vLLM's default)."""
    model, path = exported
    folder = tmp_path / "nofield"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    del config["num_nextn_predict_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_hf(folder)
    assert loaded.config.num_nextn_predict_layers == 1
    assert torch.equal(loaded.mtp.layers[0].enorm.weight, model.mtp.layers[0].enorm.weight)


def test_transformers_still_loads_the_folder(exported):
    """transformers ignores model.mtp.* (`_keys_to_ignore_on_load_unexpected`): the folder loads without missing or
    unexpected-key errors, and its logits are the main model's."""
    transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle (the hf extra)")
    transformers.utils.logging.disable_progress_bar()
    model, path = exported
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not any(not k.startswith("model.mtp.") for k in info["unexpected_keys"])
    idx = random_ids(CONFIG, (2, 16), seed=7)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits.float(), model(idx).logits, rtol=1e-5, atol=1e-5)


def test_serve_commands_turn_on_speculation(exported, tmp_path):
    _, path = exported
    commands = serve_commands(path)
    assert """--speculative-config '{"method": "longcat_flash_mtp", "num_speculative_tokens": 1}'""" in commands["vllm"]
    assert "--speculative-algorithm NEXTN --speculative-num-draft-tokens 2" in commands["sglang"]
    plain = save_hf(random_model(presets.tiny()), tmp_path / "plain")
    assert "speculative" not in serve_commands(plain)["vllm"] + serve_commands(plain)["sglang"]
