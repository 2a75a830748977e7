"""Tokenizers: tiktoken BPE (Llama 3's, plus its 256 special tokens), Hugging Face byte-level BPE and SentencePiece.

`load_tokenizer(path)` tells the kinds apart by content: a tiktoken BPE file (`tokenizer.model`, Meta's
`original/tokenizer.model`), a Hugging Face byte-level BPE `tokenizer.json` (any model's: Llama 3's, GPT-2
style such as SmolLM2's, Qwen's; llama_posttrain/llama/tokenizer_json.py reads it with the ids of `tokenizers`,
through tiktoken where tiktoken gives them, else with its own BPETokenizer), or a SentencePiece model.
`resolve_tokenizer` picks the one for a model (given, else the checkpoint folder's, else the byte tokenizer
only if the vocabulary matches). llama_posttrain/llama/formats/hf.py `hf_tokenizer_json` writes a tokenizer
back as a `tokenizer.json` for Hugging Face exports.

Every kind (TiktokenTokenizer, BPETokenizer, SentencePieceTokenizer) exposes the same small surface:
`encode(text, bos=False, eos=False, allow_special=False)`, `decode(ids)`, `vocab_size`, and
special-token ids by name (`tok.special_tokens["<|eot_id|>"]`, `tok.eot_id`, `tok.bos_id`, ...).

By default special-token strings inside `text` are encoded as plain text, so user content can
never forge a turn boundary; `allow_special=True` parses them as special tokens, as Hugging Face
`tokenizers` does.
"""

from __future__ import annotations

from pathlib import Path

from llama_posttrain.llama.tokenizer_json import load_tokenizer_json
from llama_posttrain.llama.tokenizer_kinds import (  # noqa: F401  (the kinds, importable from here as before)
    _TIKTOKEN_LINE,
    DEFAULT_TOKENIZER,
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    NUM_RESERVED_SPECIAL_TOKENS,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    bytes_to_unicode,
    llama3_special_tokens,
    read_tiktoken_bpe,
)

# Where a model folder keeps its tokenizer, in order of preference: ours and HF Llama 2 at the top, then
# HF Llama 3's tokenizer.json (what a fine-tune on the hub updates), then Meta's original/tokenizer.model.
TOKENIZER_FILES_IN_DIR = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")


def tokenizer_in_dir(directory) -> Path | None:
    """The tokenizer file a model folder holds (TOKENIZER_FILES_IN_DIR, first found), or None."""
    for name in TOKENIZER_FILES_IN_DIR:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def load_tokenizer(path=DEFAULT_TOKENIZER) -> Tokenizer:
    """Load a tiktoken BPE file, a Hugging Face tokenizer.json or a SentencePiece model, told apart by content.

    `path` may also be a model folder holding one of TOKENIZER_FILES_IN_DIR."""
    path = Path(path)
    if path.is_dir():
        found = tokenizer_in_dir(path)
        if found is None:
            raise IsADirectoryError(
                f"tokenizer {path} is a directory with no tokenizer file in it "
                f"(looked for {', '.join(TOKENIZER_FILES_IN_DIR)}); pass the tokenizer file"
            )
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(256).split(b"\n")[0]
    if _TIKTOKEN_LINE.match(head):
        return TiktokenTokenizer(path)
    if head.lstrip().startswith(b"{"):
        return load_tokenizer_json(path)
    try:
        return SentencePieceTokenizer(path)
    except (RuntimeError, OSError) as e:
        raise ValueError(
            f"{path}: neither a tiktoken BPE file (lines '<base64 token> <rank>'), a tokenizer.json, "
            f"nor a SentencePiece model: {e}"
        ) from None


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give the same ids: the same BPE ranks, special tokens and split pattern (so a
    tokenizer.model and the tokenizer.json written from it are the same), or the same SentencePiece model."""
    if isinstance(a, TiktokenTokenizer) and isinstance(b, TiktokenTokenizer):
        return (a.ranks, a.special_tokens, a.pattern) == (b.ranks, b.special_tokens, b.pattern)
    if isinstance(a, SentencePieceTokenizer) and isinstance(b, SentencePieceTokenizer):
        return a.model.serialized_model_proto() == b.model.serialized_model_proto()
    if type(a) is type(b) and hasattr(a, "raw"):  # two BPETokenizers: the same file content but its version
        return all(a.raw.get(k) == b.raw.get(k) for k in ("model", "pre_tokenizer", "added_tokens", "normalizer"))
    return False


def resolve_tokenizer(tokenizer_arg, checkpoint_dir, vocab_size: int | None, verbose: bool = True) -> Tokenizer:
    """The tokenizer for a model, never silently the wrong one. For every entry point that loads a model.

    - `tokenizer_arg` (a file, or a model folder holding one) given: that tokenizer.
    - else `checkpoint_dir` holds a tokenizer (TOKENIZER_FILES_IN_DIR): that one, and the choice is printed.
    - else the shipped byte tokenizer (DEFAULT_TOKENIZER), only if `vocab_size` equals its vocabulary (512):
      a model with another vocabulary was trained with another tokenizer, so this raises ValueError
      saying to pass one.
    `vocab_size` is the model's embedding rows (None: not checked). A tokenizer with more ids than the
    model has rows is an error; fewer is allowed (embeddings padded beyond the tokenizer).
    verbose=False: the choice is not printed (a rank other than local rank 0).
    """
    if tokenizer_arg:
        tok, source = load_tokenizer(tokenizer_arg), "given"
    elif checkpoint_dir and tokenizer_in_dir(checkpoint_dir) is not None:
        tok, source = load_tokenizer(tokenizer_in_dir(checkpoint_dir)), "from the checkpoint folder"
        if verbose:
            print(f"tokenizer: {tok.path} ({source})", flush=True)
    else:
        tok, source = load_tokenizer(DEFAULT_TOKENIZER), "the shipped byte tokenizer"
        if vocab_size is not None and vocab_size != tok.vocab_size:
            where = f"checkpoint {checkpoint_dir}" if checkpoint_dir else "the model"
            looked = f" (no {' or '.join(TOKENIZER_FILES_IN_DIR)} in it)" if checkpoint_dir else ""
            raise ValueError(
                f"{where} has vocab_size {vocab_size}{looked}, but no tokenizer was given and the shipped byte "
                f"tokenizer has {tok.vocab_size} ids: pass the model's tokenizer (--tokenizer / model.tokenizer)"
            )
    if vocab_size is not None and tok.vocab_size > vocab_size:
        vision = tok.special_tokens.get("<|image|>", -1) >= vocab_size
        raise ValueError(
            f"tokenizer {tok.path} ({source}) has {tok.vocab_size} ids, more than the model's vocab_size {vocab_size}: "
            f"{_ids_beyond(tok, vocab_size)} no embedding row; use the model's own tokenizer, or remove these "
            f"tokens from {tok.path.name}"
            + (" (<|image|> is the Llama 3.2 Vision tokenizer's: a text model has none)" if vision else "")
        )
    return tok


def _ids_beyond(tok: Tokenizer, vocab_size: int) -> str:
    """The tokenizer's ids from `vocab_size` on, named: "id 128256 '<|image|>' (special) has"."""
    added = getattr(tok, "added_tokens", tok.special_tokens)
    names = {i: s for s, i in added.items() if i >= vocab_size}
    ids = range(vocab_size, tok.vocab_size)
    shown = ", ".join(
        f"{i} {names[i]!r} ({'special' if names[i] in tok.special_tokens else 'added'})" if i in names else str(i)
        for i in ids[:5]
    )
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return f"id {shown} has" if len(ids) == 1 else f"ids {shown}{more} have"
