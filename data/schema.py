"""Record schemas and their validation.

SFT:        {"messages": [{"role": "system"|"user"|"assistant"|"ipython", "content": str}, ...]}
            {"text": str}  plain text, every token a target (pre-training the tiny experiment models)
Preference: {"prompt": str | messages, "responses": [response, ...], "strength": ...}  ranked best first
            {"prompt": ..., "chosen": response, "rejected": response, "edited": response?}
            (edited > chosen > rejected)
A response is the assistant's text, or a list of messages that continues the prompt (its first
message from the assistant). `strength` says how much better the best response is than the next:
significantly_better > better > slightly_better > marginally_better. Llama 3 trains the reward
model and DPO only on the first two levels (`keep_strengths`).

Every problem is reported as `file:line: field: problem`.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "ipython", "tool")
STRENGTHS = ("significantly_better", "better", "slightly_better", "marginally_better")


class ValidationError(ValueError):
    pass


@dataclass
class SFTRecord:
    messages: list[dict] | None = None
    text: str | None = None


@dataclass
class PreferenceRecord:
    prompt: list[dict]
    responses: list[list[dict]]  # ranked best first, each a list of messages
    strength: str | None = None


def _fail(where: str, fld: str, problem: str):
    raise ValidationError(f"{where}: {fld}: {problem}")


def _messages(value, where: str, fld: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        _fail(where, fld, f"must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        f = f"{fld}[{i}]"
        if not isinstance(m, dict):
            _fail(where, f, f"must be an object with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            _fail(where, f"{f}.role", f"must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            _fail(where, f"{f}.content", f"must be a string, got {type(m.get('content')).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def parse_sft(obj, where: str) -> SFTRecord:
    if not isinstance(obj, dict):
        _fail(where, "record", f"must be a JSON object, got {type(obj).__name__}")
    if "text" in obj and "messages" not in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            _fail(where, "text", "must be a non-empty string")
        return SFTRecord(text=obj["text"])
    if "messages" not in obj:
        _fail(where, "messages", "missing (or give 'text' for plain text)")
    messages = _messages(obj["messages"], where, "messages")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        _fail(where, "messages", "no non-empty assistant message to train on")
    return SFTRecord(messages)


def _response(value, where: str, fld: str) -> list[dict]:
    if isinstance(value, str):
        msgs = [{"role": "assistant", "content": value}]
    else:
        msgs = _messages(value, where, fld)
        if msgs[0]["role"] != "assistant":
            _fail(where, f"{fld}[0].role", "a response must start with an assistant message")
    if not "".join(m["content"] for m in msgs if m["role"] == "assistant").strip():
        _fail(where, fld, "empty response")
    return msgs


def parse_prompt(prompt, where: str) -> list[dict]:
    """A prompt: text (one user turn) or messages that do not end with the assistant's."""
    if isinstance(prompt, str):
        if not prompt.strip():
            _fail(where, "prompt", "empty")
        return [{"role": "user", "content": prompt}]
    prompt = _messages(prompt, where, "prompt")
    if prompt[-1]["role"] == "assistant":
        _fail(where, f"prompt[{len(prompt) - 1}].role", "the prompt must not end with an assistant message")
    return prompt


def parse_preference(obj, where: str) -> PreferenceRecord:
    """-> PreferenceRecord with responses ranked best first. Duplicates are left to the caller."""
    if not isinstance(obj, dict):
        _fail(where, "record", f"must be a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj:
        _fail(where, "prompt", "missing")
    prompt = parse_prompt(obj["prompt"], where)
    if "responses" in obj:
        raw = obj["responses"]
        if not isinstance(raw, list) or len(raw) < 2:
            _fail(where, "responses", "must be a list of at least 2 responses, ranked best first")
        responses = [_response(r, where, f"responses[{i}]") for i, r in enumerate(raw)]
    else:
        for key in ("chosen", "rejected"):
            if key not in obj:
                _fail(where, key, "missing (give 'responses', or 'chosen' and 'rejected')")
        keys = (["edited"] if obj.get("edited") is not None else []) + ["chosen", "rejected"]
        responses = [_response(obj[k], where, k) for k in keys]
    strength = obj.get("strength")
    if strength is not None and strength not in STRENGTHS:
        _fail(where, "strength", f"must be one of {', '.join(STRENGTHS)}, got {strength!r}")
    return PreferenceRecord(prompt, responses, strength)
