"""The Llama 3 chat format, with per-token roles.

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|>

Per token, `encode_dialog` also says whether it is
- a training target: the content of assistant messages and their terminator (SFT trains on these);
- a formatting token: every header span `<|start_header_id|>role<|end_header_id|>\\n\\n` and every
  turn terminator `<|eot_id|>` / `<|eom_id|>` (Llama 3 masks these out of the DPO log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llama.tokenizer import Tokenizer


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
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

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

    def encode_dialog(self, messages: list[dict], add_generation_prompt: bool = False, bos: bool = True):
        """messages [{"role", "content"}, ...] -> EncodedDialog(tokens, is_target, is_format)."""
        out = EncodedDialog()
        if bos:
            out.add([self.tokenizer.bos_id], target=False, fmt=False)
        for i, message in enumerate(messages):
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise ValueError(f"message {i}: field {key!r} must be a string, got {message.get(key)!r}")
            self.encode_message(message, out)
        if add_generation_prompt:
            out.add(self.encode_header("assistant"), target=False, fmt=True)
        return out
