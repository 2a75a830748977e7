"""The tokenizer kinds: tiktoken BPE (Llama 3's, plus its 256 special tokens) and SentencePiece, on the small
surface every kind shares (`Tokenizer`); Hugging Face byte-level BPE (llama_posttrain/llama/tokenizer_json.py)
builds on them. Which file is which kind, and which tokenizer a model takes: llama_posttrain/llama/tokenizer.py.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import tiktoken

# Llama 3.1's tokenizer.model has 128000 BPE tokens; the 256 special tokens follow them.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
]
NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
DEFAULT_TOKENIZER = Path(__file__).parent / "assets" / "bytes.tiktoken"  # 256 bytes + 256 specials

# tiktoken's regex gets slow on very long runs of (non-)whitespace; Meta encodes in pieces.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")


class Tokenizer:
    """Interface shared by both kinds. Subclasses set `special_tokens`, `bos_id`, `eos_id`."""

    path: Path
    special_tokens: dict[str, int]
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        ids += self._encode(text, allow_special)
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for {self.path.name} (vocab_size {self.vocab_size})")
        return self._decode(ids)

    def special(self, name: str) -> int:
        """Id of a special token by its string, e.g. "<|eot_id|>"."""
        if name not in self.special_tokens:
            raise KeyError(f"tokenizer {self.path} has no special token {name!r}")
        return self.special_tokens[name]

    # Chat-format tokens, by name.
    @property
    def start_header_id(self) -> int:
        return self.special("<|start_header_id|>")

    @property
    def end_header_id(self) -> int:
        return self.special("<|end_header_id|>")

    @property
    def eot_id(self) -> int:
        return self.special("<|eot_id|>")

    @property
    def eom_id(self) -> int:
        return self.special("<|eom_id|>")

    @property
    def pad_id(self) -> int:
        """A token never trained on, for padding (Llama 3: <|finetune_right_pad_id|>)."""
        return self.special_tokens.get("<|finetune_right_pad_id|>", self.eos_id)

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an assistant turn during generation."""
        names = ("<|eot_id|>", "<|eom_id|>")
        return sorted({self.eos_id} | {self.special_tokens[n] for n in names if n in self.special_tokens})

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError


def read_tiktoken_bpe(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `<base64 token> <rank>` per line, ranks 0..n-1."""
    ranks = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path}:{lineno}: not a tiktoken BPE line '<base64 token> <rank>': {line[:60]!r}"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: BPE ranks are not the contiguous range 0..{len(ranks) - 1}")
    return ranks


def llama3_special_tokens(n_ranks: int) -> dict[str, int]:
    """The 256 Llama 3 special tokens, numbered after the `n_ranks` BPE tokens (a tokenizer.model holds none)."""
    reserved = [
        f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_SPECIAL_TOKENS))
    ]
    return {tok: n_ranks + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS + reserved)}


class TiktokenTokenizer(Tokenizer):
    """A byte-level BPE run by tiktoken: Llama 3's tokenizer.model (BPE ranks; the 256 Llama 3 special
    tokens after them) or, through tokenizer_json.py, a Hugging Face tokenizer.json in tiktoken's own form."""

    def __init__(self, path, ranks: dict[bytes, int] | None = None, special_tokens=None, pattern=LLAMA3_PATTERN):
        self.path = Path(path)
        if ranks is None:
            ranks = read_tiktoken_bpe(self.path)
            special_tokens = llama3_special_tokens(len(ranks))
        self.ranks, self.pattern = ranks, pattern  # kept for hf_tokenizer_json
        self.special_tokens = dict(special_tokens)
        for name in ("<|begin_of_text|>", "<|end_of_text|>"):
            if name not in self.special_tokens:
                raise ValueError(f"{self.path}: no {name} special token: not a Llama 3 tokenizer")
        self.model = tiktoken.Encoding(
            name=self.path.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = len(ranks) + len(self.special_tokens)  # ids are contiguous (checked by the readers)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        allowed = "all" if allow_special else set()
        ids = []
        for start in range(0, len(text), _MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[start : start + _MAX_ENCODE_CHARS], _MAX_RUN_CHARS):
                ids += self.model.encode(piece, allowed_special=allowed, disallowed_special=())
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)

    def token_bytes(self, i: int) -> bytes:
        return self.model.decode_single_token_bytes(i)


def _split_long_runs(s: str, max_run: int):
    """Cut `s` so that no piece holds more than `max_run` consecutive (non-)whitespace chars."""
    start, run, run_is_space = 0, 0, None
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        run = run + 1 if is_space == run_is_space else 1
        run_is_space = is_space
        if run > max_run:
            yield s[start:i]
            start, run = i, 1
    yield s[start:]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (Llama 2 style or a small trained vocabulary).

    Control pieces (e.g. `<|eot_id|>` trained as a control symbol) are the special tokens: SentencePiece
    never produces them from text, and `allow_special=True` splits them out of the text here.
    """

    def __init__(self, path):
        import sentencepiece as spm

        self.path = Path(path)
        self.model = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.model.vocab_size()
        self.special_tokens = {self.model.id_to_piece(i): i for i in range(self.vocab_size) if self.model.is_control(i)}
        self.bos_id = self.model.bos_id()
        self.eos_id = self.model.eos_id()
        named = sorted((t for t in self.special_tokens if t), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, named))) if named else None

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special or self._special_re is None:
            return self.model.encode(text)
        ids, start = [], 0
        for m in self._special_re.finditer(text):
            ids += self.model.encode(text[start : m.start()]) + [self.special_tokens[m.group()]]
            start = m.end()
        return ids + self.model.encode(text[start:])

    def _decode(self, ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            if self.model.is_control(i) and i not in (self.bos_id, self.eos_id):
                out.append(self.model.decode(run) + self.model.id_to_piece(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self.model.decode(run)


# ----------------------------------------------------------------------------- tokenizer.json


def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table; tokenizer.json vocabularies use it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
