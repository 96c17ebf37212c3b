"""Property-based fuzzing (hypothesis) of the inputs a user or a damaged disk can hand the library: `--set`
values, `ModelConfig` fields, metrics.jsonl bytes and the contents of a Hugging Face folder for `load_hf` (config.json
fields, safetensors headers, the shard index). Every outcome is a result or a one-line ValueError, never a traceback
of another kind, a hang or a crash (docs/design.md §9). The reader of tokenizer.json and of fine-tuning JSONL are
fuzzed in test_fuzz_files.py.

Each failure hypothesis ever found is kept as an `@example`, so the deterministic suite replays it. The examples
drawn depend only on the test's source (tests/conftest.py: the `deterministic` profile); `bash tools/fuzz.sh` draws
fresh ones, thousands per test.

Run: `bash tools/test.sh tests/reliability/test_fuzz.py`; fuzz: `bash tools/fuzz.sh tests/reliability`.
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from longcat_lab.export import checkpoint_bytes, hf_config_dict, load_hf, save_hf, serve_commands
from longcat_lab.model import presets
from longcat_lab.model.config import ModelConfig
from longcat_lab.testing import random_model
from longcat_lab.train import apply_overrides, read_metrics, train_preset
from longcat_lab.train.overrides import settable_fields

# The profile (tests/conftest.py) sets how many examples; tmp_path and the folder fixtures hold no per-example state
# that matters (each example rewrites what it reads).
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    # Sizes that overflow a 32- or 64-bit int, or a float (10**400 is valid JSON); written as powers to keep the
    # statistics of `bash tools/fuzz.sh` short.
    st.sampled_from([(10, 9), (2, 31), (2, 63), (10, 400)]).map(lambda p: p[0] ** p[1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
)
# Any JSON document: what a file we did not write may hold where we expect something else.
json_values = st.recursive(
    values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=6,
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
@example(changes={"rope_theta": 10**400})  # OverflowError: int too large to convert to float
def test_model_config_fields(changes):
    try:
        ModelConfig.from_dict({**presets.tiny().to_dict(), **changes})
    except ValueError as err:
        one_line(err)


@pytest.mark.parametrize("data", [[1, 2], "hidden_size", 5, None])
def test_model_config_from_a_json_document_that_is_no_object(data):
    with pytest.raises(ValueError, match=f"not a {type(data).__name__}"):
        ModelConfig.from_dict(data)


metric_lines = st.one_of(
    st.binary(max_size=40),
    values.map(json.dumps).map(str.encode),
    st.dictionaries(st.sampled_from(["kind", "step", "loss", "lm_loss", "val_loss", "lr"]), json_values, max_size=3)
    .map(json.dumps)
    .map(str.encode),
)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.lists(metric_lines, max_size=6).map(b"\n".join)))
@example(data=b'{"kind": "train", "step": "3", "loss": 1.0}\n{"kind": "eval", "step": 2, "val_loss": 5}\n')
def test_metrics_reader(tmp_path, data):
    (tmp_path / "metrics.jsonl").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rows = read_metrics(tmp_path)
        except ValueError as err:
            one_line(err)
            return
    # What the figures and summaries compute with has the type they expect.
    for row in rows:
        assert isinstance(row, dict) and isinstance(row.get("kind", ""), str)
        assert "step" not in row or (type(row["step"]) is int and row["step"] >= 0)
        assert row.get("loss") is None or type(row["loss"]) in (int, float)
        assert row.get("val_loss") is None or isinstance(row["val_loss"], dict)


@pytest.mark.parametrize(
    "line, why",
    [
        ({"kind": "train", "step": "3"}, "field 'step' is not an integer"),
        ({"kind": 5, "step": 1}, "field 'kind' is not a string"),
        ({"kind": "train", "loss": 1.0}, "no field 'step'"),
        ({"step": 1, "loss": [1]}, "field 'loss' is not a number"),
        ({"kind": "eval", "step": 1, "val_loss": {"python": "low"}}, "field 'val_loss' is not a number"),
    ],
)
def test_metrics_rows_of_the_wrong_type_are_skipped_and_named(tmp_path, line, why):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(line) + '\n{"step": 0}\n')
    with pytest.warns(UserWarning, match=f"metrics.jsonl: line 1 skipped: {why}"):
        assert read_metrics(tmp_path) == [{"step": 0}]


# Hugging Face folders ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_hf") / "export"
    save_hf(random_model(presets.tiny(), 0), path)
    return path


FILES = ["config.json", "model.safetensors", "model.safetensors.index.json"]


@FUZZ
@given(
    name=st.sampled_from(FILES),
    how=st.sampled_from(["truncate", "flip", "replace", "json", "delete", "shard"]),
    where=st.floats(0, 1),
    blob=st.binary(max_size=64),
    value=values,
)
@example(name="model.safetensors.index.json", how="shard", where=0.0, blob=b"", value=[1])  # TypeError: unhashable
@example(name="model.safetensors.index.json", how="shard", where=0.0, blob=b"", value="a" * 300)  # OSError: too long
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
    elif how == "shard":  # an index that names `value` as the shard of a tensor
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": value}}))
        (folder / "model.safetensors").unlink()
    elif how == "delete":
        file.unlink(missing_ok=True)
    try:
        load_hf(folder)
    except (ValueError, FileNotFoundError) as err:
        one_line(err)
        assert str(folder) in str(err), err


@pytest.fixture
def linked(exported, tmp_path):
    """A folder whose weights are the export's (a link: nothing copied per example) and whose config.json the
    test writes."""
    folder = tmp_path / "linked"
    folder.mkdir(exist_ok=True)
    weights = folder / "model.safetensors"
    if not weights.exists():
        weights.symlink_to(exported / "model.safetensors")
    return folder


CONFIG = hf_config_dict(presets.tiny())
CONFIG_KEYS = sorted({*CONFIG, "num_hidden_layers", "num_nextn_predict_layers", "type"})


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, max_size=3),
    drop=st.sets(st.sampled_from(CONFIG_KEYS), max_size=2),
)
@example(changes={"rope_parameters": 1}, drop=set())  # AttributeError: 'int' object has no attribute 'get'
@example(changes={"rope_scaling": "yarn"}, drop=set())
@example(changes={"num_hidden_layers": "8"}, drop={"num_layers"})  # TypeError: unsupported operand for //
@example(changes={"num_hidden_layers": None}, drop={"num_layers"})
@example(changes={"model_type": None, "architectures": 5}, drop=set())  # TypeError: int is not iterable
@example(changes={"n_routed_experts": 10**9}, drop=set())  # MemoryError (set(range(N)) of the experts)
@example(changes={"num_layers": 10**5}, drop=set())  # 10**5 layers built before the shapes were compared
@example(changes={"qk_nope_head_dim": "x", "qk_head_dim": 3}, drop=set())  # TypeError: str + int
@example(changes={"rope_parameters": {"rope_theta": 10**400}}, drop=set())  # OverflowError
def test_config_json_fields(linked, changes, drop):
    doc = {key: value for key, value in CONFIG.items() if key not in drop} | changes
    (linked / "config.json").write_text(json.dumps(doc))
    for read in (load_hf, serve_commands, checkpoint_bytes):
        try:
            read(linked)
        except ValueError as err:
            one_line(err)
            assert str(linked) in str(err), err


WRONG_TYPES = [  # (changes, keys dropped, the start of the message after the file name)
    ({"rope_parameters": 1}, (), "rope_parameters=1 is not allowed"),
    ({"rope_scaling": [2]}, (), "rope_scaling=[2] is not allowed"),
    ({"num_hidden_layers": "8"}, ("num_layers",), "num_hidden_layers='8' is not allowed"),
    ({"num_hidden_layers": None}, ("num_layers",), "num_hidden_layers=None is not allowed"),
    ({"model_type": None, "architectures": 5}, (), "architectures=5 is not allowed"),
    ({"tie_word_embeddings": "yes"}, (), "tie_word_embeddings='yes' is not allowed"),
    ({"n_routed_experts": 10**9}, (), "n_routed_experts=1000000000 does not fit the weights"),
    ({"num_layers": 10**5}, (), "num_layers=100000 does not fit the weights"),
    ({"hidden_size": 2**40}, (), "hidden_size=1099511627776 does not fit the weights"),
    ({"rope_parameters": {"rope_theta": 10**400}}, (), "rope_theta=1000"),
]


@pytest.mark.parametrize("changes, drop, message", WRONG_TYPES)
def test_config_json_of_the_wrong_type_names_file_and_field(linked, changes, drop, message):
    doc = {key: value for key, value in CONFIG.items() if key not in drop} | changes
    (linked / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError) as caught:
        load_hf(linked)
    assert str(caught.value).startswith(f"{linked / 'config.json'}: {message}"), caught.value
    one_line(caught.value)


# Safetensors headers -----------------------------------------------------------------------------------------------
def rewrite_header(file, change) -> None:
    """Apply `change(header)` to the JSON header of the safetensors `file` (data bytes left as they are)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "X"]


@FUZZ
@given(
    which=st.integers(0, 10**6),
    field=st.sampled_from(["dtype", "shape", "data_offsets", "__entry__", "__metadata__", "__rename__"]),
    value=st.one_of(st.sampled_from(DTYPES), st.lists(st.integers(-2, 2**40), max_size=4), json_values),
)
@example(which=0, field="dtype", value="I32")  # loaded as int32, then a load_state_dict RuntimeError
@example(which=3, field="dtype", value="BF16")  # half the bytes: safetensors refuses the offsets (checkpoint_bytes)
# model.layers.0.mlp.experts.0.down_proj.weight renamed to an expert index of 5000 digits: int() refuses it with a
# ValueError that names no file
@example(which=4, field="__rename__", value="1" * 5000 + ".gate_proj.weight")
def test_safetensors_header(exported, tmp_path, which, field, value):
    folder = tmp_path / "copy"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(exported, folder)

    def change(header):
        keys = sorted(k for k in header if k != "__metadata__")
        key = keys[which % len(keys)]
        if field == "__entry__":
            header[key] = value
        elif field == "__metadata__":
            header["__metadata__"] = value
        elif field == "__rename__":  # the tensor's name replaced by another (a key may hold any text)
            header[key.rsplit(".", 3)[0] + "." + str(value) if "." in key else str(value)] = header.pop(key)
        else:
            header[key][field] = value

    rewrite_header(folder / "model.safetensors", change)
    for read in (load_hf, checkpoint_bytes):
        try:
            read(folder)
        except ValueError as err:
            one_line(err)
            assert str(folder) in str(err), err


def test_a_weight_stored_as_integers_names_file_and_tensor(exported, tmp_path):
    folder = shutil.copytree(exported, tmp_path / "copy")
    rewrite_header(folder / "model.safetensors", lambda h: h["lm_head.weight"].update(dtype="I32"))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor lm_head\.weight has dtype int32, expected a"):
        load_hf(folder)


@pytest.mark.parametrize("shard", [[1], "a" * 300, "a\0b", "", {"x": 1}])
def test_index_with_a_shard_name_that_is_no_file_name(exported, tmp_path, shard):
    folder = shutil.copytree(exported, tmp_path / "copy")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json") as caught:
        load_hf(folder)
    one_line(caught.value)
