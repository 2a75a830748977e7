"""The argparse pieces of the flag-style entry points (llama_posttrain/jobs/sample.py, llama_posttrain/jobs/evaluate.py): value types that
name the option in their errors, and a help formatter that shows every default."""

from __future__ import annotations

import argparse
import json


def at_least(low, kind=int):
    """An argparse type: a number >= low."""

    def parse(text):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


fraction.__name__ = "float"


def json_object(text: str) -> dict:
    """An argparse type: a JSON object (--task-args)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"max_digits\": 1}}', got {text!r}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` with the module docstring as written and every option's default (`(default: 16)`), where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS:
            text += "" if "%(default)" in text else " (default: %(default)s)"
        return text.strip()
