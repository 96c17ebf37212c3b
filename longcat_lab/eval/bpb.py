"""Bits per byte: a model's held-out loss in units that do not depend on the tokenizer, so runs with different
vocabularies compare, next to three reference points computed on exactly the same bytes: the unigram baseline (a
model without context), and `gzip` and `lzma` (general-purpose compressors). The model's and the unigram's figures
are the trainer's (`train.evaluation.bits_per_byte`, whose docstring states the definition); this module adds the
compressors.
"""

from __future__ import annotations

import gzip
import lzma
from dataclasses import dataclass

from longcat_lab.data import eval_windows
from longcat_lab.train import evaluation
from longcat_lab.train.evaluation import LN2, bits, model_nats, token_byte_lengths, unigram_nats


def token_bytes(tokenizer, ids: list[int]) -> bytes:
    """The exact bytes a run of (non-special) token ids stands for, even where a token splits a UTF-8 character."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 characters that stand for bytes
    to_byte = _byte_decoder(alphabet)
    return bytes(to_byte[ch] for i in ids for ch in tokenizer.id_to_token(i) if ch in to_byte)


def _byte_decoder(alphabet) -> dict[str, int]:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to 256 + n in byte order.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    if set(chars) != set(alphabet):
        raise ValueError("the tokenizer's byte-level alphabet is not GPT-2's byte-to-unicode table")
    return chars


@dataclass
class BitsPerByte:
    """One domain's held-out measurement: the model, the unigram baseline and two compressors, on the same bytes."""

    tokens: int  # predicted tokens that stand for text
    bytes: int  # the bytes they stand for
    model: float  # bits per byte of the model
    unigram: float  # bits per byte of the add-one unigram model of the training stream
    gzip: float  # 8 * compressed size / size (level 9)
    lzma: float  # same, lzma preset 9

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def compressed_bits(data: bytes) -> tuple[float, float]:
    """(gzip, lzma) bits per byte of `data` at their strongest settings."""
    n = max(1, len(data))
    return 8 * len(gzip.compress(data, 9, mtime=0)) / n, 8 * len(lzma.compress(data, preset=9)) / n


def bits_per_byte(
    model, dataset, seq_len: int, windows: int = 16, batch_size: int = 8, compressors: bool = True
) -> dict[str, BitsPerByte]:
    """Per domain of `dataset.val`: the model's bits per byte on the fixed evaluation windows (`data.eval_windows`),
    with the unigram baseline and (if `compressors`) gzip and lzma of the same target bytes."""
    measured = evaluation.bits_per_byte(model, dataset, seq_len, windows, batch_size)
    byte_len = token_byte_lengths(dataset.tokenizer, model.config.vocab_size)
    out = {}
    for domain, m in measured.items():
        gz = lz = float("nan")
        if compressors:
            _, y = eval_windows(dataset.val[domain], seq_len, windows)
            keep = byte_len[y.flatten()] > 0
            gz, lz = compressed_bits(token_bytes(dataset.tokenizer, y.flatten()[keep].tolist()))
        out[domain] = BitsPerByte(**m, gzip=gz, lzma=lz)
    return out


__all__ = [
    "LN2",
    "BitsPerByte",
    "bits",
    "bits_per_byte",
    "compressed_bits",
    "model_nats",
    "token_byte_lengths",
    "token_bytes",
    "unigram_nats",
]
