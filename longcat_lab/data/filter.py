"""The quality filter (stage 2 of the pipeline, docs/design.md §4): exact duplicates go first, then heuristic rules
per domain (length bounds, symbol and digit ratios, repeated lines, and for reasoning a verified answer), with
counts of what each rule removed."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from longcat_lab.data.config import DOMAINS, Document
from longcat_lab.data.reasoning import check_solution


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
    "shakespeare": FilterRules(
        min_chars=300, max_chars=200_000, max_symbol_ratio=0.12, max_repeated_lines=0.3, max_digit_ratio=0.05
    ),
    "python": FilterRules(
        min_chars=300, max_chars=150_000, max_symbol_ratio=0.25, max_repeated_lines=0.35, max_digit_ratio=0.1
    ),
    "reasoning": FilterRules(
        min_chars=40,
        max_chars=2_000,
        max_symbol_ratio=0.25,
        max_repeated_lines=0.5,
        max_digit_ratio=0.5,
        check_answer=True,
    ),
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


def quality_filter(
    domain: str, docs: Iterable[Document], max_bytes: int | None = None
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
    report = {
        "documents_before": n_before,
        "bytes_before": bytes_before,
        "removed": dict(sorted(removed.items())),
        "documents_after": len(kept),
        "bytes_after": bytes_after,
    }
    return kept, report
