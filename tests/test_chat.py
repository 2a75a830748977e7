"""The chat format against the Llama 3 Instruct template (trl's copy) rendered with jinja2 and
tokenized by HF `tokenizers`; the masks against a walk over the ids written independently."""

from pathlib import Path

import jinja2
import pytest
import trl
from tokenizers import Tokenizer as HFTokenizer

from llama.chat import ChatFormat
from llama.tokenizer import load_tokenizer

DIALOGS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "You are a helpful assistant.\n"},
        {"role": "user", "content": "  Traduis « bonjour » en 日本語, s'il te plaît. "},
        {"role": "assistant", "content": "こんにちは (konnichiwa) 👋"},
        {"role": "user", "content": "And in code?\n```python\nprint('hi')\n```"},
        {"role": "assistant", "content": "\n\nprint('こんにちは')\n"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count to 3."},
        {"role": "assistant", "content": "1, 2, 3."},
    ],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": ""}],
]


@pytest.fixture(scope="module")
def template():
    path = Path(trl.__file__).parent / "chat_templates" / "llama3.jinja"
    return jinja2.Environment().from_string(path.read_text())


@pytest.fixture(scope="module")
def tok(llama3_tokenizer_dir):
    return load_tokenizer(llama3_tokenizer_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def hf(llama3_tokenizer_dir):
    return HFTokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("dialog", range(len(DIALOGS)))
def test_ids_equal_rendered_template(dialog, gen, template, tok, hf):
    messages = DIALOGS[dialog]
    text = template.render(messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=gen)
    expected = hf.encode(text, add_special_tokens=False).ids
    assert ChatFormat(tok).encode_dialog(messages, add_generation_prompt=gen).tokens == expected


def reference_masks(ids, tok):
    """Walk the ids: a header span runs from <|start_header_id|> to the "\\n\\n" token after
    <|end_header_id|>; targets run from an assistant header's end to its terminator."""
    is_format, is_target = [False] * len(ids), [False] * len(ids)
    i, in_assistant = 0, False
    while i < len(ids):
        if ids[i] == tok.start_header_id:
            j = ids.index(tok.end_header_id, i)
            role = tok.decode(ids[i + 1 : j])
            assert tok.decode([ids[j + 1]]) == "\n\n"
            for k in range(i, j + 2):
                is_format[k] = True
            in_assistant = role == "assistant"
            i = j + 2
            continue
        if ids[i] in (tok.eot_id, tok.eom_id):
            is_format[i] = True
        is_target[i] = in_assistant
        if ids[i] in (tok.eot_id, tok.eom_id):
            in_assistant = False
        i += 1
    return is_format, is_target


@pytest.mark.parametrize("dialog", range(len(DIALOGS)))
def test_format_and_target_masks(dialog, tok):
    enc = ChatFormat(tok).encode_dialog(DIALOGS[dialog], add_generation_prompt=True)
    is_format, is_target = reference_masks(enc.tokens, tok)
    assert enc.is_format == is_format
    assert enc.is_target == is_target
    n_turns = len(DIALOGS[dialog])
    assert sum(t in (tok.eot_id, tok.eom_id) for t, f in zip(enc.tokens, enc.is_format) if f) == n_turns
    target_text = tok.decode([t for t, m in zip(enc.tokens, enc.is_target) if m])
    expected = "".join(m["content"].strip() + "<|eot_id|>" for m in DIALOGS[dialog] if m["role"] == "assistant")
    assert target_text == expected


def test_eom_terminator_and_bad_messages(tok):
    chat = ChatFormat(tok)
    enc = chat.encode_dialog([{"role": "assistant", "content": "call()", "eot": False}])
    assert enc.tokens[-1] == tok.eom_id and enc.is_format[-1] and enc.is_target[-1]
    with pytest.raises(ValueError, match="message 1: field 'content' must be a string"):
        chat.encode_dialog([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}])
