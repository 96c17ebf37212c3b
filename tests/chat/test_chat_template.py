"""The chat format: `render` gives the documented LongCat strings, the exported tokenizer's Jinja template gives
exactly `render`'s string through transformers' `apply_chat_template` (with and without tools, on the same
conversations), malformed conversations are refused by both, and the markers are single special tokens.

Run: `bash tools/test.sh tests/chat/test_chat_template.py`.
"""

import inspect
import json

import pytest

from longcat_lab.chat import (
    END_OF_TURN,
    SPECIAL_TOKENS,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ChatFormatError,
    chat_template,
    parse_assistant,
    render,
)
from longcat_lab.data.tokenizer import train_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Paris"}},
            "required": ["city"],
        },
    },
}
CALC = {"name": "calculator", "description": "Evaluate arithmetic.", "parameters": {"type": "object"}}  # flat form


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Paris is..."}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "two rounds": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris and Köln, and 2+2?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [call("get_weather", city="Paris"), call("get_weather", city="Köln")],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"temp": 18}'},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "calculator", "arguments": {"e": "2+2"}}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "21 °C, 18 °C, and 4."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ],
}


def test_documented_strings():
    """The model card's examples, character for character (docs/design.md §5.1)."""
    assert render(CONVERSATIONS["one turn"]) == "[Round 0] USER:Paris is... ASSISTANT:"
    assert render(CONVERSATIONS["system"]) == "SYSTEM:Be brief. [Round 0] USER:Hi ASSISTANT:"
    assert render(CONVERSATIONS["two rounds"]) == (
        "SYSTEM:Be brief. [Round 0] USER:Hi ASSISTANT:Hello!</longcat_s> [Round 1] USER:Bye ASSISTANT:"
    )
    assert render(CONVERSATIONS["one turn"], add_generation_prompt=False) == "[Round 0] USER:Paris is..."


def test_tools_block_and_calls():
    text = render(CONVERSATIONS["tools"], tools=[WEATHER, CALC])
    head, messages = text.split("\n\n## Messages\n")
    assert head.startswith("## Tools\nYou have access to the following tools:\n\n### Tool namespace: function\n")
    assert "#### Tool name: get_weather\n\nDescription: Current weather in a city.\n\nInputSchema:\n{\n  " in head
    assert json.dumps(WEATHER["function"]["parameters"], indent=2) in head
    assert messages.startswith("[Round 0] USER:Weather in Paris and Köln, and 2+2? ASSISTANT:Checking.")
    assert (
        '<longcat_tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln"}}\n</longcat_tool_call>'
        "</longcat_s> [Round 1] USER:<longcat_tool_response>\n"
    ) in messages
    assert messages.endswith("[Round 3] USER:Thanks ASSISTANT:You're welcome.</longcat_s>")
    # A rendered reply parses back to the calls it came from.
    reply = messages.split(" ASSISTANT:")[1].split(END_OF_TURN)[0]
    parsed = parse_assistant(reply, tools=[WEATHER, CALC])
    assert parsed.ok and parsed.content == "Checking."
    assert [c["arguments"]["city"] for c in parsed.tool_calls] == ["Paris", "Köln"]


BAD = {
    "system later": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
    "two users": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    "assistant first": [{"role": "assistant", "content": "a"}],
    "unknown role": [{"role": "robot", "content": "a"}],
    "list content": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
    "string arguments": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]},
    ],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_render_refuses(case):
    with pytest.raises(ChatFormatError):
        render(BAD[case])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model exported with a tokenizer that has the markers."""
    from longcat_lab.export import save_hf
    from longcat_lab.testing import random_model

    tok = train_tokenizer(["To be, or not to be: that is the question. " * 20, "x = 1 + 2\n" * 20], 300)
    return save_hf(random_model(), tmp_path_factory.mktemp("chat") / "export", tokenizer=tok, eos_token=END_OF_TURN)


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(exported)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_transformers_template_matches_render(hf_tokenizer, name, with_tools, generation_prompt):
    tools = [WEATHER, CALC] if with_tools else None
    ours = render(CONVERSATIONS[name], tools=tools, add_generation_prompt=generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(
        CONVERSATIONS[name], tools=tools, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert theirs == ours


@pytest.mark.parametrize("case", sorted(BAD))
def test_transformers_template_refuses(hf_tokenizer, case):
    with pytest.raises(Exception, match="must|only|two user|before it"):
        hf_tokenizer.apply_chat_template(BAD[case], tokenize=False)


def test_exported_config_carries_the_template(exported):
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat_template()


def test_markers_are_single_special_tokens(hf_tokenizer):
    tok = train_tokenizer(["To be, or not to be " * 50], 300)
    text = render(CONVERSATIONS["tools"], tools=[WEATHER])
    ids = tok.encode(text).ids
    marker_ids = {tok.token_to_id(m) for m in SPECIAL_TOKENS}
    assert None not in marker_ids and len(marker_ids) == len(SPECIAL_TOKENS)
    assert sum(i in marker_ids for i in ids) == sum(text.count(m) for m in SPECIAL_TOKENS)
    assert tok.decode(ids, skip_special_tokens=False) == text
    # The same through transformers' tokenizer from the exported folder.
    hf_ids = hf_tokenizer(f"a{TOOL_CALL_OPEN}\n{{}}\n{TOOL_CALL_CLOSE}b")["input_ids"]
    assert hf_ids.count(hf_tokenizer.convert_tokens_to_ids(TOOL_CALL_OPEN)) == 1


def test_markers_take_the_last_ids_and_keep_the_merges():
    """BPE training is greedy: the tokenizer at vocab V holds the merges of the one at V - 5, in the same order and
    with the same ids, so adding the markers only drops the rarest merges (docs/design.md §5.1)."""
    texts = [inspect.getsource(json), inspect.getsource(pytest)]
    big = json.loads(train_tokenizer(texts, 400 + len(SPECIAL_TOKENS)).to_str())
    small = json.loads(train_tokenizer(texts, 400).to_str())
    assert len(small["model"]["merges"]) == 400 - len(SPECIAL_TOKENS) - 257  # bytes and <|endoftext|>
    assert big["model"]["merges"][: len(small["model"]["merges"])] == small["model"]["merges"]
    assert all(big["model"]["vocab"][k] == v for k, v in small["model"]["vocab"].items())
    ids = sorted(t["id"] for t in small["added_tokens"] if t["content"] in SPECIAL_TOKENS)
    assert ids == list(range(400 - len(SPECIAL_TOKENS), 400))
