"""Published benchmark scores of the released 560B LongCat-Flash-Chat beside other large models, kept as data
(`published_scores.json`, its sources named inside). These are the authors' numbers for the full-size model, not
measured here; the lab's models are millions of parameters and are measured by the rest of this package."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from longcat_lab._util import check_choice

PUBLISHED_FILE = Path(__file__).with_name("published_scores.json")
TABLES = ("seed", "official")


@cache
def _load() -> dict:
    return json.loads(PUBLISHED_FILE.read_text(encoding="utf-8"))


def published_scores(table: str = "official") -> dict:
    """{"models": [...], "benchmarks": [...], "scores": [[per model] per benchmark], ...} of one published table:
    "seed" (3 models, 12 benchmarks) or "official" (7 models, 14 benchmarks)."""
    check_choice("table", table, TABLES)
    t = _load()["tables"][table]
    return {**t, "scores": [list(row) for row in t["scores"]]}


def published_note() -> dict:
    """The file's caveat and sources."""
    d = _load()
    return {"note": d["note"], "source": dict(d["source"])}


__all__ = ["PUBLISHED_FILE", "TABLES", "published_note", "published_scores"]
