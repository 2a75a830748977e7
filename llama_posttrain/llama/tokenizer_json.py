"""Hugging Face byte-level BPE `tokenizer.json` files, read exactly as the `tokenizers` library reads them.

Two readers, one file format:
- a file in tiktoken's own form (Llama 3's, and what llama_posttrain/llama/formats/hf.py writes): every split of
  a token into two tokens is a merge, listed in the order of the results' ids, Split(regex) then
  ByteLevel(use_regex=false), the added tokens after the vocabulary. tiktoken merges the adjacent pair whose
  result has the lowest id, which on such a file is `tokenizers`' rule (the lowest merge): it runs there, in Rust.
- any other byte-level BPE (GPT-2, SmolLM2, Qwen, ... trained by `tokenizers` itself: one merge per token, so
  tiktoken's rule would merge pairs `tokenizers` never does): `BPETokenizer`, the algorithm of `tokenizers`
  in Python, a cache of pieces in front of it.

What is read (anything else is refused, naming the file and the field): model.type BPE without dropout, byte
fallback, subword prefixes or suffixes; no normalizer; pre_tokenizer a Sequence of Split (a regex or string;
behavior Isolated, Removed, MergedWithPrevious, MergedWithNext or Contiguous; not inverted), Digits and a last
ByteLevel; added tokens without lstrip, rstrip or single_word; ids 0..n-1 without gaps. Special added tokens
are split out of text only with `allow_special=True`; added tokens that are not special always, as `tokenizers`
does. bos / eos: Llama 3's names when present, else tokenizer_config.json beside the file (`bos_token`,
`eos_token`), else the post_processor's first special token for bos.
"""

from __future__ import annotations

import json
from pathlib import Path

import regex

from llama_posttrain.llama.tokenizer_kinds import TiktokenTokenizer, Tokenizer, bytes_to_unicode

HINT = "only byte-level BPE tokenizer.json files are read; for SentencePiece pass tokenizer.model"
# tokenizers' ByteLevel(use_regex=true) pattern (GPT-2's)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BEHAVIORS = ("Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous")
_CACHE_SIZE = 200_000  # pieces -> ids kept by BPETokenizer (tokenizers keeps 10k)


class TokenizerJsonError(ValueError):
    pass


def load_tokenizer_json(path: Path) -> Tokenizer:
    """A tokenizer.json -> a TiktokenTokenizer where tiktoken reproduces `tokenizers` exactly, else a BPETokenizer."""
    path = Path(path)

    def fail(fld: str, problem: str):
        raise TokenizerJsonError(f"{path}: {fld}: {problem} ({HINT})")

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerJsonError(f"{path}: cannot read it as JSON: {e}") from None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        fail("model.type", f"expected BPE, got {model.get('type') if isinstance(model, dict) else model!r}")
    if raw.get("normalizer") is not None:
        fail("normalizer", f"{raw['normalizer'].get('type')!r} is not supported (none is)")
    for key, ok in (
        ("byte_fallback", False),
        ("dropout", None),
        ("continuing_subword_prefix", ""),
        ("end_of_word_suffix", ""),
    ):
        if model.get(key) not in (ok, None):
            fail(f"model.{key}", f"{model[key]!r} is not supported")
    steps = pre_tokenizer_steps(raw.get("pre_tokenizer"), fail)
    decoder = raw.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        fail("decoder", f"expected ByteLevel, got {decoder.get('type')!r}")
    ranks = byte_vocab(model.get("vocab"), fail)
    merges = read_merges(model.get("merges") or [], model["vocab"], fail)
    added, special = read_added_tokens(raw.get("added_tokens") or [], ranks, fail)
    n = len(set(ranks.values()) | set(added.values()))
    if sorted(set(ranks.values()) | set(added.values())) != list(range(n)):
        fail("added_tokens", f"the ids of model.vocab and added_tokens must be 0..{n - 1} without gaps")
    bos, eos = _bos_eos(path, raw, added, fail)
    pattern = _tiktoken_pattern(steps, ranks, merges, added, special, model)
    if pattern is not None and (bos, eos) == ("<|begin_of_text|>", "<|end_of_text|>"):
        return TiktokenTokenizer(path, ranks, added, pattern)
    return BPETokenizer(path, raw, steps, ranks, merges, added, special, bos, eos, bool(model.get("ignore_merges")))


# ----------------------------------------------------------------------------- fields


def pre_tokenizer_steps(pre, fail) -> list[dict]:
    """The pre-tokenizer as a list of steps, the last a ByteLevel (else the vocabulary is not byte-level)."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    for i, step in enumerate(steps):
        fld = (
            f"pre_tokenizer.pretokenizers[{i}]" if len(steps) > 1 or pre.get("type") == "Sequence" else "pre_tokenizer"
        )
        kind = step.get("type") if isinstance(step, dict) else None
        if kind == "Split":
            if step.get("invert") or step.get("behavior") not in BEHAVIORS:
                fail(fld, f"Split with invert={step.get('invert')} behavior={step.get('behavior')!r} is not supported")
            pattern = step.get("pattern") or {}
            if not ({"Regex", "String"} & set(pattern)):
                fail(fld, f"Split pattern {pattern!r} is neither a Regex nor a String")
            try:
                regex.compile(pattern.get("Regex") or regex.escape(pattern["String"]))
            except regex.error as e:
                fail(fld, f"its regex does not compile: {e}")
        elif kind == "ByteLevel":
            if i != len(steps) - 1:
                fail(fld, "ByteLevel before another step is not supported (it must come last)")
        elif kind != "Digits":
            fail(fld, f"expected Split, Digits or a last ByteLevel, got {kind!r}")
    if not steps or steps[-1].get("type") != "ByteLevel":
        fail("pre_tokenizer", "no ByteLevel step at the end: the vocabulary is not byte-level")
    return steps


def byte_vocab(vocab, fail) -> dict[bytes, int]:
    """model.vocab (byte-level stand-in characters) -> {token bytes: id}. Bytes never seen in training may have
    no token (SmolLM2 lacks 21 control bytes): `tokenizers` drops them from the text, BPETokenizer refuses."""
    if not isinstance(vocab, dict):
        fail("model.vocab", "expected an object {token: id}")
    to_latin1 = {ord(c): b for b, c in bytes_to_unicode().items()}
    to_latin1 = {b: 0xFFFF for b in range(256) if b not in to_latin1} | to_latin1
    ranks = {}
    for token, i in vocab.items():
        try:
            ranks[token.translate(to_latin1).encode("latin-1")] = i
        except UnicodeEncodeError:
            fail("model.vocab", f"token {token!r} is not byte-level")
    return ranks


def read_merges(merges: list, vocab: dict[str, int], fail) -> dict[tuple[bytes, bytes], int]:
    """model.merges ("a b" strings or [a, b] pairs) -> {(a bytes, b bytes): priority}; each result in the vocabulary."""
    to_bytes = {c: b for b, c in bytes_to_unicode().items()}
    out = {}
    for i, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2 or any(p not in vocab for p in pair) or pair[0] + pair[1] not in vocab:
            fail(f"model.merges[{i}]", f"{merge!r}: its parts or its result are not in model.vocab")
        key = tuple(bytes(to_bytes[c] for c in p) for p in pair)
        out.setdefault(key, i)
    return out


def read_added_tokens(tokens: list, ranks: dict[bytes, int], fail) -> tuple[dict[str, int], set[str]]:
    """added_tokens -> ({content: id}, the special ones). An added token in model.vocab keeps its id there."""
    added, special = {}, set()
    for i, t in enumerate(tokens):
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not isinstance(t.get("id"), int):
            fail(f"added_tokens[{i}]", f"expected {{'id': int, 'content': str, ...}}, got {t!r}")
        for flag in ("lstrip", "rstrip", "single_word"):
            if t.get(flag):
                fail(f"added_tokens[{i}]", f"{t['content']!r} has {flag}=true, which is not supported")
        added[t["content"]] = t["id"]
        if t.get("special", True):
            special.add(t["content"])
    return added, special


def _bos_eos(path: Path, raw: dict, added: dict[str, int], fail) -> tuple[str | None, str]:
    if "<|begin_of_text|>" in added and "<|end_of_text|>" in added:
        return "<|begin_of_text|>", "<|end_of_text|>"
    config, names = path.parent / "tokenizer_config.json", {}
    if config.is_file():
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise TokenizerJsonError(f"{config}: cannot read it as JSON: {e}") from None
        for key in ("bos_token", "eos_token"):
            value = cfg.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and value not in added:
                raise TokenizerJsonError(f"{config}: {key}: {value!r} is not an added token of {path}")
            names[key] = value
    if names.get("bos_token") is None:
        single = ((raw.get("post_processor") or {}).get("single")) or []
        first = single[0] if single else {}
        names["bos_token"] = first.get("SpecialToken", {}).get("id") if isinstance(first, dict) else None
    if names.get("eos_token") is None:
        raise TokenizerJsonError(
            f"{path}: no end-of-text token: neither Llama 3's <|end_of_text|> nor an eos_token in {config}"
        )
    return names["bos_token"], names["eos_token"]


def _tiktoken_pattern(steps, ranks, merges, added, special, model) -> str | None:
    """The split regex if tiktoken gives `tokenizers`' ids on this file (see the module docstring), else None."""
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[0].get("behavior") != "Isolated":
        return None
    if "Regex" not in steps[0]["pattern"] or steps[1].get("use_regex", True) or steps[1].get("add_prefix_space"):
        return None
    if set(added) != special or sorted(added.values()) != list(range(len(ranks), len(ranks) + len(added))):
        return None
    last = -1
    for a, b in merges:  # in priority order (dicts keep insertion order)
        if ranks[a + b] < last:
            return None
        last = ranks[a + b]
    splits = sum(t[:k] in ranks and t[k:] in ranks for t in ranks for k in range(1, len(t)))
    return steps[0]["pattern"]["Regex"] if splits == len(merges) else None


# ----------------------------------------------------------------------------- pre-tokenizers


def _split(pieces: list[str], pattern: regex.Pattern, behavior: str) -> list[str]:
    """tokenizers' Split on each piece: the matches of `pattern` are delimiters handled per `behavior`."""
    out = []
    for piece in pieces:
        spans, pos = [], 0  # (text, is_match)
        for m in pattern.finditer(piece):
            if m.end() == m.start():
                continue
            if m.start() > pos:
                spans.append((piece[pos : m.start()], False))
            spans.append((m.group(), True))
            pos = m.end()
        if pos < len(piece):
            spans.append((piece[pos:], False))
        if behavior == "Isolated":
            out += [s for s, _ in spans]
        elif behavior == "Removed":
            out += [s for s, is_match in spans if not is_match]
        elif behavior == "Contiguous":
            merged = []
            for s, is_match in spans:
                if merged and is_match and merged[-1][1]:
                    merged[-1] = (merged[-1][0] + s, True)
                else:
                    merged.append((s, is_match))
            out += [s for s, _ in merged]
        elif behavior == "MergedWithPrevious":
            merged = []
            for s, is_match in spans:
                if is_match and merged and not merged[-1][1]:
                    merged[-1] = (merged[-1][0] + s, True)
                else:
                    merged.append((s, is_match))
            out += [s for s, _ in merged]
        else:  # MergedWithNext: a match joins the piece after it if that is not a match
            i = 0
            while i < len(spans):
                s, is_match = spans[i]
                if is_match and i + 1 < len(spans) and not spans[i + 1][1]:
                    s, i = s + spans[i + 1][0], i + 1
                out.append(s)
                i += 1
    return out


def _step_function(step: dict):
    """One pre-tokenizer step as a function from pieces to pieces."""
    kind = step["type"]
    if kind == "Split":
        p = step["pattern"]
        pattern = regex.compile(p["Regex"] if "Regex" in p else regex.escape(p["String"]))
        return lambda pieces: _split(pieces, pattern, step["behavior"])
    if kind == "Digits":
        digits = regex.compile(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        return lambda pieces: _split(pieces, digits, "Isolated")
    gpt2 = regex.compile(GPT2_PATTERN) if step.get("use_regex", True) else None
    prefix = bool(step.get("add_prefix_space"))

    def byte_level(pieces):
        if prefix:
            pieces = [s if s.startswith(" ") else " " + s for s in pieces]
        return _split(pieces, gpt2, "Isolated") if gpt2 is not None else pieces

    return byte_level


# ----------------------------------------------------------------------------- the BPE


class BPETokenizer(Tokenizer):
    """A byte-level BPE tokenizer.json run as `tokenizers` runs it: added tokens split out, the pre-tokenizer
    steps, then per piece the adjacent pair listed first in model.merges is merged until none is listed
    (with model.ignore_merges, a piece that is a token is that token). `raw` is the file, written back as is."""

    def __init__(self, path, raw, steps, ranks, merges, added, special, bos: str | None, eos: str, ignore_merges):
        self.path, self.raw = Path(path), raw
        self._args = (path, raw, steps, ranks, merges, added, special, bos, eos, ignore_merges)
        self.ranks, self.merges, self.ignore_merges = ranks, merges, ignore_merges
        self.added_tokens = dict(added)  # every added token; special_tokens: the special ones
        self.special_tokens = {t: i for t, i in added.items() if t in special}
        self.vocab_size = len(set(ranks.values()) | set(added.values()))
        self.bos_id = added[bos] if bos is not None else None
        self.eos_id = added[eos]
        self._steps = [_step_function(s) for s in steps]
        self._id_bytes = {i: b for b, i in ranks.items()} | {i: t.encode() for t, i in added.items()}
        always = [t for t in added if t not in special]
        self._always = _alternation(always)
        self._all = _alternation(list(added))
        self._cache: dict[bytes, list[int]] = {}

    def __reduce__(self):  # pickled into data-preparation workers (the pre-tokenizer steps are closures)
        return (BPETokenizer, self._args)

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if bos and self.bos_id is None:
            raise ValueError(f"{self.path}: no bos_token (tokenizer_config.json names none): cannot add one")
        return super().encode(text, bos, eos, allow_special)

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        found = self._all if allow_special else self._always
        ids, start = [], 0
        if found is not None:
            for m in found.finditer(text):
                ids += self._encode_ordinary(text[start : m.start()])
                ids.append(self.added_tokens[m.group()])
                start = m.end()
        return ids + self._encode_ordinary(text[start:])

    def _encode_ordinary(self, text: str) -> list[int]:
        if not text:
            return []
        pieces = [text]
        for step in self._steps:
            pieces = step(pieces)
        ids = []
        for piece in pieces:
            b = piece.encode("utf-8")
            cached = self._cache.get(b)
            if cached is None:
                if len(self._cache) >= _CACHE_SIZE:
                    self._cache.clear()
                cached = self._cache[b] = self._bpe(b)
            ids += cached
        return ids

    def _bpe(self, piece: bytes) -> list[int]:
        if self.ignore_merges and piece in self.ranks:
            return [self.ranks[piece]]
        parts = [piece[i : i + 1] for i in range(len(piece))]
        merges = self.merges
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                rank = merges.get((parts[i], parts[i + 1]))
                if rank is not None and (best is None or rank < best):
                    best, at = rank, i
            if best is None:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        try:
            return [self.ranks[p] for p in parts]
        except KeyError:
            bad = next(p for p in parts if p not in self.ranks)
            raise ValueError(
                f"{self.path}: the text holds byte {bad!r}, which has no token in model.vocab (`tokenizers` would "
                f"drop it silently): remove it from the text"
            ) from None

    def _decode(self, ids: list[int]) -> str:
        return b"".join(self._id_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self._id_bytes[i]


def _alternation(tokens: list[str]) -> regex.Pattern | None:
    """Leftmost-longest match of any of `tokens` (tokenizers' added-token matcher)."""
    if not tokens:
        return None
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))
