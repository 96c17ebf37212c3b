"""Quick looks at a model during and after training: `evaluate` (validation loss per domain on fixed windows),
`bits_per_byte` (the same windows in bits per byte, next to the unigram baseline) and `sample_text` (a seeded
continuation of a prompt). Quick looks for the training loop and the CLI; the evaluation suite (`longcat_lab.eval`)
builds on them.

bits/byte = (sum over predicted tokens of -log2 p(token)) / (UTF-8 bytes those tokens stand for). The byte-level
BPE maps every byte to one character of its alphabet, so a token's byte count is the length of its vocabulary
string; special tokens (the document separator) stand for no text and are left out of both sums.
"""

from __future__ import annotations

import math

import torch

from longcat_lab.data import EOT, Dataset, eval_windows
from longcat_lab.inference.generate import generate
from longcat_lab.model.model import LongCatLM

LN2 = math.log(2.0)


@torch.no_grad()
def evaluate(
    model: LongCatLM, dataset: Dataset, seq_len: int, windows: int = 16, batch_size: int = 8, bf16: bool = False
) -> dict[str, float]:
    """Mean validation cross-entropy (nats/token) per domain on fixed windows (`data.eval_windows`). Runs in eval
    mode, so the routers count nothing; the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    device = model.device
    out = {}
    try:
        for domain, stream in dataset.val.items():
            x, y = eval_windows(stream, seq_len, windows)
            total, count = 0.0, 0
            for i in range(0, x.shape[0], batch_size):
                xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = model(xb, targets=yb).loss
                total += float(loss) * yb.numel()
                count += yb.numel()
            out[domain] = total / count
    finally:
        model.train(was_training)
    return out


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """[vocab_size] int64: the UTF-8 bytes each token id stands for; 0 for special tokens and unused ids."""
    out = torch.zeros(vocab_size, dtype=torch.long)
    special = {EOT}
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size and token not in special:
            out[i] = len(token)  # byte-level alphabet: one character per byte
    return out


def bits(nats: float, n_bytes: int) -> float:
    """Total loss in nats over `n_bytes` bytes -> bits per byte."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes} is not allowed: it must be > 0")
    return nats / LN2 / n_bytes


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


def bits_per_byte(model, dataset, seq_len: int, windows: int = 16, batch_size: int = 8) -> dict[str, dict]:
    """Per domain of `dataset.val`, on the fixed evaluation windows (`data.eval_windows`): {"tokens": predicted
    tokens that stand for text, "bytes": the bytes they stand for, "model": the model's bits per byte, "unigram":
    the add-one unigram model's of the training stream}."""
    vocab = model.config.vocab_size
    byte_len = token_byte_lengths(dataset.tokenizer, vocab)
    out = {}
    for domain, stream in dataset.val.items():
        x, y = eval_windows(stream, seq_len, windows)
        n_bytes = int(byte_len[y.flatten()].sum())
        nats = model_nats(model, x, y, byte_len, batch_size)
        uni = unigram_nats(dataset.train[domain], y, byte_len, vocab)
        tokens = int((byte_len[y.flatten()] > 0).sum())
        out[domain] = {"tokens": tokens, "bytes": n_bytes, "model": bits(nats, n_bytes), "unigram": bits(uni, n_bytes)}
    return out


def sample_text(
    model: LongCatLM,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 80,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Prompt + continuation as text (top-p sampling with a seeded generator; greedy at temperature 0)."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt={prompt!r} is not allowed: it must be a non-empty string")
    ids = tokenizer.encode(prompt).ids
    limit = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise ValueError(
            f"the prompt is {len(ids)} tokens and max_new_tokens={max_new_tokens}: together more than the "
            f"model's max_position_embeddings={limit}; shorten the prompt or ask for at most {max(0, limit - len(ids))}"
            " new tokens"
        )
    idx = torch.tensor([ids], dtype=torch.long, device=model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_p=top_p, generator=gen)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)


__all__ = [
    "LN2",
    "bits",
    "bits_per_byte",
    "evaluate",
    "model_nats",
    "sample_text",
    "token_byte_lengths",
    "unigram_nats",
]
