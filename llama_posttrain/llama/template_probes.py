"""How a Jinja chat template is recognized: the probe dialogs it must render as one of our formats does
(llama_posttrain/llama/chat.py recognize_template), rendered as transformers renders them, and why one that
renders otherwise is refused. jinja2 is needed here only (not for Llama 3's own templates)."""

from __future__ import annotations

from datetime import datetime

from llama_posttrain.llama.template_chat import content_spans, environment

# A chat template is recognized by what it renders: the probe dialogs below (with and without a system
# prompt, several turns, with and without the generation prompt, contents wrapped in whitespace that the
# formats strip), rendered as transformers renders them, must give exactly the text of our ChatFormat's
# ids. Once with `date_string` passed (PROBE_DATE); once without, where 3.1 writes its own default date
# (DEFAULT_DATE) and 3.2 today's (strftime_now, fixed here to PROBE_TODAY): that tells 3.1 from 3.2.
PROBES = (
    ([{"role": "user", "content": " What is 2 + 2?\n"}], True),
    (
        [
            {"role": "system", "content": "You are terse.\n"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "  Hello.  "},
            {"role": "user", "content": "Count to 3, please."},
        ],
        True,
    ),
    (
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a\n\n"},
        ],
        False,
    ),
    (
        [
            {"role": "user", "content": "Traduis \u00ab bonjour \u00bb."},
            {"role": "assistant", "content": "\u3053\u3093\u306b\u3061\u306f"},
            {"role": "user", "content": "\n```python\nprint(1)\n```"},
            {"role": "assistant", "content": "1"},
        ],
        False,
    ),
)
PROBE_DATE = "5 May 2030"  # passed as date_string
PROBE_TODAY = (2031, 11, 15)  # what strftime_now returns when it is not ("15 Nov 2031")


def render_probes(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The probe dialogs rendered by the Jinja template `text` as transformers' apply_chat_template renders
    them (sandboxed, trim_blocks, lstrip_blocks, `{% generation %}` blocks, tojson, raise_exception,
    strftime_now): -> (with date_string=PROBE_DATE, without). ImportError without jinja2; the template's
    own errors (jinja2.TemplateError and what its expressions raise) propagate."""

    env = environment()
    env.globals["strftime_now"] = lambda fmt: datetime(*PROBE_TODAY).strftime(fmt)  # a fixed "today"
    template = env.from_string(text)
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "tools": None, "documents": None}

    def render(**kw):
        return tuple(template.render(messages=m, add_generation_prompt=gen, **special, **kw) for m, gen in PROBES)

    return render(date_string=PROBE_DATE), render()


def check_own_template(text: str) -> None:
    """A model's own template must write each probe's message contents once, as given or stripped."""
    template = environment().from_string(text)
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    for messages, gen in PROBES:
        content_spans(lambda ms, g=gen: template.render(messages=ms, add_generation_prompt=g, **special), messages)


def mismatch(rendered, expected) -> str:
    """Why a template that renders none of our formats is refused: where it first differs from the format
    it follows longest."""
    got = rendered[0] + rendered[1]
    closest = None  # (probe index, common prefix length, name)
    for name in expected:  # the Llama 3 names, in order
        want = expected[name][0] + expected[name][1]
        i = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        at = next((k for k, (x, y) in enumerate(zip(got[i], want[i])) if x != y), min(len(got[i]), len(want[i])))
        if closest is None or (i, at) > closest[:2]:  # a tie goes to the first name (3.1 before 3.2)
            closest = (i, at, name)
    i, at, name = closest
    want = (expected[name][0] + expected[name][1])[i]
    probe = f"probe dialog {i % len(PROBES)} " + (f"(date_string={PROBE_DATE!r})" if i < len(PROBES) else "(no date)")
    return (
        f"it renders none of the Llama 3 formats ({', '.join(expected)}); closest, {name}: on {probe} it writes "
        f"{got[i][max(0, at - 30) : at + 40]!r} where {name} writes {want[max(0, at - 30) : at + 40]!r}"
    )
