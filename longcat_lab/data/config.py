"""What the data pipeline is made of: the domains, `DataConfig` (which data the trainer sees), the `Document`
record every stage passes on, and where and under which keys tokenizers and token streams are cached.

The pipeline itself, stage by stage (each deterministic, so two machines with the same wheel and Python build the
same data; docs/design.md §4, "Data"):
1. `corpora.read_domain` reads each domain, capped at `DataConfig.max_bytes_per_domain`;
2. `filter.quality_filter` removes exact duplicates, then applies rules per domain;
3. `corpora.corpora` splits each domain into train and validation by a hash of each document's name;
4. `tokenizer.load_tokenizer` trains (or loads from the cache) a byte-level BPE tokenizer;
5. `mixture.load_dataset` packs each split into one token stream per domain, cached on disk;
6. `mixture.MixtureSampler` draws fixed-length windows with per-domain ratios that the trainer changes per stage.
Cache folder: `DataConfig.cache_dir`, else $LONGCAT_LAB_CACHE, else ~/.cache/longcat_lab.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_lab._util import check_int, from_known_fields, is_number

DOMAINS = ("shakespeare", "python", "reasoning")
EOT = "<|endoftext|>"
# Bump when anything that shapes the cached tokenizer or token streams changes, so old caches are not reused.
CACHE_VERSION = 1


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
        check_int("max_bytes_per_domain", self.max_bytes_per_domain, 10_000)
        check_int("tokenizer_sample_bytes", self.tokenizer_sample_bytes, 10_000)
        check_int("data_seed", self.data_seed, 0)
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
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        """Build from a dict, refusing unknown keys (`config.from_known_fields`)."""
        return from_known_fields(cls, data)


def cache_root(config: DataConfig | None = None) -> Path:
    """The folder that holds cached tokenizers and token streams."""
    if config is not None and config.cache_dir:
        return Path(config.cache_dir).expanduser()
    return Path(os.environ.get("LONGCAT_LAB_CACHE") or Path.home() / ".cache" / "longcat_lab")


def digest(*parts: Any) -> str:
    """A SHA-256 hex digest of `parts` (bytes as they are, anything else as sorted JSON): the key under
    which tokenizers and token streams are cached, so existing caches stay valid only while it hashes the same."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def name_hash(name: str) -> int:
    """A stable pseudo-random order key (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big")


# Documents -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    """One unit of training text; every stage of the pipeline passes these on."""

    name: str  # stable identifier: wheel path + scene, stdlib relative path, or reasoning problem number
    text: str
