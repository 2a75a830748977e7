"""The chat formats against the Llama 3 / 3.1 / 3.2 Instruct templates (trl's copies) rendered with jinja2
as transformers renders them and tokenized by HF `tokenizers`; the masks against a walk over the ids
written independently."""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.sandbox
import pytest
import trl
from tokenizers import Tokenizer as HFTokenizer

from llama.chat import TEMPLATES, ChatFormat, jinja_template, resolve_chat_template
from llama.tokenizer import load_tokenizer

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
TRL_FILES = {"llama3": "llama3.jinja", "llama3.1": "llama3_1.jinja", "llama3.2": "llama3_2.jinja"}

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
    return jinja2.Environment().from_string((TRL_TEMPLATES / "llama3.jinja").read_text())


def hf_render(name: str, messages, gen: bool, **kw) -> str:
    """trl's copy of the model's template, rendered in the environment transformers' apply_chat_template uses."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    text = (TRL_TEMPLATES / TRL_FILES[name]).read_text()
    return env.from_string(text).render(
        messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=gen, **kw
    )


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


@pytest.mark.parametrize("name", ["llama3.1", "llama3.2"])
@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("dialog", range(len(DIALOGS)))
def test_llama31_ids_equal_rendered_template(name, dialog, gen, tok, hf):
    messages, date = DIALOGS[dialog], "3 Mar 2025"
    text = hf_render(name, messages, gen, date_string=date)
    expected = hf.encode(text, add_special_tokens=False).ids
    chat = ChatFormat(tok, template=name, date_string=date)
    assert chat.encode_dialog(messages, add_generation_prompt=gen).tokens == expected
    if name == "llama3.1":  # its own default date is ours
        assert (
            ChatFormat(tok, name).encode_dialog(messages, gen).tokens
            == hf.encode(hf_render(name, messages, gen)).ids[1:]
        )


def test_shipped_templates_are_trls_and_recognized(tmp_path):
    """The templates written with Hugging Face exports are the models' own, and are read back by name."""
    for name in TEMPLATES:
        assert jinja_template(name) == (TRL_TEMPLATES / TRL_FILES[name]).read_text()
        d = tmp_path / name
        d.mkdir()
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": jinja_template(name)}))
        assert resolve_chat_template(None, d) == name
    assert resolve_chat_template("llama3.2", tmp_path / "llama3") == "llama3.2"  # given wins
    assert resolve_chat_template(None, tmp_path) == "llama3"  # no tokenizer files: the default
    assert resolve_chat_template(None, None) == "llama3"
    # Meta's 3.3 repository ships a 3.1 revision; a list of named templates uses the "default" one
    revised = jinja_template("llama3.1").replace("Environment: ipython", "Environment:  ipython")
    (tmp_path / "llama3" / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": revised}]})
    )
    assert resolve_chat_template(None, tmp_path / "llama3") == "llama3.1"
    (tmp_path / "llama3" / "chat_template.jinja").write_text(jinja_template("llama3.2"))  # transformers' newer file
    assert resolve_chat_template(None, tmp_path / "llama3") == "llama3.2"


def test_unknown_template_and_tools_are_errors(tmp_path, tok):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: its chat_template is none of the Llama 3 formats"):
        resolve_chat_template(None, tmp_path)
    with pytest.raises(ValueError, match=r"chat template 'llama3\.3' is not one of .*3\.3 uses llama3\.1"):
        resolve_chat_template("llama3.3", tmp_path)
    with pytest.raises(ValueError, match="date_string must be a non-empty string"):
        ChatFormat(tok, "llama3.1", date_string="")
    chat = ChatFormat(tok, "llama3.2")
    with pytest.raises(ValueError, match=r"message 1: tool calls and tool results \('ipython' turn\)"):
        chat.encode_dialog([{"role": "user", "content": "6*7?"}, {"role": "ipython", "content": "42"}])
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
    with pytest.raises(ValueError, match="message 0: tool calls"):
        chat.encode_dialog([call])


def reference_masks(ids, tok):
    """Walk the ids: a header span runs from <|start_header_id|> to the "\\n\\n" token after
    <|end_header_id|>; targets run from an assistant header's end to its terminator. The 3.1 system
    turn's lines up to "Today Date: ...\\n\\n" are formatting too."""
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
            start = i
            if tok.decode(ids[i:]).startswith("Cutting Knowledge Date:"):
                while not (tok.decode(ids[start:i]).endswith("\n\n") and "Today Date" in tok.decode(ids[start:i])):
                    is_format[i] = True
                    i += 1
            continue
        if ids[i] in (tok.eot_id, tok.eom_id):
            is_format[i] = True
        is_target[i] = in_assistant
        if ids[i] in (tok.eot_id, tok.eom_id):
            in_assistant = False
        i += 1
    return is_format, is_target


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("dialog", range(len(DIALOGS)))
def test_format_and_target_masks(name, dialog, tok):
    enc = ChatFormat(tok, name).encode_dialog(DIALOGS[dialog], add_generation_prompt=True)
    is_format, is_target = reference_masks(enc.tokens, tok)
    assert enc.is_format == is_format
    assert enc.is_target == is_target
    # 3.1: a system turn even without a system prompt
    n_turns = len(DIALOGS[dialog]) + (name != "llama3" and DIALOGS[dialog][0]["role"] != "system")
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
