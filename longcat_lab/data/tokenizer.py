"""The byte-level BPE tokenizer (stage 4 of the pipeline, docs/design.md §4): trained with `tokenizers` on a bounded
sample of the training split and cached on disk under a key of its inputs.

Besides <|endoftext|> it holds the chat markers (`chat.SPECIAL_TOKENS`, docs/design.md §5.1) as single special
tokens, at the last ids of the vocabulary. BPE training is greedy, so training `len(markers)` fewer merges gives a
prefix of the merges a full-size training would learn: every other token keeps its id, only the rarest merges give
way to the markers."""

from __future__ import annotations

import hashlib
from pathlib import Path

from longcat_lab._util import atomic_write_bytes, check_int
from longcat_lab.chat.template import SPECIAL_TOKENS
from longcat_lab.data.config import CACHE_VERSION, EOT, DataConfig, cache_root, digest
from longcat_lab.data.corpora import Corpora, corpora


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
    pre-tokenisation, so every string encodes (no unknown token) and decoding round-trips exactly. The chat markers
    take the last `len(SPECIAL_TOKENS)` ids; the text inside a chat string is split around them before BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_int("vocab_size", vocab_size, 258 + len(SPECIAL_TOKENS))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _tokenizer_key(texts: list[str], vocab_size: int) -> str:
    import tokenizers

    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha1(t.encode()).digest())
    # The special-token list is part of the key: a tokenizer cached with other markers is never reused.
    specials = [EOT, *SPECIAL_TOKENS]
    return digest(CACHE_VERSION, "bpe", vocab_size, specials, tokenizers.__version__, h.hexdigest())[:20]


def read_tokenizer(path: str | Path, vocab_size: int | None = None):
    """The tokenizer in a tokenizer.json file, or a one-line ValueError naming the file: not UTF-8, not a tokenizer
    that `tokenizers` reads, one without <|endoftext|> and the chat markers, or (given `vocab_size`) one with a token
    id the model's vocabulary does not have."""
    from tokenizers import Tokenizer

    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    try:
        tok = Tokenizer.from_str(text)
        tok.encode(f"{EOT} a 1")  # some damage surfaces only when text is encoded
    except BaseException as err:
        # tokenizers raises a bare Exception naming the line and column, and on some inputs a Rust panic, which
        # reaches Python as pyo3's PanicException (a BaseException, so that `except Exception` would miss it).
        if not isinstance(err, Exception) and type(err).__name__ != "PanicException":
            raise
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path} is not a tokenizer that the tokenizers library reads ({first[:200]})") from None
    missing = [t for t in (EOT, *SPECIAL_TOKENS) if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{path}: the tokenizer lacks the special token(s) {missing}")
    largest = max(tok.get_vocab().values(), default=-1)
    if vocab_size is not None and largest >= vocab_size:
        raise ValueError(f"{path}: the tokenizer has token id {largest}, past the model's vocab_size={vocab_size}")
    return tok


def load_tokenizer(vocab_size: int = 4096, config: DataConfig | None = None, corpora_: Corpora | None = None):
    """The BPE tokenizer for `vocab_size` trained on this data config's sample: loaded from the cache when one with
    the same key exists (key = vocabulary size, special tokens, tokenizers version, the sample's hash), else
    trained and cached."""
    config = config or DataConfig()
    c = corpora_ or corpora(config)
    texts = tokenizer_sample(c, config.tokenizer_sample_bytes)
    path = cache_root(config) / "tokenizers" / f"bpe-{vocab_size}-{_tokenizer_key(texts, vocab_size)}.json"
    if path.is_file():
        try:
            return read_tokenizer(path, vocab_size)
        except (ValueError, OSError):  # a damaged cache entry is rebuilt, not trusted
            path.unlink(missing_ok=True)
    tok = train_tokenizer(texts, vocab_size)
    atomic_write_bytes(path, tok.to_str().encode())
    return tok


def eot_id(tokenizer) -> int:
    return tokenizer.token_to_id(EOT)
