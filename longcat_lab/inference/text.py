"""Streamed decoding as text (docs/design.md §7.2, §5.5), shared by the server and the agents' replies.

`token_stream` yields the new tokens of plain decoding (`generate.stream`) or of MTP-drafted speculative decoding.
`TextStream` reads such a stream as text: it ends at a stop id (or where an `ends` rule says), and gives the text
decoded so far after each token, except while the last character is still missing bytes: one UTF-8 character can
be split over several byte-level tokens, and half a character decodes to U+FFFD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from longcat_lab.chat.template import END_OF_TURN
from longcat_lab.data.tokenizer import eot_id
from longcat_lab.inference.generate import stream
from longcat_lab.inference.speculative import speculative_stream

# What a partly decoded UTF-8 character decodes to.
REPLACEMENT = "\ufffd"


def reply_stop_ids(tokenizer) -> set[int]:
    """The ids that end an assistant reply: the chat template's end of turn and the document separator."""
    return {i for i in (tokenizer.token_to_id(END_OF_TURN), eot_id(tokenizer)) if i is not None}


def token_stream(
    model, idx: torch.Tensor, max_new_tokens: int, *, speculative: bool = False, **options
) -> Iterator[torch.Tensor]:
    """Each new token ([B, 1]) after `idx`: `generate.stream`, or `speculative.speculative_stream` (the model's MTP
    module drafts, batch 1). `options`: temperature, top_p, generator, and `constraints` (plain decoding only)."""
    if speculative and options.get("constraints") is not None:
        raise ValueError("constraints are not allowed with speculative=True: drafted tokens are not masked")
    if speculative:
        return speculative_stream(model, idx, max_new_tokens, **options)
    return stream(model, idx, max_new_tokens, **options)


class TextStream:
    """The text of a stream of tokens ([1, 1] tensors) as it grows.

    Iterating yields once per kept token: the text of all kept ids so far, or None while its last character is
    incomplete. A token in `stop_ids`, or one for which `ends(kept_ids, token)` is true, ends the stream and is not
    kept (`stopped` then says so). `ids` holds the kept ids, `text` their whole text."""

    def __init__(
        self,
        tokenizer,
        tokens: Iterable[torch.Tensor],
        stop_ids: Iterable[int] = (),
        ends: Callable[[list[int], int], bool] | None = None,
    ):
        self.tokenizer, self.tokens = tokenizer, tokens
        self.stop_ids, self.ends = set(stop_ids), ends
        self.ids: list[int] = []
        self.stopped = False

    def __iter__(self) -> Iterator[str | None]:
        try:
            for token in self.tokens:
                t = int(token[0, 0])
                if t in self.stop_ids or (self.ends is not None and self.ends(self.ids, t)):
                    self.stopped = True
                    return
                self.ids.append(t)
                text = self.text
                yield None if text.endswith(REPLACEMENT) else text
        finally:
            self.close()

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=False)

    def close(self) -> None:
        """Stop the token stream (its generator restores the model's mode); safe to call twice."""
        close = getattr(self.tokens, "close", None)
        if close is not None:
            close()

    def follow(self, on_text: Callable[[str], None] | None = None) -> str:
        """Run to the end, handing each new piece of complete text to `on_text`; return the whole text (whose last
        piece `on_text` gets even when it ends inside a character)."""
        shown = ""
        for text in self:
            if text is not None and on_text is not None:
                on_text(text[len(shown) :])
                shown = text
        text = self.text
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown) :])
        return text


__all__ = ["REPLACEMENT", "TextStream", "reply_stop_ids", "token_stream"]
