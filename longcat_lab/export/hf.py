"""Export to, and import from, the Hugging Face LongCat-Flash checkpoint layout (docs/design.md §1.6).

`save_hf(model, path)` writes a folder that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads as
`LongcatFlashForCausalLM`, and that vLLM and SGLang serve under the same architecture string:
- `config.json` with `model_type: "longcat_flash"`, `architectures`, `head_dim = qk_rope_head_dim`, and the RoPE base
  both as `rope_parameters` (transformers 5.x) and as `rope_theta` (4.57), so either version reads it;
- `model.safetensors` in the hub key layout: a `model.` prefix on everything but `lm_head`, and the experts unfused
  into `experts.{e}.{gate,up,down}_proj.weight` for the N FFN experts, plus the zero-filled `gate_proj`/`up_proj`
  of the Z zero experts that transformers 5.x allocates and refuses to load without (docs/design.md §1.6, the
  5.24 quirk).
  Our model never holds those zeros (docs/design.md D3); only this file writes them.

`load_hf(path)` reads such a folder back into a `LongCatLM`: ours, one saved by transformers' own
`save_pretrained` (same layout), a sharded one (`model.safetensors.index.json`), or one with 5.x-style fused expert
tensors. A missing file, a config that is not LongCat-Flash, or a tensor of the wrong shape raises an error naming it.
`serve_commands(path)` returns the commands that serve the folder with vLLM and SGLang. What an export weighs on
disk and in the KV cache is counted in `export.sizes`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from longcat_lab._util import json_bytes, shown, staged_dir
from longcat_lab.chat.template import chat_template
from longcat_lab.export.hf_config import CONFIG_NAME, check_config_fits, config_from_hf, hf_config_dict
from longcat_lab.model.config import ModelConfig
from longcat_lab.model.model import LongCatLM

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# `\Z`, not `$`: `$` also matches before a final newline, and a key read from a file may end in one.
# Fused expert tensors in our state dict: layers.{l}.mlp.experts.{gate_up_proj [N, 2F, D], down_proj [N, D, F]}.
FUSED_EXPERT_KEY = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)\Z")
# Per-expert hub keys: model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight. The expert index is read as an
# int, so only ASCII digits, and few enough that int() takes them (a key in a file may hold anything).
HUB_EXPERT_KEY = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.experts\.([0-9]{1,9})\.(gate_proj|up_proj|down_proj)\.weight\Z"
)
HUB_FUSED_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)\Z")
# Multi-token-prediction weights (docs/design.md §1.5): transformers ignores them on load; vLLM and SGLang read them for
# speculative decoding; we read them when the config has the MTP module (num_nextn_predict_layers) and skip them
# otherwise. Three module names differ between the release and our model.
IGNORED_HUB_PREFIX = "model.mtp."
MTP_HUB_NAMES = {"enorm": "enorm.m", "hnorm": "hnorm.m", "mlp": "transformer_layer.mlp"}
HUB_MTP_RENAMED = re.compile(r"^model\.mtp\.layers\.(\d+)\.(enorm\.m|hnorm\.m|transformer_layer\.mlp)\.(.+)\Z")


# State dicts -----------------------------------------------------------------------------------------------------
def to_hub_state_dict(model: LongCatLM) -> dict[str, torch.Tensor]:
    """Our flat state dict renamed to the hub layout, experts unfused, zero experts' gate/up zero-filled."""
    config = model.config
    if config.layer_style != "scmoe":
        hf_config_dict(config)  # raises the explanatory error
    N, Z, F_ = config.n_routed_experts, config.zero_expert_num, config.expert_ffn_hidden_size
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        fused = FUSED_EXPERT_KEY.match(key)
        if fused is None:
            out[hub_name(key)] = tensor.contiguous()
            continue
        prefix = f"model.layers.{fused.group(1)}.mlp.experts"
        if fused.group(2) == "gate_up_proj":  # [N, 2F, D], rows [gate ; up]
            for e in range(N):
                out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :F_].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, F_:].contiguous()
            for e in range(N, N + Z):  # transformers 5.x allocates these; never used
                out[f"{prefix}.{e}.gate_proj.weight"] = torch.zeros_like(tensor[0, :F_])
                out[f"{prefix}.{e}.up_proj.weight"] = torch.zeros_like(tensor[0, F_:])
        else:  # [N, D, F]
            for e in range(N):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].contiguous()
    return out


def expected_shapes(config: ModelConfig, source: str = CONFIG_NAME) -> dict[str, tuple[int, ...]]:
    """Our state-dict keys and shapes for `config`, from a model on the meta device (no memory, no init cost)."""
    try:
        with torch.device("meta"):
            model = LongCatLM(config)
    except RuntimeError as err:  # sizes whose product overflows 64 bits ("Storage size calculation overflowed")
        raise ValueError(f"{source}: the sizes are too large for any tensor ({str(err).splitlines()[0]})") from None
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


def check_shape(source: str, key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{source}: tensor {key} has shape {tuple(tensor.shape)}, expected {tuple(shape)} "
            "for the config in config.json"
        )


def from_hub_state_dict(
    tensors: dict[str, torch.Tensor], config: ModelConfig, source: str = WEIGHTS_NAME, config_source: str = CONFIG_NAME
) -> dict[str, torch.Tensor]:
    """The inverse of `to_hub_state_dict`: our flat state dict, every key and shape checked against `config`.

    Zero experts' gate/up tensors and `model.mtp.*` are skipped (transformers does not use them either); 5.x-style
    fused expert tensors (gate_up [N+Z or N, 2F, D], down [N, D, F]) are accepted as well."""
    expected = expected_shapes(config, config_source)
    N, D, F_ = config.n_routed_experts, config.hidden_size, config.expert_ffn_hidden_size
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # (layer, proj) -> {expert: [F, D] or [D, F]}
    unexpected = []
    for key, tensor in tensors.items():
        if key.startswith(IGNORED_HUB_PREFIX) and not config.num_nextn_predict_layers:
            continue
        if match := HUB_MTP_RENAMED.match(key):
            ours = {v: k for k, v in MTP_HUB_NAMES.items()}[match.group(2)]
            out[f"mtp.layers.{match.group(1)}.{ours}.{match.group(3)}"] = tensor
        elif match := HUB_EXPERT_KEY.match(key):
            layer, e, proj = match.group(1), int(match.group(2)), match.group(3)
            if e < N:
                check_shape(source, key, tensor, (D, F_) if proj == "down_proj" else (F_, D))
                experts.setdefault((layer, proj), {})[e] = tensor
            elif not (e < config.num_experts and proj != "down_proj"):
                unexpected.append(key)  # zero experts may own gate/up only
        elif match := HUB_FUSED_KEY.match(key):
            if match.group(2) == "gate_up_proj" and tensor.dim() == 3 and tensor.shape[0] == config.num_experts:
                tensor = tensor[:N]  # rows past N belong to the zero experts
            out[f"layers.{match.group(1)}.mlp.experts.{match.group(2)}"] = tensor
        elif key.startswith("lm_head."):
            out[key] = tensor
        elif key.startswith("model."):
            out[key.removeprefix("model.")] = tensor
        else:
            unexpected.append(key)
    for (layer, proj), by_expert in sorted(experts.items()):
        if len(by_expert) < N:  # listed without building range(N): N comes from a file
            missing = list(itertools.islice((e for e in range(N) if e not in by_expert), 8))
            more = ", ..." if len(by_expert) + len(missing) < N else ""
            raise ValueError(
                f"{source}: layer {layer} has {proj} for experts {sorted(by_expert)} but not for "
                f"{str(missing)[:-1]}{more}] (n_routed_experts={N})"
            )
        experts[layer, proj] = torch.stack([by_expert[e] for e in range(N)])
    for layer, proj in sorted(experts):
        prefix = f"layers.{layer}.mlp.experts"
        if proj == "down_proj":
            out[f"{prefix}.down_proj"] = experts[layer, proj]
        elif proj == "gate_proj":
            if (layer, "up_proj") not in experts:
                raise ValueError(f"{source}: layer {layer} has expert gate_proj but no up_proj tensors")
            out[f"{prefix}.gate_up_proj"] = torch.cat([experts[layer, "gate_proj"], experts[layer, "up_proj"]], 1)
        elif (layer, "gate_proj") not in experts:
            raise ValueError(f"{source}: layer {layer} has expert up_proj but no gate_proj tensors")
    unexpected += [hub_name(k) for k in out if k not in expected]
    if unexpected:
        raise ValueError(
            f"{source}: unexpected tensor(s) {sorted(unexpected)[:8]} ({len(unexpected)} in all) "
            "for the config in config.json"
        )
    missing = sorted(hub_name(k) for k in set(expected) - set(out))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:8]} ({len(missing)} in all)")
    for key, shape in expected.items():
        check_shape(source, hub_name(key), out[key], shape)
    return out


def hub_name(key: str) -> str:
    """Our key as the hub spells it: a `model.` prefix on all but the LM head, and the release's MTP module names."""
    if key.startswith("lm_head."):
        return key
    parts = key.split(".")
    if parts[0] == "mtp" and len(parts) > 3 and parts[1] == "layers" and parts[3] in MTP_HUB_NAMES:
        parts[3] = MTP_HUB_NAMES[parts[3]]
    return "model." + ".".join(parts)


# Folders -----------------------------------------------------------------------------------------------------------
def save_hf(
    model: LongCatLM, path: str | os.PathLike, *, tokenizer=None, eos_token: str | None = None, overwrite: bool = False
) -> Path:
    """Write `model` as a Hugging Face LongCat-Flash folder (config.json + model.safetensors) at `path`.

    With a `tokenizers.Tokenizer`, also tokenizer.json and a tokenizer_config.json that `AutoTokenizer` (and so
    vLLM and SGLang) read, carrying the LongCat chat template; `eos_token` (e.g. "<|endoftext|>") then becomes the
    model's end-of-sequence token.
    Written atomically: everything goes to a temporary folder beside `path`, which is then renamed, so a crash
    leaves either no folder or a complete one. An existing `path` is replaced only with overwrite=True."""
    if not isinstance(model, LongCatLM):
        raise ValueError(f"model must be a LongCatLM, got {type(model).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"path={str(path)!r} already exists; pass overwrite=True to replace it")
    eos_token_id = None
    if eos_token is not None:
        if tokenizer is None:
            raise ValueError(f"eos_token={eos_token!r} needs the tokenizer that defines it (tokenizer=None)")
        eos_token_id = tokenizer.token_to_id(eos_token)
        if eos_token_id is None:
            raise ValueError(f"eos_token={eos_token!r} is not in the tokenizer's vocabulary")
    if tokenizer is not None and tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size={model.config.vocab_size}"
        )
    config = hf_config_dict(model.config, model.lm_head.weight.dtype, eos_token_id=eos_token_id)
    tensors = to_hub_state_dict(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(path, prefix=f".{path.name}.tmp-") as tmp:
        # Serialised in memory and written by Python, so a full disk is an OSError naming the file (safetensors'
        # own writer reports it as its own exception type).
        (tmp / WEIGHTS_NAME).write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
        (tmp / CONFIG_NAME).write_bytes(json_bytes(config))
        if tokenizer is not None:
            (tmp / TOKENIZER_NAME).write_text(tokenizer.to_str())
            tokenizer_config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": eos_token,
                "model_max_length": model.config.max_position_embeddings,
                "clean_up_tokenization_spaces": False,
                # apply_chat_template on the folder gives exactly chat.render's string (docs/design.md §5.1).
                "chat_template": chat_template(),
            }
            (tmp / TOKENIZER_CONFIG_NAME).write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return path


def read_json_file(file: Path) -> Any:
    """The JSON in `file`, or a one-line ValueError naming it (bad UTF-8, bad JSON, hostile nesting)."""
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text") from None
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{file} is not valid JSON ({str(err).splitlines()[0] if str(err) else 'too deep'})") from None


def shard_files(path: Path, index: Path) -> list[Path]:
    """The shard files that `index` names, each refused unless it is a plain file name inside `path` (an index
    must not make the loader read files elsewhere)."""
    data = read_json_file(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no 'weight_map' object naming the shard of each tensor")
    if not all(isinstance(n, str) and n for n in weight_map.values()):
        raise ValueError(f"{index}: every 'weight_map' value must be a shard file name")
    root = path.resolve()
    files = []
    for name in sorted(set(weight_map.values())):
        file = path / name
        if (
            "\0" in name
            or Path(name).is_absolute()
            or Path(name).name != name
            or not file.resolve().is_relative_to(root)
        ):
            raise ValueError(
                f"{index} lists shard {shown(name)}, which is not a file inside {path}; refusing to read it"
            )
        try:
            found = file.is_file()
        except OSError as err:  # a name too long for the file system, say
            raise ValueError(f"{index} lists shard {shown(name)}, which cannot be opened ({err.strerror})") from None
        if not found:
            raise FileNotFoundError(f"{index} lists shard {shown(name)}, which is missing from {path}")
        files.append(file)
    return files


def unreadable(file: Path, err: Exception) -> ValueError:
    """The one-line error for a file that safetensors cannot read (it raises its own types, some multi-line)."""
    first = str(err).splitlines()[0] if str(err) else ""
    return ValueError(f"{file}: not a readable safetensors file ({type(err).__name__}: {first})")


def read_headers(file: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor: (safetensors dtype, shape)} from the header of `file`, or a ValueError naming it."""
    try:
        with safe_open(file, framework="pt") as f:
            return {key: (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own types for damaged headers
        raise unreadable(file, err) from None


def read_hub_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, or the shards listed in model.safetensors.index.json. A file
    that safetensors cannot read, or a tensor with a NaN or an infinity, is a ValueError naming it."""
    single, index = path / WEIGHTS_NAME, path / WEIGHTS_INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = shard_files(path, index)
    else:
        raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}")
    tensors = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                read = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safetensors handle)
        except Exception as err:  # safetensors raises its own types for damaged headers and truncated data
            raise unreadable(file, err) from None
        for key, tensor in read.items():  # every weight and buffer we load is floating point
            if not tensor.is_floating_point():
                raise ValueError(
                    f"{file}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected a "
                    "floating-point dtype (F32, BF16, F16)"
                )
        tensors.update(read)
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {key} holds NaN or infinite values; refusing to load it")
    return tensors


def load_hf(
    path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
) -> LongCatLM:
    """Load a Hugging Face LongCat-Flash folder (ours or transformers' `save_pretrained`) into a `LongCatLM` in eval
    mode, cast to `dtype` (None keeps the checkpoint's dtype)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (expected a Hugging Face LongCat-Flash checkpoint folder)")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing")
    data = read_json_file(config_file)
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} holds a {type(data).__name__}, expected a JSON object")
    config = config_from_hf(data, str(config_file))
    tensors = read_hub_tensors(path)
    check_config_fits(config, {k: tuple(t.shape) for k, t in tensors.items()}, str(config_file), str(path))
    if not config.num_nextn_predict_layers and any(k.startswith(IGNORED_HUB_PREFIX) for k in tensors):
        config = config.replace(num_nextn_predict_layers=1)  # MTP weights, no field: one module, as vLLM assumes
    if data.get("tie_word_embeddings") and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # tied: stored once
    state = from_hub_state_dict(tensors, config, str(path / WEIGHTS_NAME), str(config_file))
    with torch.device("meta"):
        model = LongCatLM(config)
    model.load_state_dict(state, assign=True)
    # Non-persistent buffers (the routers' token counters) are not in the file: rebuild them for real.
    for moe in model.moe_blocks():
        moe.router.expert_counts = torch.zeros(config.num_experts, dtype=torch.long)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


def serve_commands(
    path: str | os.PathLike, served_name: str = "longcat-lab", dtype: str = "bfloat16", port: int = 8000
) -> dict[str, str]:
    """Shell commands that serve an exported folder with vLLM and SGLang (both register LongcatFlashForCausalLM)
    and query it. They need a CUDA GPU; nothing here runs them. Without tokenizer files in the folder, the engines
    skip tokenizer set-up and take token ids. A folder with the MTP module gets LongCat's speculative settings (one
    draft token, docs/design.md §7.3)."""
    path = Path(path).resolve()
    config = read_json_file(path / CONFIG_NAME)
    context = config_from_hf(config, str(path / CONFIG_NAME)).max_position_embeddings
    no_tokenizer = not (path / TOKENIZER_NAME).is_file()
    skip = " --skip-tokenizer-init" if no_tokenizer else ""
    prompt = '"prompt": [1, 2, 3]' if no_tokenizer else '"prompt": "To be, or not to be"'
    vllm_mtp = sglang_mtp = ""
    if config.get("num_nextn_predict_layers"):
        vllm_mtp = """ --speculative-config '{"method": "longcat_flash_mtp", "num_speculative_tokens": 1}'"""
        sglang_mtp = (
            " --speculative-algorithm NEXTN --speculative-num-draft-tokens 2 --speculative-num-steps 1"
            " --speculative-eagle-topk 1"
        )
    return {
        "vllm": f"vllm serve {path} --served-model-name {served_name} --dtype {dtype} --max-model-len {context} "
        f"--port {port}{skip}{vllm_mtp}",
        "sglang": f"python -m sglang.launch_server --model-path {path} --served-model-name {served_name} "
        f"--dtype {dtype} --context-length {context} --port {port}{skip}{sglang_mtp}",
        "query": f"curl http://localhost:{port}/v1/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{served_name}", {prompt}, "max_tokens": 32, "temperature": 0}}\'',
    }
