"""The Llama 3 chat formats, with per-token roles.

`template="llama3"` (Llama 3.0 Instruct):

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>   (if there is one)
    <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|>

`template="llama3.1"` / `"llama3.2"` (Llama 3.1 / 3.2 Instruct; 3.3 uses 3.1's): the same turns after a
system turn that is always there, opened by two lines the template writes, then the system prompt if any:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
    Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n{system prompt, or nothing}<|eot_id|>

The two differ only in what they do when no date is given (3.1: "26 Jul 2024"; 3.2: today) and in tool
calls, which are out of scope here (a tool message or tool call is an error). Here the date is always
`date_string`, so training is reproducible. Token ids equal the models' own Jinja templates (shipped in
llama_posttrain/llama/assets, written with Hugging Face exports) rendered with the same date.

Per token, `encode_dialog` also says whether it is
- a training target: the content of assistant messages and their terminator (SFT trains on these);
- a formatting token: every header span `<|start_header_id|>role<|end_header_id|>\\n\\n`, every turn
  terminator `<|eot_id|>` / `<|eom_id|>`, and the date lines the 3.1 template writes (Llama 3 masks
  formatting tokens out of the DPO log-probs).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from llama_posttrain.llama.template_probes import (
    PROBE_DATE,
    PROBE_TODAY,
    PROBES,
    check_own_template,
    mismatch,
    render_probes,
)
from llama_posttrain.llama.tokenizer_kinds import Tokenizer

TEMPLATES = ("llama3", "llama3.1", "llama3.2")
DEFAULT_DATE = "26 Jul 2024"  # what Meta's 3.1 template writes when no date is given
KNOWLEDGE_CUTOFF = "December 2023"
_ASSETS = Path(__file__).parent / "assets"


def jinja_template(name: str) -> str:
    """The model's own chat template for a ChatFormat template: Meta's (as trl ships it) for a Llama 3 name,
    the text itself for a model's own template (`is_template_text`)."""
    if is_template_text(name):
        return name
    _check_name(name, "chat template")
    return (_ASSETS / f"{name}.jinja").read_text(encoding="utf-8")


def is_template_text(template) -> bool:
    """Whether a ChatFormat template is a Jinja text (a model's own template) rather than a Llama 3 name."""
    return isinstance(template, str) and template not in TEMPLATES and ("{{" in template or "{%" in template)


def _check_name(name, what: str) -> None:
    if name not in TEMPLATES:
        raise ValueError(f"{what} {name!r} is not one of {', '.join(TEMPLATES)} (Llama 3.3 uses llama3.1)")


@dataclass
class EncodedDialog:
    tokens: list[int] = field(default_factory=list)
    is_target: list[bool] = field(default_factory=list)
    is_format: list[bool] = field(default_factory=list)

    def add(self, ids: list[int], target: bool, fmt: bool) -> None:
        self.tokens += ids
        self.is_target += [target] * len(ids)
        self.is_format += [fmt] * len(ids)

    def __len__(self) -> int:
        return len(self.tokens)


class ChatFormat:
    """A chat format: `template` a Llama 3 name (TEMPLATES), or a model's own Jinja template text, which is a
    Llama 3 format if it renders as one (recognize_template) and else a TemplateChatFormat."""

    def __new__(cls, tokenizer: Tokenizer, template: str = "llama3", date_string: str = DEFAULT_DATE):
        if cls is ChatFormat and is_template_text(template) and recognize_template(template) not in TEMPLATES:
            return super().__new__(TemplateChatFormat)
        return super().__new__(cls)

    def __getnewargs__(self):  # pickled into data-preparation workers
        return (self.tokenizer, self.template, self.date_string)

    def __init__(self, tokenizer: Tokenizer, template: str = "llama3", date_string: str = DEFAULT_DATE):
        if is_template_text(template):
            template = recognize_template(template)
        _check_name(template, "ChatFormat template")
        if not isinstance(date_string, str) or not date_string.strip():
            raise ValueError(f"date_string must be a non-empty string like {DEFAULT_DATE!r}, got {date_string!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.date_string = date_string

    @property
    def eot_id(self) -> int:
        """The end of an assistant turn (a target; what truncation ends a cut turn with)."""
        return self.tokenizer.eot_id

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an assistant turn during generation."""
        return self.tokenizer.stop_ids

    @property
    def has_date_header(self) -> bool:
        """3.1 / 3.2: every dialog opens with the system turn carrying the knowledge and today's date."""
        return self.template != "llama3"

    def encode_header(self, role: str) -> list[int]:
        tok = self.tokenizer
        return [tok.start_header_id] + tok.encode(role) + [tok.end_header_id] + tok.encode("\n\n")

    def encode_message(self, message: dict, out: EncodedDialog) -> None:
        """Append one message. `message["eot"] = False` ends it with <|eom_id|> (a tool call follows)."""
        is_assistant = message["role"] == "assistant"
        out.add(self.encode_header(message["role"]), target=False, fmt=True)
        out.add(self.tokenizer.encode(message["content"].strip()), target=is_assistant, fmt=False)
        end = self.tokenizer.eot_id if message.get("eot", True) else self.tokenizer.eom_id
        out.add([end], target=is_assistant, fmt=True)

    def encode_system_turn(self, system_prompt: str, out: EncodedDialog) -> None:
        """3.1 / 3.2's opening system turn. The date lines end in "\\n\\n" and the prompt is stripped, so
        encoding them apart gives the ids of encoding them together."""
        out.add(self.encode_header("system"), target=False, fmt=True)
        dates = f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {self.date_string}\n\n"
        out.add(self.tokenizer.encode(dates), target=False, fmt=True)
        out.add(self.tokenizer.encode(system_prompt.strip()), target=False, fmt=False)
        out.add([self.tokenizer.eot_id], target=False, fmt=True)

    def encode_dialog(self, messages: list[dict], add_generation_prompt: bool = False, bos: bool = True):
        """messages [{"role", "content"}, ...] -> EncodedDialog(tokens, is_target, is_format)."""
        self.check_messages(messages)
        out = EncodedDialog()
        if bos:
            out.add([self.tokenizer.bos_id], target=False, fmt=False)
        if self.has_date_header:
            has_system = bool(messages) and messages[0]["role"] == "system"
            self.encode_system_turn(messages[0]["content"] if has_system else "", out)
            messages = messages[1:] if has_system else messages
        for message in messages:
            self.encode_message(message, out)
        if add_generation_prompt:
            out.add(self.encode_header("assistant"), target=False, fmt=True)
        return out

    def encode_response(self, messages: list[dict]) -> EncodedDialog:
        """Messages that continue a prompt encoded with add_generation_prompt=True: the first header dropped."""
        out = EncodedDialog()
        for i, message in enumerate(messages):
            part = EncodedDialog()
            self.encode_message(message, part)
            skip = len(self.encode_header(message["role"])) if i == 0 else 0
            out.tokens += part.tokens[skip:]
            out.is_target += part.is_target[skip:]
            out.is_format += part.is_format[skip:]
        return out

    def check_messages(self, messages: list[dict]) -> None:
        for i, message in enumerate(messages):
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise ValueError(f"message {i}: field {key!r} must be a string, got {message.get(key)!r}")
            if self.has_date_header and (message["role"] in ("ipython", "tool") or "tool_calls" in message):
                # the 3.1 template writes these as JSON, differently from plain turns: not supported here
                raise ValueError(
                    f"message {i}: tool calls and tool results ({message['role']!r} turn) are not supported "
                    f"with the {self.template} chat format"
                )


class TemplateChatFormat(ChatFormat):
    """A model's own Jinja chat template (not Llama 3's): roles from its rendering, llama/template_chat.py."""

    def __init__(self, tokenizer: Tokenizer, template: str, date_string: str = DEFAULT_DATE):
        from llama_posttrain.llama.template_chat import environment

        if not hasattr(tokenizer, "token_bytes"):
            raise ValueError(f"{tokenizer.path}: a chat template other than Llama 3's needs a byte-level BPE tokenizer")
        self.tokenizer, self.template, self.date_string = tokenizer, template, date_string
        try:
            self._jinja = environment().from_string(template)
        except ImportError:
            raise ValueError("the model's own chat template needs jinja2 to render it (pip install jinja2)") from None
        names = {i: t for t, i in tokenizer.special_tokens.items()}
        self._special_kw = {"bos_token": names.get(tokenizer.bos_id), "eos_token": names.get(tokenizer.eos_id)}
        self._writes_bos = "bos_token" in template
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(names.values(), key=len, reverse=True)))
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        text, spans = self._spans(probe, False)
        after = text[spans[-1][1] :]
        match = self._special_re.match(after)
        if match is None:
            raise ValueError(
                f"the chat template ends an assistant turn with {after[:20]!r}, which does not start with a special "
                f"token of {tokenizer.path}: there is no end-of-turn token to train and to stop on"
            )
        self._eot = tokenizer.special_tokens[match.group()]

    def __reduce__(self):  # pickled into data-preparation workers (a compiled template is not picklable)
        return (ChatFormat, (self.tokenizer, self.template, self.date_string))

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def stop_ids(self) -> list[int]:
        return sorted({self._eot, self.tokenizer.eos_id})

    def _spans(self, messages, add_generation_prompt, bos=True):
        from llama_posttrain.llama.template_chat import content_spans

        special = self._special_kw if bos else {**self._special_kw, "bos_token": ""}

        def render(ms):
            kw = dict(messages=ms, add_generation_prompt=add_generation_prompt, date_string=self.date_string)
            return self._jinja.render(**kw, **special)

        try:
            return content_spans(render, messages)
        except ValueError as e:
            raise ValueError(f"chat template: {e}") from None

    def encode_dialog(self, messages: list[dict], add_generation_prompt: bool = False, bos: bool = True):
        """The ids of transformers' apply_chat_template (a content's special-token strings stay text), with roles.
        bos=False: rendered with an empty bos_token (without the bos the template writes, if it writes one)."""
        self.check_messages(messages)
        text, spans = self._spans(messages, add_generation_prompt, bos)
        return self._encode_text(text, spans, messages)

    def _encode_text(self, text: str, spans, messages: list[dict], start: int = 0) -> EncodedDialog:
        """text[start:] (a rendering whose contents lie at `spans`) -> ids with roles."""
        content = [0] * len(text.encode())  # per byte: 1 + the index of the message whose content it is, else 0
        for a, b, i in spans:
            a, b = len(text[:a].encode()), len(text[:b].encode())
            content[a:b] = [i + 1] * (b - a)
        ids, pos = [], start
        for m in self._special_re.finditer(text, start):
            if any(a < m.end() and m.start() < b for a, b, _ in spans):
                continue  # a special-token string inside a content: text
            ids += self.tokenizer.encode(text[pos : m.start()]) + [self.tokenizer.special_tokens[m.group()]]
            pos = m.end()
        ids += self.tokenizer.encode(text[pos:])
        out, at, after_assistant = EncodedDialog(), len(text[:start].encode()), False
        for n, t in enumerate(ids):
            width = len(self.tokenizer.token_bytes(t))
            owner = max(content[at : at + width], default=0)
            at += width
            if owner:
                is_assistant = messages[owner - 1]["role"] == "assistant"
                out.add([t], target=is_assistant, fmt=False)
                after_assistant = is_assistant
            else:
                leading_bos = n == 0 and start == 0 and t == self.tokenizer.bos_id and self._writes_bos
                out.add([t], target=after_assistant and t == self._eot, fmt=not leading_bos)
                after_assistant = False
        return out

    def encode_response(self, messages: list[dict]) -> EncodedDialog:
        """What the dialog [a user turn, *messages] adds to that turn encoded with the generation prompt.
        A response whose first characters merge with the generation prompt's last ones when the whole dialog
        is encoded (one opening with whitespace: "assistant\n" + "\n..." -> one "\n\n" token) is encoded
        after the prompt's ids, as it was sampled: the prompt is the same ids in every dialog it starts."""
        head = [{"role": "user", "content": "?"}]
        self.check_messages(head + messages)
        prompt_text, _ = self._spans(head, True)
        text, spans = self._spans(head + messages, False)
        if not text.startswith(prompt_text):
            raise ValueError("chat template: a dialog's rendering does not start with its prompt and generation prompt")
        prompt = self._encode_text(prompt_text, [], head)
        full = self._encode_text(text, spans, head + messages)
        n = len(prompt)
        if full.tokens[:n] == prompt.tokens:
            return EncodedDialog(full.tokens[n:], full.is_target[n:], full.is_format[n:])
        return self._encode_text(text, spans, head + messages, start=len(prompt_text))

    def encode_message(self, message: dict, out: EncodedDialog) -> None:
        raise NotImplementedError("a model's own chat template encodes whole dialogs (encode_dialog)")

    def check_messages(self, messages: list[dict]) -> None:
        for i, message in enumerate(messages):
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise ValueError(f"message {i}: field {key!r} must be a string, got {message.get(key)!r}")
            if "tool_calls" in message:
                raise ValueError(f"message {i}: tool calls are not supported with the model's own chat template")


# ----------------------------------------------------------------------------- which template


# A template is recognized by what it renders on the probe dialogs (llama_posttrain/llama/template_probes.py).
def _shipped_text(name: str) -> str:
    return "".join(jinja_template(name).split())


@functools.cache
def _expected_renders() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """name -> (the probes' text with date_string=PROBE_DATE, without a date_string): our ChatFormat's ids
    decoded by the byte tokenizer (its special tokens decode to their names, bytes to themselves)."""
    from datetime import date

    from llama_posttrain.llama.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    tok = load_tokenizer(DEFAULT_TOKENIZER)
    today = date(*PROBE_TODAY).strftime("%d %b %Y")
    no_date = {"llama3": DEFAULT_DATE, "llama3.1": DEFAULT_DATE, "llama3.2": today}

    def texts(name, date_string):
        chat = ChatFormat(tok, name, date_string)
        return tuple(tok.decode(chat.encode_dialog(m, gen).tokens) for m, gen in PROBES)

    return {name: (texts(name, PROBE_DATE), texts(name, no_date[name])) for name in TEMPLATES}


def recognize_template(text) -> str:
    """A Jinja chat template's ChatFormat template: a Llama 3 name, or the text itself for a model's own.
    One of the shipped templates (whitespace aside) is known by its text; any other is rendered on the probe
    dialogs (render_probes, needs jinja2): what gives exactly what one of our formats gives, with a date
    passed and without, is that format (Meta's 3.1-3.3 revisions, trl's copies and training variants). A
    template that writes Llama 3's headers or date lines otherwise is refused, saying how it differs; any
    other is the model's own (TemplateChatFormat) if it writes each message's content once, as given or
    stripped, and is refused otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"expected a Jinja template as a string, got {type(text).__name__}")
    squeezed = "".join(text.split())
    for name in TEMPLATES:
        if squeezed == _shipped_text(name):
            return name
    try:
        rendered = render_probes(text)
    except ImportError:
        raise ValueError(
            "it is not the text of a shipped Llama 3 template, and jinja2 is not installed to compare what it "
            "renders (pip install jinja2)"
        ) from None
    except Exception as e:  # the template's own error, raised while compiling or rendering a probe
        raise ValueError(f"it fails to render a plain dialog ({type(e).__name__}: {e})") from None
    expected = _expected_renders()
    for name in TEMPLATES:
        if rendered == expected[name]:
            return name
    if any(marker in r for r in rendered[0] + rendered[1] for marker in LLAMA3_MARKERS):
        raise ValueError(mismatch(rendered, expected))  # a Llama 3 template changed: the model knows Meta's only
    try:
        check_own_template(text)
    except Exception as e:
        raise ValueError(f"{mismatch(rendered, expected)}; nor can it be read as a template of its own: {e}") from None
    return text


# A template that writes these is a Llama 3 template, which must render exactly as one of Meta's.
LLAMA3_MARKERS = ("<|start_header_id|>", "Cutting Knowledge Date")


def template_in_dir(directory) -> tuple[str | None, Path | None]:
    """The chat template a Hugging Face model folder names -> (ChatFormat name, file), (None, None) if it
    names none. Read from chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or
    a list of {"name", "template"} whose "default" is used), as transformers reads them. One it holds that
    is not ours (recognize_template) is a ValueError naming the file and the key."""
    directory = Path(directory)
    file, key = directory / "chat_template.jinja", "the chat template"
    try:
        if file.is_file():
            text = file.read_text(encoding="utf-8")
        elif (directory / "tokenizer_config.json").is_file():
            file, key = directory / "tokenizer_config.json", "chat_template"
            raw = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
            text = raw.get("chat_template")
        else:
            return None, None
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise ValueError(f"{file}: cannot read it: {e}") from None
    if text is None:
        return None, None
    if isinstance(text, list):  # named templates: transformers uses the "default" one
        names = [t.get("name") for t in text if isinstance(t, dict)]
        text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
        if text is None:
            raise ValueError(f"{file}: chat_template: a list of named templates {names} with no 'default' one")
        key = "chat_template (its 'default' entry)"
    try:
        return recognize_template(text), file
    except ValueError as e:
        raise ValueError(
            f"{file}: {key}: {e}. Training or exporting in another format than the model's would go unnoticed: "
            f"set the format by hand with model.chat_template (--chat-template): {', '.join(TEMPLATES)}"
        ) from None


def resolve_chat_template(name: str | None, checkpoint_dir=None, verbose: bool = True) -> str:
    """The chat format for a model: `name` if given; else the one the checkpoint folder's tokenizer files
    name (printed); else "llama3" (printed when a checkpoint folder was given). verbose=False: nothing printed."""
    if name:
        _check_name(name, "chat template")
        return name
    if checkpoint_dir is None:
        return "llama3"
    found, file = template_in_dir(checkpoint_dir)
    if found is not None:
        if verbose:
            shown = "the model's own (not a Llama 3 format)" if is_template_text(found) else found
            print(f"chat template: {shown} (from {file})", flush=True)
        return found
    if verbose:
        print(f"chat template: llama3 (the default: {checkpoint_dir} names none; set model.chat_template)", flush=True)
    return "llama3"
