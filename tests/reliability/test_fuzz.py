"""Property-based fuzzing (hypothesis) of the inputs a user or a damaged disk can hand the library: `--set`
values, `ModelConfig` fields, metrics.jsonl bytes and the contents of a Hugging Face folder for `load_hf`. Every
outcome is a result or a one-line ValueError, never a traceback of another kind, a hang or a crash
(docs/design.md §12). Few examples per property, to stay within the suite's time budget.

Run: `bash tools/test.sh tests/reliability/test_fuzz.py`.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longcat_lab.export import load_hf, save_hf
from longcat_lab.model import presets
from longcat_lab.model.config import ModelConfig
from longcat_lab.testing import random_model
from longcat_lab.train import apply_overrides, read_metrics, train_preset
from longcat_lab.train.overrides import settable_fields

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
)


def one_line(err: Exception) -> None:
    assert str(err) and "\n" not in str(err), repr(err)


@FUZZ
@given(field=st.sampled_from(sorted(settable_fields())), value=st.one_of(st.text(max_size=12), values.map(str)))
def test_set_values(field, value):
    try:
        apply_overrides(presets.tiny(), train_preset("tiny"), [f"{field}={value}"])
    except ValueError as err:
        one_line(err)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(presets.tiny().to_dict())), values, min_size=1, max_size=3))
def test_model_config_fields(changes):
    try:
        ModelConfig.from_dict({**presets.tiny().to_dict(), **changes})
    except ValueError as err:
        one_line(err)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(st.one_of(st.binary(max_size=40), values.map(json.dumps).map(str.encode)), max_size=6).map(b"\n".join),
    )
)
def test_metrics_reader(tmp_path, data):
    (tmp_path / "metrics.jsonl").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rows = read_metrics(tmp_path)
        except ValueError as err:
            one_line(err)
        else:
            assert all(isinstance(r, dict) for r in rows)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_hf") / "export"
    save_hf(random_model(presets.tiny(), 0), path)
    return path


FILES = ["config.json", "model.safetensors", "model.safetensors.index.json"]


@FUZZ
@given(
    name=st.sampled_from(FILES),
    how=st.sampled_from(["truncate", "flip", "replace", "json", "delete"]),
    where=st.floats(0, 1),
    blob=st.binary(max_size=64),
    value=values,
)
def test_load_hf_folder_contents(exported, tmp_path, name, how, where, blob, value):
    folder = tmp_path / "copy"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(exported, folder)
    file = folder / name
    data = file.read_bytes() if file.is_file() else b""
    cut = int(where * len(data))
    if how == "truncate":
        file.write_bytes(data[:cut])
    elif how == "flip" and data:
        file.write_bytes(data[:cut] + bytes([data[min(cut, len(data) - 1)] ^ 0xFF]) + data[cut + 1 :])
    elif how == "replace":
        file.write_bytes(blob)
    elif how == "json":
        doc = json.loads(data) if name == "config.json" else {"weight_map": {}}
        key = sorted(doc)[cut % len(doc)] if doc else "weight_map"
        doc[key] = value
        file.write_text(json.dumps(doc))
        if name.endswith("index.json"):
            (folder / "model.safetensors").unlink()
    elif how == "delete":
        file.unlink(missing_ok=True)
    try:
        load_hf(folder)
    except (ValueError, FileNotFoundError) as err:
        one_line(err)
