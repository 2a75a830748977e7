"""Data in the 3.1 chat format: records the format cannot write (TRL `tools`, tool calls, tool turns) are
`file:line` errors, the DPO formatting mask covers the 3.1 system turn, and `model.chat_template` is a
checked config key."""

import json

import pytest

from llama_posttrain.data.loader import load_examples
from llama_posttrain.data.rows import encode_response
from llama_posttrain.data.schema import ValidationError
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer
from llama_posttrain.train.config import parse_args
from llama_posttrain.train.sft import SFTConfig


@pytest.fixture(scope="module")
def chat31(llama3_tokenizer_dir):
    return ChatFormat(load_tokenizer(llama3_tokenizer_dir / "tokenizer.model"), "llama3.1")


def write(tmp_path, records) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


OK = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
TOOL_TURNS = {
    "messages": [
        {"role": "user", "content": "6*7?"},
        {"role": "assistant", "content": "calc(6*7)"},
        {"role": "ipython", "content": "42"},
        {"role": "assistant", "content": "42."},
    ]
}


def test_tool_records_are_errors(tmp_path, chat31):
    tools = {**OK, "tools": [{"type": "function", "function": {"name": "calc", "parameters": {}}}]}
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "calc", "arguments": {}}}]}
    cases = [
        (tools, "sft", r"data\.jsonl:2: tools: tool definitions are not supported"),
        ({"messages": [OK["messages"][0], call]}, "sft", r"data\.jsonl:2: messages\[1\]\.tool_calls: tool calls"),
        (TOOL_TURNS, "sft", r"data\.jsonl:2: messages: message 2: tool calls and tool results \('ipython' turn\)"),
        (
            {"prompt": "6*7?", "chosen": TOOL_TURNS["messages"][1:], "rejected": "41"},
            "dpo",
            r"data\.jsonl:2: responses\[0\]: message 1: tool calls",
        ),
    ]
    for record, kind, message in cases:
        first = OK if kind == "sft" else {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}
        with pytest.raises(ValidationError, match=message):
            load_examples(write(tmp_path, [first, record]), kind, chat31, max_len=256, verbose=False)
    # the Llama 3.0 format writes ipython turns; with skip_invalid the 3.1 format counts the record
    load_examples(write(tmp_path, [TOOL_TURNS]), "sft", ChatFormat(chat31.tokenizer), max_len=256, verbose=False)
    examples, report = load_examples(
        write(tmp_path, [OK, TOOL_TURNS]), "sft", chat31, max_len=256, skip_invalid=True, verbose=False
    )
    assert len(examples) == 1 and report["skipped invalid: messages"] == 1
    assert load_examples(write(tmp_path, [{**OK, "tools": None}]), "sft", chat31, max_len=256, verbose=False)[0]


def test_dpo_rows_mask_the_31_system_turn(tmp_path, chat31):
    """The prompt of a 3.1 DPO pair opens with the date system turn; the responses are as in 3.0."""
    path = write(tmp_path, [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}])
    (example,), _ = load_examples(path, "dpo", chat31, max_len=256, verbose=False)
    prompt = chat31.encode_dialog([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert example.tokens[: len(prompt)] == prompt.tokens
    tok = chat31.tokenizer
    assert tok.decode(prompt.tokens).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
    )
    fmt = [t for t, f in zip(prompt.tokens, prompt.is_format) if f]
    assert tok.decode(fmt).startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date")
    chosen = encode_response(chat31, [{"role": "assistant", "content": "Hello."}])
    assert [t.token for t in example.targets if t.seq == 0] == chosen.tokens
    assert [t.is_format for t in example.targets if t.seq == 0] == chosen.is_format == [False, False, True]


def test_chat_template_config_key(tmp_path):
    cfg = parse_args(SFTConfig, ["model.preset=tiny", "model.chat_template=llama3.2"])
    assert cfg.model.chat_template == "llama3.2"
    assert parse_args(SFTConfig, ["model.preset=tiny"]).model.chat_template is None
    with pytest.raises((ValueError, SystemExit), match=r"model\.chat_template must be one of"):
        parse_args(SFTConfig, ["model.preset=tiny", "model.chat_template=llama3.3"])
