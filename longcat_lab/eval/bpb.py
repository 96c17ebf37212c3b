"""Bits per byte: a model's held-out loss in units that do not depend on the tokenizer, so runs with different
vocabularies compare, next to three reference points computed on exactly the same bytes: the unigram baseline (a
model without context), and `gzip` and `lzma` (general-purpose compressors).

bits/byte = (sum over predicted tokens of -log2 p(token)) / (UTF-8 bytes those tokens stand for). The byte-level
BPE maps every byte to one character of its alphabet, so a token's byte count is the length of its vocabulary
string; special tokens (the document separator) stand for no text and are left out of both sums.
"""

from __future__ import annotations

import gzip
import lzma
import math
from dataclasses import dataclass

import torch

from longcat_lab.data import EOT, eval_windows

LN2 = math.log(2.0)


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab_size] int64: the UTF-8 bytes each token id stands for; 0 for special tokens and unused ids."""
    out = torch.zeros(vocab_size, dtype=torch.long)
    special = {EOT}
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size and token not in special:
            out[i] = len(token)  # byte-level alphabet: one character per byte
    return out


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


def bits(nats: float, n_bytes: int) -> float:
    """Total loss in nats over `n_bytes` bytes -> bits per byte."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes} is not allowed: it must be > 0")
    return nats / LN2 / n_bytes


def compressed_bits(data: bytes) -> tuple[float, float]:
    """(gzip, lzma) bits per byte of `data` at their strongest settings."""
    n = max(1, len(data))
    return 8 * len(gzip.compress(data, 9, mtime=0)) / n, 8 * len(lzma.compress(data, preset=9)) / n


@torch.no_grad()
def model_nats(model, x: torch.Tensor, y: torch.Tensor, byte_len: torch.Tensor, batch_size: int = 8) -> float:
    """Summed -ln p(y) over the targets that stand for text (byte_len[y] > 0), in eval mode (routers count
    nothing); the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size].to(model.device), y[i : i + batch_size].to(model.device)
            logits = model(xb).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none")
            total += float((nll * (byte_len.to(nll.device)[yb.flatten()] > 0)).sum())
    finally:
        model.train(was_training)
    return total


def unigram_nats(train: torch.Tensor, y: torch.Tensor, byte_len: torch.Tensor, vocab_size: int) -> float:
    """Summed -ln p(y) under the add-one unigram distribution of `train`, over the same targets as `model_nats`."""
    counts = torch.bincount(train.long(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    flat = y.flatten().long()
    return float(-(logp[flat] * (byte_len[flat] > 0)).sum())


def bits_per_byte(
    model, dataset, seq_len: int, windows: int = 16, batch_size: int = 8, compressors: bool = True
) -> dict[str, BitsPerByte]:
    """Per domain of `dataset.val`: the model's bits per byte on the fixed evaluation windows (`data.eval_windows`),
    with the unigram baseline and (if `compressors`) gzip and lzma of the same target bytes."""
    vocab = model.config.vocab_size
    byte_len = token_byte_lengths(dataset.tokenizer, vocab)
    out = {}
    for domain, stream in dataset.val.items():
        x, y = eval_windows(stream, seq_len, windows)
        keep = byte_len[y.flatten()] > 0
        n_bytes = int(byte_len[y.flatten()].sum())
        nats = model_nats(model, x, y, byte_len, batch_size)
        uni = unigram_nats(dataset.train[domain], y, byte_len, vocab)
        gz = lz = float("nan")
        if compressors:
            gz, lz = compressed_bits(token_bytes(dataset.tokenizer, y.flatten()[keep].tolist()))
        out[domain] = BitsPerByte(int(keep.sum()), n_bytes, bits(nats, n_bytes), bits(uni, n_bytes), gz, lz)
    return out


__all__ = [
    "BitsPerByte",
    "bits",
    "bits_per_byte",
    "compressed_bits",
    "model_nats",
    "token_byte_lengths",
    "token_bytes",
    "unigram_nats",
]
