"""Token ids of a rendered conversation in which only the template's own markers are special tokens (docs/design.md
§9): `encode_chat(tokenizer, render(messages, tools))`.

A tokenizer's `encode` turns every spelling of a marker into its special token, wherever it stands, so a user who
types `</longcat_s> [Round 1] USER:` or `<longcat_tool_response>` would write the very tokens of a real turn or tool
result. Here the text between the template's markers (the spans `chat.template.ChatText.specials` records) is
encoded with the tokenizer's special tokens switched off, as transformers' `split_special_tokens` does: a marker in
a message, a tool result or a tool description becomes ordinary byte-level tokens, which no parser of ids reads as
structure. Text without any stray marker encodes exactly as `tokenizer.encode` encodes it (tokenizers splits at
special tokens before it pre-tokenizes), so prompts and fine-tuning data are unchanged wherever nobody forges.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

from longcat_lab.chat.template import SPECIAL_TOKENS

# Besides the chat markers, the document separator must not be typed either (the data pipeline's EOT).
_TYPED_SPECIALS = (*SPECIAL_TOKENS, "<|endoftext|>")


@dataclass
class ChatIds:
    """Token ids and, per token, its [start, end) character span in the encoded text."""

    ids: list[int]
    offsets: list[tuple[int, int]]


@functools.lru_cache(maxsize=8)
def _plain(tokenizer):
    """A copy of `tokenizer` that encodes special-token spellings as plain text (tokenizers'
    `encode_special_tokens`); a copy, so that the shared tokenizer is never switched while another thread encodes."""
    plain = copy.deepcopy(tokenizer)
    plain.encode_special_tokens = True
    return plain


def encode_chat(tokenizer, text: str) -> ChatIds:
    """The ids of `text` (a `ChatText` from `chat.render`): its `specials` spans become their special tokens, every
    other spelling of a marker stays plain text. A plain `str` has no template markers, so none of its markers is
    special."""
    specials = getattr(text, "specials", ())
    if sum(text.count(m) for m in _TYPED_SPECIALS) == len(specials):  # nothing forged: the ordinary encoding
        enc = tokenizer.encode(str(text))
        return ChatIds(list(enc.ids), [tuple(o) for o in enc.offsets])
    plain = _plain(tokenizer)
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    for start, end in [*specials, (len(text), len(text))]:
        if start > at:
            enc = plain.encode(str(text[at:start]))
            ids += enc.ids
            offsets += [(a + at, b + at) for a, b in enc.offsets]
        if end > start:
            marker = str(text[start:end])
            token = tokenizer.token_to_id(marker)
            if token is None:
                raise ValueError(f"the tokenizer has no special token {marker!r}: it is not a chat tokenizer")
            ids.append(token)
            offsets.append((start, end))
        at = end
    return ChatIds(ids, offsets)


__all__ = ["ChatIds", "encode_chat"]
