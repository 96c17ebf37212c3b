"""The LongCat-Flash chat format (docs/design.md §5.1): `render` OpenAI-style messages into the model's prompt string,
`chat_template()` for the exported tokenizer (the same string through transformers' `apply_chat_template`), and
`parse_assistant` for replies with `<longcat_tool_call>` blocks, and `encode_chat` for the ids of a rendered
conversation, in which only the template's markers (`SPECIAL_TOKENS`) are special tokens."""

from longcat_lab.chat.parse import ParsedTurn, parse_assistant
from longcat_lab.chat.template import (
    END_OF_TURN,
    SPECIAL_TOKENS,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    ChatFormatError,
    ChatText,
    chat_template,
    render,
    tool_call_block,
    tool_response_block,
    tools_block,
)
from longcat_lab.chat.tokens import ChatIds, encode_chat

__all__ = [
    "END_OF_TURN",
    "SPECIAL_TOKENS",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "TOOL_RESPONSE_CLOSE",
    "TOOL_RESPONSE_OPEN",
    "ChatFormatError",
    "ChatIds",
    "ChatText",
    "ParsedTurn",
    "chat_template",
    "encode_chat",
    "parse_assistant",
    "render",
    "tool_call_block",
    "tool_response_block",
    "tools_block",
]
