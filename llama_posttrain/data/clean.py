"""Cleaning heuristics for generated (rejection-sampled) text: pure functions of the text.

Llama 3 cleans its rejection-sampled data "with some heuristics"; these are the ones llama_posttrain/jobs/sample.py
applies to every sample (`CleanRules`, each rule off unless its flag is given, each drop counted):

- repetition loops (`--max-repeat FRACTION`, `--repeat-ngram N`): `repeat_fraction` is the fraction of
  the sample's words (`text.split()`: runs of non-whitespace) that lie inside some word N-gram
  occurring at least twice in the sample (Gopher's "duplicate n-gram" fraction, counted in words, not
  characters). Occurrences may overlap ("ha ha ha ha" at N = 3: both 3-grams are "ha ha ha", so all 4
  words are covered). A sample with fewer than N + 1 words has no repeated N-gram: 0. A sample is
  dropped when the fraction is MORE than FRACTION. Text without spaces (e.g. Chinese) is one word.
- banned phrases (`--ban-phrase TEXT`, repeatable): the phrase anywhere in the sample, compared after
  str.casefold() on both (case-insensitive, "STRASSE" matches "straße").
- emoji (`--max-emoji N`): more than N emoji, counted by `count_emoji` (below).
- exclamation marks (`--max-exclamation N`): more than N of "!" and the full-width "！".
Duplicate SFT picks (`--dedup`) are found with `dedup_key`: the prompt's messages and the response
text with its surrounding whitespace stripped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

# Emoji code points: the supplementary-plane symbol blocks U+1F000-U+1FAFF (cards, enclosed alphanumerics,
# emoticons, pictographs, transport, supplemental and extended-A symbols), miscellaneous symbols and dingbats
# U+2600-U+27BF, the BMP emoji outside them (watch, hourglass, media buttons, star, circle, arrows, wavy dash),
# and the regional indicators (a flag is two of them: counted once).
EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF))
EMOJI_BMP = {0x231A, 0x231B, 0x2328, 0x23CF, *range(0x23E9, 0x23F4), *range(0x23F8, 0x23FB), 0x2B05, 0x2B06, 0x2B07}
EMOJI_BMP |= {0x2B1B, 0x2B1C, 0x2B50, 0x2B55, 0x3030, 0x303D, 0x3297, 0x3299}
REGIONAL = (0x1F1E6, 0x1F1FF)
# Parts of an emoji that are not emoji of their own: skin tones, the variation selector, the joiner, tags.
MODIFIERS = {*range(0x1F3FB, 0x1F400), 0xFE0E, 0xFE0F, *range(0xE0020, 0xE0080)}
ZWJ = 0x200D
EXCLAMATIONS = ("!", "\uff01")


def repeat_fraction(text: str, n: int = 3) -> float:
    """Fraction of the words of `text` covered by a word n-gram that occurs at least twice in it."""
    if n < 1:
        raise ValueError(f"n-gram size must be >= 1, got {n}")
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = [True] * n
    return sum(covered) / len(words) if words else 0.0


def count_emoji(text: str) -> int:
    """Emoji in `text`: code points in EMOJI_RANGES or EMOJI_BMP, where a sequence joined by U+200D (a family, a
    profession) counts once, a flag (two regional indicators) once, and skin-tone modifiers, variation
    selectors and tag characters not at all."""
    count, i, cps = 0, 0, [ord(c) for c in text]
    while i < len(cps):
        cp = cps[i]
        joined = i > 0 and cps[i - 1] == ZWJ
        if REGIONAL[0] <= cp <= REGIONAL[1]:
            count += 1
            i += 2 if i + 1 < len(cps) and REGIONAL[0] <= cps[i + 1] <= REGIONAL[1] else 1
            continue
        emoji = cp in EMOJI_BMP or any(lo <= cp <= hi for lo, hi in EMOJI_RANGES)
        if emoji and cp not in MODIFIERS and not joined:
            count += 1
        i += 1
    return count


def count_exclamations(text: str) -> int:
    return sum(text.count(mark) for mark in EXCLAMATIONS)


def banned_phrase(text: str, phrases) -> str | None:
    """The first of `phrases` found in `text` (case-insensitive), or None."""
    folded = text.casefold()
    return next((p for p in phrases if p.casefold() in folded), None)


@dataclass(frozen=True)
class CleanRules:
    """The sample filters; None (or no phrases) turns a rule off: the default turns them all off."""

    max_repeat: float | None = None  # drop when repeat_fraction(text, repeat_ngram) > max_repeat
    repeat_ngram: int = 3
    ban_phrases: tuple[str, ...] = ()
    max_emoji: int | None = None  # drop when count_emoji(text) > max_emoji
    max_exclamation: int | None = None  # drop when count_exclamations(text) > max_exclamation

    def __post_init__(self):
        if self.max_repeat is not None and not 0 <= self.max_repeat <= 1:
            raise ValueError(f"max_repeat: a fraction in [0, 1], got {self.max_repeat!r}")
        if self.repeat_ngram < 1:
            raise ValueError(f"repeat_ngram: must be >= 1, got {self.repeat_ngram!r}")
        if any(not p.strip() for p in self.ban_phrases):
            raise ValueError("ban_phrases: an empty phrase would ban every sample")
        for name in ("max_emoji", "max_exclamation"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")


# The reasons `reject_reason` returns, in the order the rules are checked (llama_posttrain/data/drops.py DROPS keys).
RULES = ("repetition", "banned_phrase", "too_many_emoji", "too_many_exclamations")


def reject_reason(text: str, rules: CleanRules) -> str | None:
    """The first rule (a RULES key) that `text` breaks, or None."""
    if rules.max_repeat is not None and repeat_fraction(text, rules.repeat_ngram) > rules.max_repeat:
        return "repetition"
    if rules.ban_phrases and banned_phrase(text, rules.ban_phrases) is not None:
        return "banned_phrase"
    if rules.max_emoji is not None and count_emoji(text) > rules.max_emoji:
        return "too_many_emoji"
    if rules.max_exclamation is not None and count_exclamations(text) > rules.max_exclamation:
        return "too_many_exclamations"
    return None


def dedup_key(prompt: list[dict], response: str) -> str:
    """What two SFT picks share when one duplicates the other: the prompt messages, the response stripped."""
    return json.dumps([prompt, response.strip()], sort_keys=True)
