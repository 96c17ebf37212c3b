"""Tests of `export.load_hf` on damaged folders (docs/design.md §9): a truncated safetensors file or a garbage
index names the file, a shard path outside the folder is refused, NaN or infinite weights are refused with the
tensor's name. A tiny random model exported once per module.

Run: `bash tools/test.sh tests/export/test_hf_loading.py`.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_lab.export import load_hf, save_hf
from longcat_lab.model import presets
from longcat_lab.testing import random_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "export"
    save_hf(random_model(presets.tiny(), 0), path)
    return path


@pytest.fixture
def folder(exported, tmp_path):
    return shutil.copytree(exported, tmp_path / "copy")


def sharded(folder, names):
    """Split model.safetensors into shards named `names` (cycled) with an index."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    weight_map = {key: names[i % len(names)] for i, key in enumerate(sorted(tensors))}
    for name in set(names):
        if "/" not in name and "\\" not in name:
            save_file({k: v for k, v in tensors.items() if weight_map[k] == name}, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def test_truncated_or_garbage_weights_name_the_file(folder):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], data[:5], b"\x00" * 64, b""):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
            load_hf(folder)


def test_garbage_index_names_the_file(folder):
    sharded(folder, ["a.safetensors", "b.safetensors"])
    index = folder / "model.safetensors.index.json"
    for text, words in (
        (b"{not json", "model.safetensors.index.json is not valid JSON"),
        (b"\xff\xfe", "model.safetensors.index.json is not UTF-8 text"),
        (b"[" * 100_000, "model.safetensors.index.json is not valid JSON"),
        (b"[1, 2]", "no 'weight_map' object"),
        (json.dumps({"weight_map": {"x": 3}}).encode(), "every 'weight_map' value must be a shard file name"),
    ):
        index.write_bytes(text)
        with pytest.raises(ValueError, match=words):
            load_hf(folder)


@pytest.mark.parametrize("outside", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_outside_the_folder_is_refused(folder, outside):
    sharded(folder, ["a.safetensors", outside])
    with pytest.raises(ValueError, match="which is not a file inside"):
        load_hf(folder)


def test_sharded_folder_still_loads(folder, exported):
    sharded(folder, ["a.safetensors", "b.safetensors"])
    a, b = load_hf(folder), load_hf(exported)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(folder, bad):
    tensors = load_file(folder / "model.safetensors")
    key = "model.norm.weight"
    tensors[key][0] = bad
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"tensor {key} holds NaN or infinite values"):
        load_hf(folder)


def test_config_not_utf8_names_the_file(folder):
    (folder / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="config.json is not UTF-8 text"):
        load_hf(folder)
