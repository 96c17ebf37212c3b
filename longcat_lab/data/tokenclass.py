"""Token classes for the routing findings of the paper's Appendix A.1 (docs/design.md §1.4).

The paper reports that layer-1 routing gives function words, digits and punctuation fewer FFN experts. To test that
on our model we sort every token into one of five classes, from its text alone:

- ``whitespace``: nothing but spaces, tabs and newlines (code indentation lands here);
- ``digits``: no letters and at least one digit (``"42"``, ``" 3."``);
- ``punctuation``: no letters and no digits (``","``, ``"):"``, ``"=="``, symbols and the replacement character);
- ``code keyword``: a Python keyword (``keyword.kwlist``), counted only for code, because in prose "and", "in", "if",
  "for", "is", "not" are ordinary English function words;
- ``word``: everything else that holds a letter, in any script (``" the"``, ``"é"``, ``"中文"``, ``"(self"``).
"""

from __future__ import annotations

import keyword
import unicodedata

WHITESPACE, DIGITS, PUNCTUATION, KEYWORD, WORD = "whitespace", "digits", "punctuation", "code keyword", "word"
TOKEN_CLASSES = (WHITESPACE, PUNCTUATION, DIGITS, KEYWORD, WORD)
CODE_KEYWORDS = frozenset(keyword.kwlist)


def token_class(token: str, code: bool = False) -> str:
    """The class of one token's text; `code=True` when the token comes from source code (enables keywords)."""
    if not isinstance(token, str):
        raise ValueError(f"token={token!r} is not allowed: it must be a str (the token's decoded text)")
    text = token.strip()
    if not text:
        return WHITESPACE
    # unicodedata rather than str.isalpha/isdigit so that letters and digits of every script count alike.
    categories = [unicodedata.category(ch) for ch in text]
    has_letter = any(cat.startswith("L") for cat in categories)
    if not has_letter:
        return DIGITS if any(cat.startswith("N") for cat in categories) else PUNCTUATION
    if code and text in CODE_KEYWORDS:
        return KEYWORD
    return WORD


def token_classes(tokens: list[str], code: bool = False) -> list[str]:
    """`token_class` for every token of a sequence."""
    return [token_class(t, code) for t in tokens]


__all__ = [
    "TOKEN_CLASSES",
    "CODE_KEYWORDS",
    "token_class",
    "token_classes",
    "WHITESPACE",
    "DIGITS",
    "PUNCTUATION",
    "KEYWORD",
    "WORD",
]
