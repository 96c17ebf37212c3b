"""Tests of the token classes of the routing findings (longcat_lab.data.tokenclass; docs/design.md §1.4).

Run: `bash tools/test.sh tests/data/test_tokenclass.py`
"""

import pytest

from longcat_lab.data.tokenclass import TOKEN_CLASSES, token_class, token_classes


def test_token_classes():
    assert token_class(" ") == token_class("\n\t") == "whitespace"
    assert token_class(",") == token_class("):") == token_class(" ==") == token_class("_") == "punctuation"
    assert token_class("42") == token_class(" 3.") == token_class("٣") == "digits"
    assert token_class(" the") == token_class("é") == token_class("中文") == token_class("(self") == "word"
    assert token_class(" def", code=True) == token_class("in", code=True) == "code keyword"
    assert token_class(" and") == "word"  # in prose a keyword is a function word, not code
    assert token_classes(["a", "1", " "]) == ["word", "digits", "whitespace"]
    assert set(TOKEN_CLASSES) == {"whitespace", "punctuation", "digits", "code keyword", "word"}
    with pytest.raises(ValueError, match="token=3"):
        token_class(3)
