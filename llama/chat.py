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
llama/assets, written with Hugging Face exports) rendered with the same date.

Per token, `encode_dialog` also says whether it is
- a training target: the content of assistant messages and their terminator (SFT trains on these);
- a formatting token: every header span `<|start_header_id|>role<|end_header_id|>\\n\\n`, every turn
  terminator `<|eot_id|>` / `<|eom_id|>`, and the date lines the 3.1 template writes (Llama 3 masks
  formatting tokens out of the DPO log-probs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llama.tokenizer import Tokenizer

TEMPLATES = ("llama3", "llama3.1", "llama3.2")
DEFAULT_DATE = "26 Jul 2024"  # what Meta's 3.1 template writes when no date is given
KNOWLEDGE_CUTOFF = "December 2023"
_ASSETS = Path(__file__).parent / "assets"


def jinja_template(name: str) -> str:
    """The model's own chat template (Meta's, as trl ships it) for a ChatFormat template name."""
    _check_name(name, "chat template")
    return (_ASSETS / f"{name}.jinja").read_text(encoding="utf-8")


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
    def __init__(self, tokenizer: Tokenizer, template: str = "llama3", date_string: str = DEFAULT_DATE):
        _check_name(template, "ChatFormat template")
        if not isinstance(date_string, str) or not date_string.strip():
            raise ValueError(f"date_string must be a non-empty string like {DEFAULT_DATE!r}, got {date_string!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.date_string = date_string

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


# ----------------------------------------------------------------------------- which template


def recognize_template(text: str) -> str | None:
    """A Jinja chat template's ChatFormat name: one of the shipped templates (whitespace aside), or any
    revision of Meta's 3.1-3.3 templates (they write the knowledge-date line); None if neither."""
    squeezed = "".join(text.split())
    for name in TEMPLATES:
        if squeezed == "".join(jinja_template(name).split()):
            return name
    if f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}" in text and "Today Date: " in text:
        return "llama3.2" if "strftime_now" in text else "llama3.1"  # 3.2's own date default is today's
    return None


def template_in_dir(directory) -> tuple[str | None, Path | None]:
    """The chat template a Hugging Face model folder names -> (ChatFormat name, file), (None, None) if it
    names none. Read from chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or
    a list of {"name", "template"} whose "default" is used). One it holds but is not ours is an error."""
    directory = Path(directory)
    text, file = None, directory / "chat_template.jinja"
    if file.is_file():
        text = file.read_text(encoding="utf-8")
    elif (directory / "tokenizer_config.json").is_file():
        file = directory / "tokenizer_config.json"
        try:
            text = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{file}: cannot read it as a JSON object: {e}") from None
        if isinstance(text, list):
            text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    if text is None:
        return None, None
    name = recognize_template(text) if isinstance(text, str) else None
    if name is None:
        raise ValueError(
            f"{file}: its chat_template is none of the Llama 3 formats ({', '.join(TEMPLATES)}); training on "
            "another format than the model's would go unnoticed, so choose one: model.chat_template (--chat-template)"
        )
    return name, file


def resolve_chat_template(name: str | None, checkpoint_dir=None) -> str:
    """The chat format for a model: `name` if given; else the one the checkpoint folder's tokenizer files
    name (printed); else "llama3" (printed when a checkpoint folder was given)."""
    if name:
        _check_name(name, "chat template")
        return name
    if checkpoint_dir is None:
        return "llama3"
    found, file = template_in_dir(checkpoint_dir)
    if found is not None:
        print(f"chat template: {found} (from {file})", flush=True)
        return found
    print(f"chat template: llama3 (the default: {checkpoint_dir} names none; set model.chat_template)", flush=True)
    return "llama3"
