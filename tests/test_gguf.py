"""GGUF in (llama_posttrain/llama/formats/gguf.py, convert --from gguf), against transformers' own GGUF load.

Each test writes a tiny random llama GGUF with gguf's writer (each tensor type quantized by
gguf.quants.quantize where the package can, else random blocks packed by hand), converts it, and compares
the weights and logits with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (transformers'
own reader and torch dequantizer, float32) and the tokenizer with transformers' GGUF tokenizer. Q5_0
and Q5_1, which transformers does not read, are checked against ggml's block formula in float64.
"""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from llama_posttrain.llama.checkpoint import load_model  # noqa: E402
from llama_posttrain.llama.config import RopeScaling  # noqa: E402
from llama_posttrain.llama.convert import main as convert  # noqa: E402
from llama_posttrain.llama.formats import hf  # noqa: E402
from llama_posttrain.llama.tokenizer import bytes_to_unicode  # noqa: E402

Q = gguf.GGMLQuantizationType
DIM, LAYERS, HEADS, KV_HEADS, FFN = 256, 2, 4, 2, 512  # rows of 256: the K quants' block
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2", "Ġ 1", "o r"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# where the f16 scales sit in a block of each K type (ggml-common.h); every other byte is any value
K_BLOCKS = {
    Q.Q2_K: (84, [80, 82]),
    Q.Q3_K: (110, [108]),
    Q.Q4_K: (144, [0, 2]),
    Q.Q5_K: (176, [0, 2]),
    Q.Q6_K: (210, [208]),
}
CORPUS = [
    "What is the capital of France?",
    "the other thing in 12 and 1212 or 2024",
    "def f(x):\n    return x  # tabs\t\tand  spaces   ",
    "Ünïcödé 日本語 🙂 ÀÉ",
    "<|im_start|>user\nhi<|im_end|>\n<think>",
]


def tokens_and_types():
    alphabet = list(bytes_to_unicode().values())
    merged = [a + b for a, b in (m.split(" ") for m in MERGES)]
    tokens = SPECIAL + alphabet + merged + ["<think>"]
    types = [3] * len(SPECIAL) + [1] * (len(alphabet) + len(merged)) + [4]  # control, normal, user-defined
    return tokens, types


def quantized(w: np.ndarray, kind, rng) -> tuple[np.ndarray, Q | None]:
    """(what add_tensor takes, raw_dtype) for the float32 matrix w (rows, cols) stored as `kind`."""
    if kind == Q.F32:
        return w, None
    if kind == Q.F16:
        return w.astype(np.float16), None
    if kind in K_BLOCKS:
        size, scale_at = K_BLOCKS[kind]
        blocks = rng.integers(0, 256, size=(w.size // 256, size), dtype=np.uint8)
        for at in scale_at:
            blocks[:, at : at + 2] = rng.uniform(1e-4, 2e-3, size=(len(blocks), 1)).astype(np.float16).view(np.uint8)
        return blocks.reshape(w.shape[0], -1), kind
    return gguf.quants.quantize(w, kind), kind


def write_gguf(path, kind=Q.F32, tied=True, pre="gpt-2", add_bos=False, rope_freqs=None, arch="llama", seed=0):
    """A tiny random llama GGUF: every matrix as `kind`, norms F32. Returns the file."""
    rng = np.random.default_rng(seed)
    tokens, types = tokens_and_types()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)
    hd = DIM // HEADS
    shapes = {"token_embd.weight": (len(tokens), DIM), "output_norm.weight": (DIM,)}
    if not tied:
        shapes["output.weight"] = (len(tokens), DIM)
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (DIM,),
            f"blk.{i}.ffn_norm.weight": (DIM,),
            f"blk.{i}.attn_q.weight": (HEADS * hd, DIM),
            f"blk.{i}.attn_k.weight": (KV_HEADS * hd, DIM),
            f"blk.{i}.attn_v.weight": (KV_HEADS * hd, DIM),
            f"blk.{i}.attn_output.weight": (DIM, HEADS * hd),
            f"blk.{i}.ffn_gate.weight": (FFN, DIM),
            f"blk.{i}.ffn_up.weight": (FFN, DIM),
            f"blk.{i}.ffn_down.weight": (DIM, FFN),
        }
    for name, shape in shapes.items():
        if len(shape) == 1:
            w.add_tensor(name, rng.uniform(0.5, 1.5, size=shape).astype(np.float32))
        else:
            data, raw = quantized(rng.normal(0, 0.05, size=shape).astype(np.float32), kind, rng)
            w.add_tensor(name, data, raw_dtype=raw)  # the shape from the bytes: quant_shape_from_byte_shape
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def ggml_q5(blocks: np.ndarray, with_min: bool) -> np.ndarray:
    """ggml's dequantize_row_q5_0 / q5_1 in float64 (ggml-quants.c): 32 values per block from a 5-bit
    code, low 4 bits in qs (first half low nibbles, second half high), the 5th bit in the 32-bit qh."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float64) if with_min else None
    at = 4 if with_min else 2
    qh = blocks[:, at : at + 4].copy().view(np.uint32).astype(np.int64)
    qs = blocks[:, at + 4 :].astype(np.int64)
    j = np.arange(16)
    low = (qs & 0xF) | (((qh >> j) & 1) << 4)
    high = (qs >> 4) | (((qh >> (j + 16)) & 1) << 4)
    codes = np.concatenate([low, high], axis=1)
    return codes * d + m if with_min else (codes - 16) * d


TRANSFORMERS_READS = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("kind", TRANSFORMERS_READS, ids=lambda k: k.name)
def test_weights_and_logits_equal_transformers_gguf_load(tmp_path, kind):
    tied = kind.value % 2 == 0  # both heads across the types
    path = write_gguf(tmp_path / "tiny.gguf", kind, tied=tied, seed=kind.value)
    convert(["--from", "gguf", str(path), str(tmp_path / "native")])
    ours, ref = load_model(tmp_path / "native").eval(), reference(path)
    assert ours.config.tie_embeddings == tied
    theirs = hf.state_from_hf(dict(ref.state_dict()), ours.config)  # HF's q/k rows back to Meta's pairs
    for name, t in ours.state_dict().items():
        torch.testing.assert_close(t, theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    ids = torch.randint(0, ours.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
        # equal weights: what is left is float32 summation order, relative to the logits' scale
        torch.testing.assert_close(ours(ids), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("kind", [Q.Q5_0, Q.Q5_1], ids=lambda k: k.name)
def test_q5_weights_equal_ggml_formula(tmp_path, kind):
    path = write_gguf(tmp_path / "tiny.gguf", kind)
    convert(["--from", "gguf", str(path), str(tmp_path / "native")])
    ours = load_model(tmp_path / "native").state_dict()
    blocks = gguf.GGUFReader(str(path)).tensors
    stored = {t.name: t for t in blocks}["blk.1.ffn_down.weight"]
    expected = ggml_q5(np.asarray(stored.data).reshape(-1, 22 if kind == Q.Q5_0 else 24), kind == Q.Q5_1)
    got = ours["layers.1.feed_forward.w2.weight"].double().numpy().reshape(-1, 32)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_to_hf_folder_loads_in_transformers_alone(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", Q.Q8_0, tied=False)
    convert(["--from", "gguf", "--to", "hf", str(path), str(tmp_path / "hf")])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 200, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(path)(ids).logits, rtol=1e-4, atol=1e-4)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2] and generation["bos_token_id"] == 1


@pytest.mark.parametrize("pre,add_bos", [("gpt-2", False), ("llama-bpe", True), ("smollm", False)])
def test_tokenizer_and_chat_template_equal_transformers(tmp_path, pre, add_bos):
    path = write_gguf(tmp_path / "tiny.gguf", pre=pre, add_bos=add_bos)
    convert(["--from", "gguf", str(path), str(tmp_path / "native")])
    ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "native"))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in CORPUS:
        if pre == "smollm":  # llama.cpp splits every digit off first (\p{N}); transformers' GGUF load does not
            assert ours.tokenize("1212 12") == ["1", "2", "1", "2", "Ġ", "1", "2"]
            text = "".join(c for c in text if not c.isdigit())
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"], skip_special_tokens=False) == ref.decode(ref(text)["input_ids"])
    assert ours.convert_ids_to_tokens(ours("<think>")["input_ids"])[-1] == "<think>"  # user-defined: whole
    dialog = [{"role": "user", "content": "the other"}, {"role": "assistant", "content": "in or a"}]
    for prompt in (dialog, dialog[:1]):
        assert ours.apply_chat_template(prompt, add_generation_prompt=len(prompt) == 1) == ref.apply_chat_template(
            prompt, add_generation_prompt=len(prompt) == 1
        )
    config = json.loads((tmp_path / "native" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML and config["eos_token"] == "<|im_end|>"


def llama_cpp_rope_factors(theta, dim, factor, low, high, old_context):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, for a llama3 rope_type (float64)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2) / dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def test_llama3_rope_scaling_from_rope_freqs(tmp_path, capsys):
    factors = llama_cpp_rope_factors(10000.0, DIM // HEADS, 32.0, 1.0, 4.0, 8192)
    convert(["--from", "gguf", str(write_gguf(tmp_path / "a.gguf", rope_freqs=factors)), str(tmp_path / "a")])
    assert load_model(tmp_path / "a").config.rope_scaling == RopeScaling(factor=32.0)
    other = llama_cpp_rope_factors(10000.0, DIM // HEADS, 32.0, 1.0, 2.0, 8192)  # not Llama 3's high factor
    with pytest.raises(SystemExit, match="error: .*b.gguf: tensor rope_freqs.weight is not Llama 3's RoPE scaling"):
        convert(["--from", "gguf", str(write_gguf(tmp_path / "b.gguf", rope_freqs=other)), str(tmp_path / "b")])


def test_bad_inputs_are_errors_naming_the_file(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=f"error: {truncated}: not a readable GGUF file"):
        convert(["--from", "gguf", str(truncated), str(tmp_path / "x")])
    other = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(SystemExit, match="general.architecture is 'gpt2'; only llama models"):
        convert(["--from", "gguf", str(other), str(tmp_path / "x")])
    unread = write_gguf(tmp_path / "iq.gguf", Q.F32)
    monkeypatch.setattr("llama_posttrain.llama.formats.gguf.DEQUANTIZED", ("F16",))
    with pytest.raises(SystemExit, match="tensor token_embd.weight is F32, which is not read"):
        convert(["--from", "gguf", str(unread), str(tmp_path / "x")])
    monkeypatch.undo()
    assert not (tmp_path / "x").exists()
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # the optional extra not installed
    with pytest.raises(SystemExit, match=r"needs the gguf package: pip install 'llama-posttrain\[gguf\]'"):
        convert(["--from", "gguf", str(path), str(tmp_path / "x")])


def test_destination_tokenizer_files_are_not_replaced_silently(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "tokenizer.json").write_text("{}")
    path = write_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(SystemExit, match="refusing to write the tokenizer files into .*tokenizer.json"):
        convert(["--from", "gguf", str(path), str(dst)])
    assert (dst / "tokenizer.json").read_text() == "{}" and not (dst / "config.json").exists()
    convert(["--from", "gguf", "--replace-tokenizer", str(path), str(dst)])
    assert json.loads((dst / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert load_model(dst).config.vocab_size == len(tokens_and_types()[0])
