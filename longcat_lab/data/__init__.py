"""The built-in training data: three corpora (Shakespeare, the Python standard library, generated arithmetic), a
quality filter, a byte-level BPE tokenizer and a mixture sampler (docs/design.md §4). The pipeline's stages are
listed in `data.config`; token classes for the routing findings are in `data.tokenclass`."""

from longcat_lab.data.config import CACHE_VERSION, DOMAINS, EOT, DataConfig, Document, cache_root
from longcat_lab.data.corpora import (
    Corpora,
    corpora,
    python_documents,
    read_domain,
    shakespeare_documents,
    validation_texts,
)
from longcat_lab.data.filter import RULES, FilterRules, quality_filter
from longcat_lab.data.mixture import (
    Dataset,
    MixtureSampler,
    check_mixture,
    eval_windows,
    load_dataset,
    unigram_baseline,
)
from longcat_lab.data.reasoning import SplitMix64, check_solution, reasoning_documents, reasoning_problem
from longcat_lab.data.tokenizer import eot_id, load_tokenizer, train_tokenizer

__all__ = [
    "CACHE_VERSION",
    "DOMAINS",
    "EOT",
    "DataConfig",
    "Document",
    "cache_root",
    "Corpora",
    "corpora",
    "python_documents",
    "read_domain",
    "shakespeare_documents",
    "validation_texts",
    "RULES",
    "FilterRules",
    "quality_filter",
    "Dataset",
    "MixtureSampler",
    "check_mixture",
    "eval_windows",
    "load_dataset",
    "unigram_baseline",
    "SplitMix64",
    "check_solution",
    "reasoning_documents",
    "reasoning_problem",
    "eot_id",
    "load_tokenizer",
    "train_tokenizer",
]
