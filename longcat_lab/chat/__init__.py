"""The LongCat-Flash chat format (docs/design.md §5.1): `render` OpenAI-style messages into the model's prompt string,
`chat_template()` for the exported tokenizer (the same string through transformers' `apply_chat_template`), and
`parse_assistant` for replies with `<longcat_tool_call>` blocks. The markers are `SPECIAL_TOKENS`."""

from longcat_lab.chat.parse import ParsedTurn, parse_assistant
from longcat_lab.chat.template import (
    END_OF_TURN,
    SPECIAL_TOKENS,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    ChatFormatError,
    chat_template,
    render,
    tool_call_block,
    tool_response_block,
    tools_block,
)

__all__ = [
    "END_OF_TURN",
    "SPECIAL_TOKENS",
    "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN",
    "TOOL_RESPONSE_CLOSE",
    "TOOL_RESPONSE_OPEN",
    "ChatFormatError",
    "ParsedTurn",
    "chat_template",
    "parse_assistant",
    "render",
    "tool_call_block",
    "tool_response_block",
    "tools_block",
]
