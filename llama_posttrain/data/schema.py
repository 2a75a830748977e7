"""Record schemas and their validation.

SFT:        {"messages": [{"role": "system"|"user"|"assistant"|"ipython", "content": str}, ...]}
            {"text": str}  plain text, every token a target (pre-training the tiny experiment models)
Preference: {"prompt": str | messages, "responses": [response, ...], "strength": ...}  ranked best first
            {"prompt": ..., "responses": [...], "scores": [number, ...]}  one finite score per response,
            higher better: the responses are ranked by them (a stable sort). A response whose score ties a
            better-ranked one's carries no preference against it: it is dropped and counted ("dropped:
            responses tied with another's score"); fewer than 2 left, the record is ("dropped: tied scores").
            A set of samples to label (llama_posttrain/jobs/sample.py --out-sets: "rm_scores" beside the
            responses, in sampling order) is not a ranking: refused, saying to label it or give "scores".
            {"prompt": ..., "chosen": response, "rejected": response, "edited": response?}
            (edited > chosen > rejected)
            {"chosen": messages, "rejected": messages}  TRL's implicit prompt: whole conversations that
            share their prompt messages; split at the longest common message prefix (a shared leading
            assistant turn stays in the responses, so the prompt ends with a user/system/tool turn).
            A `prompt` given beside them (UltraFeedback's column) is not the prompt: the shared messages
            are (as TRL's maybe_extract_prompt takes them). As text it must equal the content of their
            last user message, as messages the shared messages; else an error that says to drop it.
            "score_chosen", "score_rejected": numbers (UltraFeedback); the higher-scored response is the
            better one, whatever its key. Equal scores carry no preference: the record is dropped and
            counted ("dropped: tied scores"), not an error.
A response is the assistant's text, or a list of messages that continues the prompt (its first
message from the assistant). Every assistant message of an SFT dialog or a response is trained on, so
an empty one (whitespace only) is an error, `messages[i].content: empty assistant message` (a counted
skip with skip_invalid), not an end of turn learned from nothing. `strength` says how much better the best response is than the next:
significantly_better > better > slightly_better > marginally_better. Llama 3 trains the reward
model and DPO only on the first two levels (`keep_strengths`).

A null field (JSON null; what Parquet / Arrow hold where a record has no value: llama_posttrain/data/records.py
leaves those keys out) is an absent one: optional, it is not given; required, it is `missing`.

Every problem is reported as `file:line: field: problem`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "ipython", "tool")
STRENGTHS = ("significantly_better", "better", "slightly_better", "marginally_better")


class ValidationError(ValueError):
    pass


class Drop(Exception):
    """A well-formed record with nothing to train on; the message is the reason the loader counts."""


@dataclass
class SFTRecord:
    messages: list[dict] | None = None
    text: str | None = None


@dataclass
class PreferenceRecord:
    prompt: list[dict]
    responses: list[list[dict]]  # ranked best first, each a list of messages
    strength: str | None = None
    tied: int = 0  # responses dropped because their score ties a better-ranked one's ("scores")


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
        if m.get("tool_calls") not in (None, []):  # dropping them would train on an empty turn
            _fail(where, f"{f}.tool_calls", "tool calls are not supported (the content is the whole message)")
        if m.get("role") not in ROLES:
            _fail(where, f"{f}.role", f"must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            _fail(where, f"{f}.content", f"must be a string, got {type(m.get('content')).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _no_tools(obj: dict, where: str) -> None:
    """TRL's `tools` (function definitions the chat template writes into a turn): not supported."""
    if obj.get("tools"):  # null or [] (a dataset column without tools in this row) is fine
        _fail(where, "tools", "tool definitions are not supported: the chat formats here write no tools")


def _given(obj: dict) -> dict:
    """A record without its null fields: a null is an absent field (a JSON null, an Arrow null)."""
    return {k: v for k, v in obj.items() if v is not None}


def parse_sft(obj, where: str) -> SFTRecord:
    if not isinstance(obj, dict):
        _fail(where, "record", f"must be a JSON object, got {type(obj).__name__}")
    obj = _given(obj)
    _no_tools(obj, where)
    if "text" in obj and "messages" not in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            _fail(where, "text", "must be a non-empty string")
        return SFTRecord(text=obj["text"])
    if "messages" not in obj:
        _fail(where, "messages", "missing (or give 'text' for plain text)")
    messages = _messages(obj["messages"], where, "messages")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        _fail(where, "messages", "no non-empty assistant message to train on")
    _no_empty_assistant(messages, where, "messages")
    return SFTRecord(messages)


def _no_empty_assistant(messages: list[dict], where: str, fld: str) -> None:
    """An assistant turn is trained on: an empty one would teach an immediate end of turn."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            _fail(
                where,
                f"{fld}[{i}].content",
                "empty assistant message (it would be trained as an immediate end of turn)",
            )


def _response(value, where: str, fld: str) -> list[dict]:
    if isinstance(value, str):
        msgs = [{"role": "assistant", "content": value}]
    else:
        msgs = _messages(value, where, fld)
        if msgs[0]["role"] != "assistant":
            _fail(where, f"{fld}[0].role", "a response must start with an assistant message")
    if not "".join(m["content"] for m in msgs if m["role"] == "assistant").strip():
        _fail(where, fld, "empty response")
    _no_empty_assistant(msgs, where, fld)
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
    """-> PreferenceRecord with responses ranked best first. Duplicates are left to the caller;
    raises Drop for a record whose scores tie."""
    if not isinstance(obj, dict):
        _fail(where, "record", f"must be a JSON object, got {type(obj).__name__}")
    obj = _given(obj)
    _no_tools(obj, where)
    keys = (["edited"] if obj.get("edited") is not None else []) + ["chosen", "rejected"]
    tied = 0
    if "responses" not in obj and _is_implicit(obj):
        prompt, responses = _split_implicit_prompt(obj, keys, where)
    else:
        if "prompt" not in obj:
            _fail(where, "prompt", "missing (or give chosen and rejected as whole conversations sharing the prompt)")
        prompt = parse_prompt(obj["prompt"], where)
        if "responses" in obj:
            raw = obj["responses"]
            if not isinstance(raw, list) or len(raw) < 2:
                _fail(where, "responses", "must be a list of at least 2 responses, ranked best first")
            responses = [_response(r, where, f"responses[{i}]") for i, r in enumerate(raw)]
            if "scores" in obj:
                responses, tied = _rank_by_scores(obj["scores"], responses, where)
            elif "rm_scores" in obj:
                _fail(
                    where,
                    "responses",
                    "a set of samples to label (sample.py --out-sets: 'rm_scores', responses in sampling order), "
                    "not a ranking: label it (--annotate file:labels.jsonl), or give 'scores' to rank by",
                )
        else:
            for key in ("chosen", "rejected"):
                if key not in obj:
                    _fail(where, key, "missing (give 'responses', or 'chosen' and 'rejected')")
            responses = [_response(obj[k], where, k) for k in keys]
    if "score_chosen" in obj or "score_rejected" in obj:
        responses = _order_by_scores(obj, keys, responses, where)
    strength = obj.get("strength")
    if strength is not None and strength not in STRENGTHS:
        _fail(where, "strength", f"must be one of {', '.join(STRENGTHS)}, got {strength!r}")
    return PreferenceRecord(prompt, responses, strength, tied)


def _is_implicit(obj: dict) -> bool:
    """chosen/rejected are whole conversations: lists whose first message is not the assistant's."""
    first = obj.get("chosen")
    return (
        isinstance(first, list) and bool(first) and isinstance(first[0], dict) and first[0].get("role") != "assistant"
    )


def _split_implicit_prompt(obj: dict, keys: list[str], where: str) -> tuple[list[dict], list[list[dict]]]:
    """TRL's implicit prompt: the longest common message prefix of the conversations, without the
    assistant turns at its end (those are shared by the responses). Only the responses may differ."""
    for key in keys:
        if key not in obj:
            _fail(where, key, "missing (give 'chosen' and 'rejected')")
        if not isinstance(obj[key], list):
            _fail(where, key, f"must be a whole conversation like {keys[0]} (a list of messages), got text")
    convs = {k: _messages(obj[k], where, k) for k in keys}
    first, *others = convs.values()
    shared = len(first)
    for conv in others:
        n = 0
        while n < min(shared, len(conv)) and conv[n] == first[n]:
            n += 1
        shared = n
    if shared == 0:
        _fail(where, "/".join(keys), "no shared prompt: the conversations differ from their first message")
    lengths = {len(c) for c in convs.values()}
    if len(lengths) > 1 and shared == min(lengths):  # one conversation ends where the others go on
        short = next(k for k, c in convs.items() if len(c) == shared)
        _fail(where, short, "ends inside the other conversation: no response of its own after the shared prompt")
    for k, conv in convs.items():
        if shared < len(conv) and conv[shared]["role"] != "assistant":
            _fail(
                where,
                f"{k}[{shared}]",
                f"the conversations differ at a {conv[shared]['role']} turn: only the assistant's response may "
                "differ, the earlier turns are the prompt",
            )
    end = shared
    while first[end - 1]["role"] == "assistant":  # first[0] is not (_is_implicit): end stays >= 1
        end -= 1
    if end == len(first):
        _fail(where, "/".join(keys), "identical conversations that end without an assistant response")
    prompt = first[:end]
    if "prompt" in obj:
        _check_prompt_column(obj["prompt"], prompt, " and ".join(keys), where)
    return prompt, [_response(c[end:], where, k) for k, c in convs.items()]


def _check_prompt_column(given, prompt: list[dict], shared: str, where: str) -> None:
    """A `prompt` beside whole conversations (UltraFeedback's column). The messages they share are the
    prompt the model sees, as TRL's maybe_extract_prompt takes them (it ignores a text prompt there); the
    column must agree with them: as text, the content of their last user message (the system turn and
    earlier turns are not in it); as messages, the shared messages themselves."""
    fix = f"drop the 'prompt' column (the messages that {shared} share are the prompt) or make it equal"
    if isinstance(given, str):
        last = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), None)
        if last is not None and given.strip() == last.strip():
            return
        said = f"{_clip(last)!r}" if last is not None else "none: they hold no user message"
        _fail(
            where, "prompt", f"differs from the last user message of the prompt that {shared} share ({said}); {fix} it"
        )
    if parse_prompt(given, where) != prompt:
        _fail(where, "prompt", f"differs from the prompt messages that {shared} share; {fix} them")


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _rank_by_scores(scores, responses: list[list[dict]], where: str) -> tuple[list[list[dict]], int]:
    """`responses` ranked by `scores` (one finite number each, higher better; a stable sort), without the
    responses whose score ties a better one's -> (ranked responses, how many were dropped for a tie).
    Drop if fewer than 2 are left."""
    if not isinstance(scores, list) or len(scores) != len(responses):
        _fail(where, "scores", f"must be a list of one number per response ({len(responses)}), got {scores!r}")
    for i, v in enumerate(scores):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            _fail(where, f"scores[{i}]", f"must be a finite number, got {v!r}")
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    kept = [j for n, j in enumerate(order) if n == 0 or scores[j] != scores[order[n - 1]]]
    if len(kept) < 2:
        raise Drop("tied scores")
    return [responses[j] for j in kept], len(responses) - len(kept)


def _order_by_scores(obj: dict, keys: list[str], responses: list[list[dict]], where: str) -> list[list[dict]]:
    """Rank chosen/rejected by score_chosen/score_rejected, higher first (UltraFeedback)."""
    if "responses" in obj or "edited" in keys:
        _fail(where, "score_chosen", "scores order 'chosen' and 'rejected' only (not 'responses' or 'edited')")
    scores = []
    for key in ("score_chosen", "score_rejected"):
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(where, key, f"must be a finite number (given with the other score), got {value!r}")
        scores.append(value)
    if scores[0] == scores[1]:
        raise Drop("tied scores")
    return responses if scores[0] > scores[1] else responses[::-1]
