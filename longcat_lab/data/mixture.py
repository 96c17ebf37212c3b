"""Token streams and the mixture sampler (stages 5-6 of the pipeline, docs/design.md §4): each split packed into one
token stream per domain (documents joined by `<|endoftext|>`) and cached on disk; `MixtureSampler` draws
fixed-length windows with the per-domain ratios that the trainer changes per stage (the paper's stage 2 raises
STEM + code to 70%); fixed evaluation windows and the unigram baseline a trained model must beat."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from longcat_lab._util import atomic_write_bytes, is_number
from longcat_lab.data.config import CACHE_VERSION, DOMAINS, DataConfig, Document, cache_root, digest
from longcat_lab.data.corpora import corpora
from longcat_lab.data.tokenizer import eot_id, load_tokenizer


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
        return {
            d: {"train_tokens": int(self.train[d].numel()), "val_tokens": int(self.val[d].numel())} for d in self.train
        }


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
    key = digest(CACHE_VERSION, "streams", c.digest(), tok.to_str())[:20]
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
                raise ValueError(
                    f"seq_len={seq_len} is not allowed: domain {d!r} has only {self.streams[d].numel()} training tokens"
                )
        probs = torch.tensor([weights[d] for d in self.domains], dtype=torch.float64)
        picks = torch.multinomial(probs, batch_size, replacement=True, generator=self.generator).tolist()
        rows = []
        for i in picks:
            d = self.domains[i]
            stream = self.streams[d]
            start = int(torch.randint(0, stream.numel() - seq_len, (1,), generator=self.generator))
            rows.append(stream[start : start + seq_len + 1])
            self.rows_drawn[d] += 1
        window = torch.stack(rows).long()
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "rows_drawn": dict(self.rows_drawn)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state.get("rows_drawn", {})) != set(self.domains):
            raise ValueError(
                f"sampler state covers domains {sorted(state.get('rows_drawn', {}))}, this data has "
                f"{sorted(self.domains)}"
            )
        for d, n in state["rows_drawn"].items():
            if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
                raise ValueError(f"sampler state rows_drawn[{d!r}]={n!r} is not allowed: it must be an integer >= 0")
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
    window = torch.stack([stream[s : s + seq_len + 1] for s in starts]).long()
    return window[:, :-1], window[:, 1:]


def unigram_baseline(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `val` under the unigram distribution of `train` (add-one smoothed): the loss of
    a model that ignores context, the floor a trained model must beat."""
    counts = torch.bincount(train.long(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val.long()].mean())
