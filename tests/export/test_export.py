"""Export to / import from the Hugging Face LongCat-Flash layout (longcat_lab.export; docs/design.md §1.6, §1.7).

Parity with transformers' LongcatFlashForCausalLM (logits to 1e-5 in fp32, identical greedy generation) for tiny
random configs with a non-zero router bias; exact round trips ours -> folder -> ours and ours -> transformers ->
save_pretrained -> ours; the on-disk key layout; atomic writes; clear errors for bad folders. Tests that need
transformers skip with a reason when it is not installed (CI installs it through the dev extra).

Run: `bash tools/test.sh tests/export/test_export.py`
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import longcat_lab.export as export
from longcat_lab import LongCatLM
from longcat_lab.export import hf, load_hf, save_hf
from longcat_lab.inference.generate import generate
from longcat_lab.model import presets
from longcat_lab.testing import random_model

try:
    import transformers  # noqa: F401  (the parity oracle; optional)

    HAS_TRANSFORMERS = True
except ImportError:
    HAS_TRANSFORMERS = False
needs_hf = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers is not installed (pip install -e '.[hf]'); it is the parity oracle"
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# Three tiny shapes: the HF tester's (4 FFN + 2 zero experts, top-2), one without zero experts, one with more heads,
# top-3 and another RoPE base, so that a field mapped wrongly in config.json shows up in at least one of them.
CONFIGS = {
    0: presets.tiny(),
    1: presets.tiny(zero_expert_num=0, moe_topk=3, num_layers=1),
    2: presets.tiny(num_attention_heads=4, moe_topk=3, zero_expert_num=3, rope_theta=5e5, routed_scaling_factor=2.5),
}


def make_model(seed: int, config=None) -> LongCatLM:
    """CONFIGS[seed] (or `config`) with seeded random weights and a router bias far from zero (N(0, 0.1)), so that
    selection depends on the bias."""
    return random_model(config or CONFIGS[seed], seed, bias_std=0.1)


def load_transformers(path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path).eval()


def assert_same_state(a: LongCatLM, b: LongCatLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# Parity with transformers ------------------------------------------------------------------------------------------
@needs_hf
@pytest.mark.parametrize("seed", sorted(CONFIGS))
def test_logits_and_greedy_generation_match_transformers(tmp_path, seed):
    model = make_model(seed)
    save_hf(model, tmp_path / "export")
    hf = load_transformers(tmp_path / "export")
    assert type(hf).__name__ == "LongcatFlashForCausalLM"
    c = model.config
    g = torch.Generator().manual_seed(100 + seed)
    idx = torch.randint(0, c.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        out = model(idx, return_routing=True)
        ours, routing = out.logits, out.routing
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    if c.zero_expert_num:  # the identity experts really were chosen, so their path was compared too
        assert any(bool((r.topk_ids >= c.n_routed_experts).any()) for r in routing.layers)
    ids, logits = generate(model, idx[:, :6], 12, return_logits=True)
    out = hf.generate(
        idx[:, :6],
        attention_mask=torch.ones_like(idx[:, :6]),
        max_new_tokens=12,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert torch.equal(ids, out.sequences)
    torch.testing.assert_close(logits, torch.stack(out.logits, dim=1), rtol=0, atol=1e-5)


@needs_hf
def test_round_trips_are_exact(tmp_path):
    model = make_model(2)
    save_hf(model, tmp_path / "ours")
    back = load_hf(tmp_path / "ours")
    assert back.config == model.config
    assert_same_state(model, back)
    # A folder written by transformers' own save_pretrained loads too (same layout, its own config.json).
    load_transformers(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    again = load_hf(tmp_path / "theirs")
    assert again.config == model.config
    assert_same_state(model, again)


@needs_hf
def test_loads_a_model_transformers_created(tmp_path):
    from transformers import LongcatFlashConfig, LongcatFlashForCausalLM

    torch.manual_seed(0)
    hf_config = LongcatFlashConfig(
        vocab_size=96,
        hidden_size=32,
        num_layers=1,
        num_attention_heads=2,
        q_lora_rank=16,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        head_dim=4,
        v_head_dim=8,
        ffn_hidden_size=48,
        n_routed_experts=3,
        zero_expert_num=2,
        moe_topk=2,
        expert_ffn_hidden_size=16,
        max_position_embeddings=64,
    )
    hf = LongcatFlashForCausalLM(hf_config).eval()
    with torch.no_grad():
        for block in hf.model.layers:
            block.mlp.router.e_score_correction_bias.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.config.rope_theta == 1e7  # transformers' default base, read from rope_parameters
    idx = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, hf(idx).logits, rtol=0, atol=1e-5)


# The folder itself -------------------------------------------------------------------------------------------------
def test_hub_layout_and_config(tmp_path):
    model = make_model(0)
    c = model.config
    N, Z, F_, D = c.n_routed_experts, c.zero_expert_num, c.expert_ffn_hidden_size, c.hidden_size
    save_hf(model, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "longcat_flash"
    assert config["architectures"] == ["LongcatFlashForCausalLM"]
    assert config["head_dim"] == c.qk_rope_head_dim
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": c.rope_theta}
    assert config["rope_theta"] == c.rope_theta
    assert config["num_layers"] == c.num_layers and config["n_routed_experts"] == N
    tensors = load_file(tmp_path / "export" / "model.safetensors")
    assert "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors
    assert all(k.startswith("model.") for k in tensors if k != "lm_head.weight")
    fused = model.layers[1].mlp.experts
    prefix = "model.layers.1.mlp.experts"
    for e in range(N):
        assert torch.equal(tensors[f"{prefix}.{e}.gate_proj.weight"], fused.gate_up_proj[e, :F_])
        assert torch.equal(tensors[f"{prefix}.{e}.up_proj.weight"], fused.gate_up_proj[e, F_:])
        assert torch.equal(tensors[f"{prefix}.{e}.down_proj.weight"], fused.down_proj[e])
    for e in range(N, N + Z):  # what transformers 5.x allocates for zero experts: zero gate/up, no down
        for proj in ("gate_proj", "up_proj"):
            assert tensors[f"{prefix}.{e}.{proj}.weight"].shape == (F_, D)
            assert not tensors[f"{prefix}.{e}.{proj}.weight"].any()
        assert f"{prefix}.{e}.down_proj.weight" not in tensors
    bias = tensors["model.layers.1.mlp.router.e_score_correction_bias"]
    assert torch.equal(bias, model.layers[1].mlp.router.e_score_correction_bias) and bias.shape == (N + Z,)
    assert not any("expert_counts" in k for k in tensors)  # a non-persistent buffer stays out


def test_bf16_export_keeps_dtype(tmp_path):
    model = make_model(0).to(torch.bfloat16)
    save_hf(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    kept = load_hf(tmp_path / "bf16", dtype=None)
    assert kept.lm_head.weight.dtype == torch.bfloat16
    assert_same_state(model, kept)
    assert load_hf(tmp_path / "bf16").lm_head.weight.dtype == torch.float32


def tiny_tokenizer():
    from longcat_lab.data import train_tokenizer

    texts = ["def add(a, b):\n    return a + b\n", "To be, or not to be, that is the question.", "12 + 34 = 46"]
    return train_tokenizer(texts * 10, 300)


@needs_hf
def test_tokenizer_travels_with_the_export(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = tiny_tokenizer()
    save_hf(make_model(0), tmp_path / "export", tokenizer=tokenizer, eos_token="<|endoftext|>")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "def f(x):\n    return 12 * x  # to be"
    assert hf_tokenizer.encode(text) == tokenizer.encode(text).ids
    assert hf_tokenizer.decode(hf_tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token == "<|endoftext|>"


def test_tokenizer_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match=re.escape("eos_token='<|endoftext|>' needs the tokenizer")):
        save_hf(make_model(0), tmp_path / "a", eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="eos_token='<eos>' is not in the tokenizer's vocabulary"):
        save_hf(make_model(0), tmp_path / "b", tokenizer=tiny_tokenizer(), eos_token="<eos>")
    with pytest.raises(ValueError, match="tokenizer has 300 tokens but the model's vocab_size=200"):
        save_hf(make_model(0, presets.tiny(vocab_size=200)), tmp_path / "c", tokenizer=tiny_tokenizer())
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("style", ["vanilla", "dense"])
def test_only_scmoe_exports(tmp_path, style):
    model = LongCatLM(presets.tiny(layer_style=style))
    with pytest.raises(ValueError, match=f"layer_style='{style}' cannot be exported"):
        save_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mla_scale_off_does_not_export(tmp_path):
    """transformers always applies the MLA scale correction, so a model trained without it must not be exported."""
    model = LongCatLM(presets.tiny(mla_scale=False))
    with pytest.raises(ValueError, match="mla_scale=False cannot be exported"):
        save_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = make_model(0)
    target = tmp_path / "export"
    save_hf(model, target)
    with pytest.raises(ValueError, match="already exists"):
        save_hf(model, target)
    before = (target / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "safetensors_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        save_hf(make_model(1, presets.tiny()), target, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tmp_path / "fresh")
    # The old folder is untouched, the new one never appeared, and no temporary folder is left behind.
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    monkeypatch.undo()
    other = make_model(1, presets.tiny())
    save_hf(other, target, overwrite=True)
    assert_same_state(other, load_hf(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_loads_sharded_and_fused_folders(tmp_path):
    model = make_model(0)
    save_hf(model, tmp_path / "one")
    tensors = load_file(tmp_path / "one" / "model.safetensors")
    # Sharded, as save_pretrained writes large models: two files and an index naming each tensor's file.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, sharded / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_state(model, load_hf(sharded))
    # Fused 5.x tensors (gate_up over N + Z experts) instead of per-expert ones.
    c = model.config
    fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for layer_index, layer in enumerate(model.layers):
        experts = layer.mlp.experts
        pad = torch.zeros(c.zero_expert_num, *experts.gate_up_proj.shape[1:])
        fused[f"model.layers.{layer_index}.mlp.experts.gate_up_proj"] = torch.cat([experts.gate_up_proj.detach(), pad])
        fused[f"model.layers.{layer_index}.mlp.experts.down_proj"] = experts.down_proj.detach().clone()
    folder = tmp_path / "fused"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    save_file(fused, folder / "model.safetensors", metadata={"format": "pt"})
    assert_same_state(model, load_hf(folder))


# Bad folders -------------------------------------------------------------------------------------------------------
def rewrite(folder, *, config=None, tensors=None):
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_clear_errors_for_bad_folders(tmp_path):
    folder = tmp_path / "export"
    save_hf(make_model(0), folder)
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")

    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_hf(tmp_path / "nowhere")
    (folder / "config.json").rename(folder / "config.bak")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_hf(folder)
    (folder / "config.bak").rename(folder / "config.json")

    rewrite(folder, config={**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="model_type='llama'.*does not describe a LongCat-Flash model"):
        load_hf(folder)
    rewrite(folder, config={**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        load_hf(folder)
    rewrite(folder, config={**config, "head_dim": 16})
    with pytest.raises(ValueError, match="config.json: head_dim=16 is not allowed"):
        load_hf(folder)
    rewrite(folder, config=config)

    key = "model.layers.0.self_attn.1.kv_b_proj.weight"
    rewrite(folder, tensors={**tensors, key: tensors[key][:-1]})
    with pytest.raises(ValueError, match=f"tensor {key} has shape"):
        load_hf(folder)
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    rewrite(folder, tensors={**tensors, key: tensors[key].t().contiguous()})
    with pytest.raises(ValueError, match=f"tensor {key} has shape"):
        load_hf(folder)
    rewrite(folder, tensors={k: v for k, v in tensors.items() if k != "model.layers.0.mlp.experts.3.down_proj.weight"})
    with pytest.raises(ValueError, match=r"layer 0 has down_proj for experts \[0, 1, 2\] but not for \[3\]"):
        load_hf(folder)
    key = "model.layers.0.mlp.experts.3.down_proj.weight"
    rewrite(folder, tensors={**{k: v for k, v in tensors.items() if k != key}, key + "\n": tensors[key]})
    with pytest.raises(ValueError, match=r"but not for \[3\]"):  # a final newline makes it another key
        load_hf(folder)
    rewrite(folder, tensors={k: v for k, v in tensors.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match="missing tensor.*model.norm.weight"):
        load_hf(folder)
    rewrite(folder, tensors={**tensors, "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected tensor.*model.layers.0.extra.weight"):
        load_hf(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf(folder)


def test_config_reads_the_hub_release(tmp_path):
    """The Meituan hub config.json names the architecture but has no model_type (docs/design.md §1.6)."""
    hub = {
        "architectures": ["LongcatFlashForCausalLM"],
        "hidden_size": 6144,
        "num_layers": 28,
        "rope_theta": 10000000.0,
        "zero_expert_type": "identity",
        "mla_scale_q_lora": True,
    }
    config = export.config_from_hf(hub)
    assert config == presets.released()
    with pytest.raises(ValueError, match="zero_expert_type='copy' is not supported"):
        export.config_from_hf({**hub, "zero_expert_type": "copy"})


def test_safetensors_metadata_marks_pytorch(tmp_path):
    save_hf(make_model(0), tmp_path / "export")
    with safe_open(tmp_path / "export" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


# Helpers the notebook shows ----------------------------------------------------------------------------------------
def test_checkpoint_bytes_account_for_every_tensor(tmp_path):
    model = make_model(0)
    c = model.config
    save_hf(model, tmp_path / "export")
    sizes = export.checkpoint_bytes(tmp_path / "export")
    tensors = load_file(tmp_path / "export" / "model.safetensors")
    assert sum(sizes.values()) == sum(t.numel() * t.element_size() for t in tensors.values())
    padding = c.num_layers * c.zero_expert_num * 2 * c.expert_ffn_hidden_size * c.hidden_size * 4
    assert sizes[export.PADDING] == padding and sizes["other"] == 0
    experts = c.num_layers * c.n_routed_experts * 3 * c.expert_ffn_hidden_size * c.hidden_size * 4
    assert sizes["FFN experts"] == experts


@needs_hf
def test_cache_bytes_match_transformers_and_the_formula(tmp_path):
    model = make_model(2)
    c = model.config
    save_hf(model, tmp_path / "export")
    sizes = export.cache_bytes_per_token(
        model, torch.randint(0, c.vocab_size, (1, 9)), load_transformers(tmp_path / "export")
    )
    assert (
        sizes["longcat_lab LatentCache"]
        == sizes["MLA formula"]
        == sizes["transformers cache"]
        == (c.kv_lora_rank + c.qk_rope_head_dim) * 2 * c.num_layers * 4
    )
    assert sizes["full K/V"] == 2 * c.num_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 4


def test_serve_commands_name_the_folder_and_the_tokenizer_choice(tmp_path):
    save_hf(make_model(0), tmp_path / "ids")
    commands = export.serve_commands(tmp_path / "ids", served_name="tiny")
    assert commands["vllm"].startswith(f"vllm serve {(tmp_path / 'ids').resolve()} --served-model-name tiny")
    assert "--skip-tokenizer-init" in commands["vllm"] and "--skip-tokenizer-init" in commands["sglang"]
    assert "--context-length 512" in commands["sglang"] and '"prompt": [1, 2, 3]' in commands["query"]
    save_hf(make_model(0), tmp_path / "text", tokenizer=tiny_tokenizer())
    commands = export.serve_commands(tmp_path / "text")
    assert "--skip-tokenizer-init" not in commands["vllm"] + commands["sglang"]
