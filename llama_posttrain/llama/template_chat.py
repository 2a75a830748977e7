"""Any model's own Jinja chat template (ChatML, Zephyr, ...), with per-token roles derived from its rendering.

The template is rendered as transformers' apply_chat_template renders it (`render`: jinja2's sandbox with
trim_blocks, lstrip_blocks, `{% generation %}`, loopcontrols, tojson, raise_exception, strftime_now; the
tokenizer's bos_token and eos_token). Which characters are message content is found by rendering the dialog a
second time with each content replaced by a sentinel: the real rendering must be the sentinel rendering with
each sentinel replaced by its content, as written or stripped (`trim`); anything else (a template that drops,
repeats or rewrites a content) is an error naming the message. The rendering is then tokenized as transformers
tokenizes it (special tokens parsed in the formatting, never in a content, so that content cannot forge a turn),
and each token's bytes are matched to the content spans:
- content: a token overlapping a message's content (is_format False; a target if the message is the assistant's);
- formatting: every other token (headers, role names, turn terminators, default system prompts), but a
  leading bos token (as the Llama 3 formats: `is_format` False, not a target);
- the end of turn (`eot_id`): the token right after an assistant content, which must be a special token of the
  tokenizer (<|im_end|> for ChatML, </s> for Zephyr): a target, and the stop token of generation.
On Llama 3's templates this gives the rows of llama_posttrain/llama/chat.py's ChatFormat (tested); those keep
their own code (the 3.1 date, <|eom_id|>). jinja2 is needed here only (not for Llama 3's templates).
"""

from __future__ import annotations

import json
import re
from datetime import datetime

SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters around a message index


def environment():
    """jinja2's environment as transformers' apply_chat_template builds it. ImportError without jinja2."""
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class Generation(jinja2.ext.Extension):  # transformers' assistant-mask markers: render the body as is
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def content_spans(render, messages: list[dict]) -> tuple[str, list[tuple[int, int, int]]]:
    """`render(messages) -> text` -> (the text, [(start, end, message index)] of each content in it, in order)."""
    marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    layout, text = render(marked), render(messages)
    found = [(m.start(), m.end(), int(m.group(1))) for m in SENTINEL.finditer(layout)]
    seen = [i for _, _, i in found]
    for i, m in enumerate(messages):
        if seen.count(i) > 1 or (seen.count(i) == 0 and m["content"]):
            what = "repeats" if seen.count(i) > 1 else "drops"
            raise ValueError(f"the template {what} the content of message {i} ({m['role']!r})")
    literals = [layout[a:b] for a, b in zip([0] + [e for _, e, _ in found], [s for s, _, _ in found] + [len(layout)])]
    spans, pos = [], 0
    for k, (_, _, i) in enumerate(found):
        if not text.startswith(literals[k], pos):
            break
        pos += len(literals[k])
        c = messages[i]["content"]
        written = next(
            (t for t in (c, c.strip(), c.lstrip(), c.rstrip()) if text.startswith(t + literals[k + 1], pos)), None
        )
        if written is None:
            raise ValueError(
                f"the template writes the content of message {i} ({messages[i]['role']!r}) otherwise than as "
                "given or stripped"
            )
        spans.append((pos, pos + len(written), i))
        pos += len(written)
    if len(spans) != len(found) or text[pos:] != literals[-1]:
        raise ValueError("the template's text around the message contents depends on the contents")
    return text, spans
