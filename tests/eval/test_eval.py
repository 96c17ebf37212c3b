"""Tests of `longcat_lab.eval`: bits per byte against a hand computation (a stub model and tokenizer whose numbers
are worked out below), the byte accounting of the real tokenizer, the task metrics and routing summary on a tiny
model, the published table, and `longcat-lab eval` on a trained tiny checkpoint."""

import gzip
import json
import math
import types

import pytest
import torch

from longcat_lab import CausalLMOutput
from longcat_lab.cli import main
from longcat_lab.data import DataConfig, Dataset, load_dataset
from longcat_lab.eval import (
    bits_per_byte,
    compressed_bits,
    evaluate_model,
    format_table,
    published_scores,
    routing_summary,
    token_byte_lengths,
)
from longcat_lab.eval.bpb import token_bytes
from longcat_lab.eval.tasks import _body, _ended, arithmetic, code, heldout_documents
from longcat_lab.testing import random_model

TINY_DATA = DataConfig(max_bytes_per_domain=300_000, tokenizer_sample_bytes=100_000)


class _Vocab:
    """A four-token tokenizer: "a" (1 byte), "bc" (2), the separator (0: not text), "de" (2)."""

    def get_vocab(self):
        return {"a": 0, "bc": 1, "<|endoftext|>": 2, "de": 3}


class _FixedModel(torch.nn.Module):
    """Predicts p = (1/2, 1/4, 1/8, 1/8) at every position, whatever the input."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=4)
        self.device = torch.device("cpu")
        self.logp = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()

    def forward(self, x):
        return CausalLMOutput(self.logp.expand(*x.shape, 4).clone())


def test_bits_per_byte_matches_a_hand_computation():
    # Window of 8 over stream [a bc SEP de a a bc de a]: targets bc SEP de a a bc de a. Text targets and their
    # bits under p: bc 2, de 3, a 1, a 1, bc 2, de 3, a 1 -> 13 bits; bytes 2+2+1+1+2+2+1 = 11. The separator is
    # left out of both. Unigram of the train stream [a a a bc] add-one: counts (4, 2, 1, 1)/8 = p again.
    val = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3, 0], dtype=torch.int32)
    train = torch.tensor([0, 0, 0, 1], dtype=torch.int32)
    ds = Dataset(_Vocab(), {"x": train}, {"x": val}, {}, "k")
    r = bits_per_byte(_FixedModel(), ds, seq_len=8, windows=1, compressors=False)["x"]
    assert (r.tokens, r.bytes) == (7, 11)
    assert r.model == pytest.approx(13 / 11, rel=1e-6)
    assert r.unigram == pytest.approx(13 / 11, rel=1e-12)
    assert math.isnan(r.gzip)


def test_compressed_bits_and_token_bytes_on_the_real_tokenizer():
    data = b"to be or not to be " * 50
    gz, lz = compressed_bits(data)
    assert gz == 8 * len(gzip.compress(data, 9, mtime=0)) / len(data) and 0 < lz < 8
    ds = load_dataset(512, TINY_DATA)
    lengths = token_byte_lengths(ds.tokenizer, 512)
    eot = ds.tokenizer.token_to_id("<|endoftext|>")
    assert lengths[eot] == 0
    ids = [i for i in ds.val["python"][:400].tolist() if i != eot]
    raw = token_bytes(ds.tokenizer, ids)
    assert raw == ds.tokenizer.decode(ids).encode() and len(raw) == int(lengths[ids].sum())


def test_bits_per_byte_of_a_model_against_its_own_cross_entropy(one_thread):
    ds = load_dataset(512, TINY_DATA)
    model = random_model(seed=4)
    got = bits_per_byte(model, ds, seq_len=32, windows=2)["reasoning"]
    from longcat_lab.data import eval_windows

    x, y = eval_windows(ds.val["reasoning"], 32, 2)
    lengths = token_byte_lengths(ds.tokenizer, 512)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="none")
    text = lengths[y.flatten()] > 0
    want = float(nll[text].sum()) / math.log(2) / int(lengths[y.flatten()].sum())
    assert got.model == pytest.approx(want, rel=1e-5)
    # An untrained model is worse than the unigram baseline of the same bytes.
    assert got.model > got.unigram


def test_task_metrics_and_routing_on_a_tiny_model(one_thread):
    ds = load_dataset(512, TINY_DATA)
    docs = heldout_documents(ds, "reasoning")
    assert docs and all(d.startswith("Problem: ") for d in docs)
    model = random_model(seed=2, bias_std=0.1)
    res = arithmetic(model, ds, n=2, transcripts=1, max_new_tokens=12)
    assert res.problems == 2 and res.exact == 0 and sum(v[1] for v in res.by_steps.values()) == 2
    assert res.transcripts[0]["reference"] == docs[0]
    c = code(model, ds, n=1, max_new_tokens=8)
    assert c["functions"] == 1 and 0 <= c["parse_rate"] <= 1
    r = routing_summary(model, ds, 32, windows=2)
    assert len(r["layers"]) == 2 and all(la["load_imbalance"] >= 1 for la in r["layers"])
    assert all(0 <= v <= model.config.moe_topk for v in r["by_class"].values())
    cheap = evaluate_model(model, ds, 32, "cheap", windows=2)
    assert set(cheap["bits_per_byte"]) == set(ds.val) and "arithmetic" not in cheap
    assert "bits per byte" in format_table(cheap)
    with pytest.raises(ValueError, match="level='fast' is not allowed"):
        evaluate_model(model, ds, 32, "fast")


def test_function_end_detection():
    # Generation starts at the end of the def line's text, so the body begins after the first newline.
    stop = _ended(4)
    assert not stop("\n        x = 1\n        y")
    assert stop("\n        x = 1\n    def g():\n")
    assert _body("  # note\n        return 1\n    def g():\n", 4) == "        return 1\n"


def test_published_tables():
    seed, official = published_scores("seed"), published_scores("official")
    assert len(seed["benchmarks"]) == 12 and len(seed["models"]) == 3
    assert len(official["benchmarks"]) == 14 and len(official["models"]) == 7
    assert all(len(row) == len(t["models"]) for t in (seed, official) for row in t["scores"])
    lc = official["models"].index("LongCat-Flash")
    assert official["scores"][official["benchmarks"].index("τ²-Bench telecom")][lc] == 73.68
    with pytest.raises(ValueError, match="table='x' is not allowed"):
        published_scores("x")
    from longcat_lab.viz import eval as viz_eval

    radar, bars = viz_eval.published_radar("seed"), viz_eval.published_bars("official")
    assert len(radar.data) == 3 and len(bars.data) == 7
    assert all("not measured here" in f.layout.title.text for f in (radar, bars))


@pytest.mark.slow
def test_eval_command_writes_eval_json(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--steps", "2", "--set", "eval_windows=2", "--no-progress", "--samples", "0"]
    assert main(["train", "--out", str(run), *args, "--eval", "none"]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run), "--arithmetic", "1", "--code", "1"]) == 0
    out = capsys.readouterr().out
    assert "bits per byte" in out and "arithmetic exact match" in out
    (path,) = run.glob("checkpoints/*/eval.json")
    saved = json.loads(path.read_text())
    assert saved["step"] == 2 and saved["arithmetic"]["problems"] == 1
    assert main(["eval", "--ckpt", str(tmp_path / "nothing")]) == 2
