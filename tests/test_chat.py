"""The chat formats against the Llama 3 / 3.1 / 3.2 Instruct templates (trl's copies) rendered with jinja2
as transformers renders them and tokenized by HF `tokenizers`; the masks against a walk over the ids
written independently."""

import json
import re
import sys
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.sandbox
import pytest
import trl
from tokenizers import Tokenizer as HFTokenizer

from llama_posttrain.llama.chat import TEMPLATES, ChatFormat, jinja_template, resolve_chat_template
from llama_posttrain.llama.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

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
    with pytest.raises(
        ValueError, match=r"tokenizer_config\.json: chat_template: it renders none of the Llama 3 formats"
    ):
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


# ----------------------------------------------------------------------------- recognized by rendering (issue 17)

CHATML_WITH_DATES = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if loop.first %}You are a pirate. Cutting Knowledge Date: December 2023\nToday Date: "
    "{{ date_string | default('26 Jul 2024') }}\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PIRATE_31 = jinja_template("llama3.1").replace(
    '{{- "Today Date: " + date_string + "\\n\\n" }}',
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n{{- "You are a pirate.\\n" }}',
)


def hub_tokenizer_config(d: Path, llama3_tokenizer_dir: Path, chat_template) -> Path:
    """A folder with the real tokenizer_config.json (Llama 3's added tokens and settings) holding `chat_template`."""
    d.mkdir()
    config = json.loads((llama3_tokenizer_dir / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return d / "tokenizer_config.json"


def revised(name: str) -> str:
    """The model's template with a variable renamed: other text, the same output (as a repository's revision)."""
    text = (TRL_TEMPLATES / TRL_FILES[name]).read_text().replace("system_message", "sys_msg")
    assert "sys_msg" in text and "".join(text.split()) != "".join(jinja_template(name).split())
    return text


def test_templates_are_recognized_by_what_they_render(tmp_path, llama3_tokenizer_dir):
    """trl's copies, revisions with the same output and trl's {% generation %} training variant are
    recognized, in the real tokenizer_config.json; a 3.2 revision without its own "today" default is 3.1."""
    no_today = revised("llama3.2").replace("strftime_now is defined", "false")
    cases = {TRL_FILES[n]: (TRL_TEMPLATES / TRL_FILES[n]).read_text() for n in TEMPLATES}
    cases |= {f"revised {n}": revised(n) for n in ("llama3.1", "llama3.2")}
    cases |= {"llama3_training.jinja": (TRL_TEMPLATES / "llama3_training.jinja").read_text()}
    cases |= {"3.2 without strftime_now": no_today}
    expected = {"llama3.jinja": "llama3", "llama3_1.jinja": "llama3.1", "llama3_2.jinja": "llama3.2"}
    expected |= {"revised llama3.1": "llama3.1", "revised llama3.2": "llama3.2", "llama3_training.jinja": "llama3"}
    expected |= {"3.2 without strftime_now": "llama3.1"}
    for i, (case, text) in enumerate(cases.items()):
        hub_tokenizer_config(tmp_path / str(i), llama3_tokenizer_dir, text)
        assert resolve_chat_template(None, tmp_path / str(i)) == expected[case], case
    # the reference: what transformers' renderer writes with each template, against the name's ChatFormat
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for case in ("revised llama3.1", "revised llama3.2", "3.2 without strftime_now"):
        chat = ChatFormat(load_tokenizer(DEFAULT_TOKENIZER), expected[case])
        for messages in DIALOGS:
            text = env.from_string(cases[case]).render(messages=messages, bos_token="<|begin_of_text|>")
            assert text == chat.tokenizer.decode(chat.encode_dialog(messages).tokens), case


@pytest.mark.parametrize("case", ["chatml with the date lines", "llama3.1 with another system prompt"])
def test_a_template_that_renders_otherwise_is_refused_naming_file_and_key(case, tmp_path, llama3_tokenizer_dir):
    """Both hold the two date lines (taken for 3.1 by a substring test before); both render otherwise than
    every format (checked here with transformers' renderer), so both are refused, naming the file and key."""
    text = CHATML_WITH_DATES if case.startswith("chatml") else PIRATE_31
    file = hub_tokenizer_config(tmp_path / "m", llama3_tokenizer_dir, text)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for name in TEMPLATES:
        chat = ChatFormat(load_tokenizer(DEFAULT_TOKENIZER), name)
        rendered = env.from_string(text).render(messages=DIALOGS[0], bos_token="<|begin_of_text|>")
        assert rendered != chat.tokenizer.decode(chat.encode_dialog(DIALOGS[0]).tokens)
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(file))}: chat_template: it renders none of the Llama 3"
    ) as e:
        resolve_chat_template(None, tmp_path / "m")
    assert "pirate" in str(e.value) and "model.chat_template" in str(e.value)
    (tmp_path / "m" / "chat_template.jinja").write_text(text)  # transformers' newer file, read first
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'm' / 'chat_template.jinja'))}: "):
        resolve_chat_template(None, tmp_path / "m")
    assert resolve_chat_template("llama3.1", tmp_path / "m") == "llama3.1"  # set by hand: used


def test_named_templates_without_default_and_non_strings_are_refused(tmp_path):
    for value, message in [
        (
            [{"name": "tool_use", "template": "x"}],
            r"chat_template: a list of named templates \['tool_use'\] with no 'default'",
        ),
        (5, r"chat_template: expected a Jinja template as a string, got int"),
        ("{% for %}", r"chat_template: it fails to render a plain dialog \(TemplateSyntaxError"),
    ]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": value}))
        with pytest.raises(ValueError, match=rf"tokenizer_config\.json: {message}"):
            resolve_chat_template(None, tmp_path)


def test_without_jinja2_only_the_shipped_text_is_recognized(tmp_path, monkeypatch):
    """jinja2 is not a dependency: without it the shipped templates are still known by their text, and
    anything else is an error saying to install it or to set the key."""
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 raises ImportError
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": jinja_template("llama3.2")}))
    assert resolve_chat_template(None, tmp_path) == "llama3.2"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": revised("llama3.1")}))
    with pytest.raises(
        ValueError,
        match=r"tokenizer_config\.json: chat_template: .*jinja2 is not installed .*pip install jinja2.*model\.chat_template",
    ):
        resolve_chat_template(None, tmp_path)
