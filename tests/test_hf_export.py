"""Hugging Face exports used by transformers on their own: a small trunk with the real Llama 3 vocabulary
(128256 ids) written by save_model, `python -m llama_posttrain.llama.convert --to hf` and a training run's export_hf,
then loaded with AutoTokenizer / AutoModelForCausalLM / AutoModelForSequenceClassification and compared
with ours: tokenizer ids and chat template, logits, batched rewards, dtype, generation config."""

import json
import shutil

import pytest
import torch
from conftest import random_model
from safetensors import safe_open
from test_chat import DIALOGS
from test_tokenizer import TEXTS, sp_model  # noqa: F401 (a fixture)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

from llama_posttrain.llama import ModelConfig, RopeScaling, load_model, save_model
from llama_posttrain.llama.chat import ChatFormat, jinja_template, resolve_chat_template
from llama_posttrain.llama.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

REAL_VOCAB = ModelConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=128256, max_seq_len=512,
    rope_scaling=RopeScaling(factor=32.0, original_max_seq_len=256), tie_embeddings=False,
)  # fmt: skip
FILES = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json"]
FILES += ["tokenizer.json", "tokenizer_config.json"]
# Llama-3.2-1B-Instruct's generation_config.json as the hub has it
HUB_GENERATION = {
    "bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009], "temperature": 0.6,
    "top_p": 0.9, "transformers_version": "4.45.0.dev0",
}  # fmt: skip
TINY = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=512)
SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@pytest.fixture(scope="module")
def tok(llama3_tokenizer_dir):
    return load_tokenizer(llama3_tokenizer_dir / "tokenizer.model")


def stored_dtypes(folder) -> set:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def check_tokenizer(folder, tok, template: str):
    """AutoTokenizer from the folder alone: our ids on text, the chat format's ids on dialogs."""
    hf = AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text), text
        assert hf.decode(ids) == text
    assert hf("Hi")["input_ids"] == tok.encode("Hi", bos=True)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (128000, 128009, 128004)
    assert resolve_chat_template(None, folder) == template
    chat = ChatFormat(tok, template, date_string="2 Feb 2025")
    for messages in DIALOGS:
        for gen in (False, True):
            ids = hf.apply_chat_template(
                messages, add_generation_prompt=gen, date_string="2 Feb 2025", return_dict=False
            )
            assert ids == chat.encode_dialog(messages, add_generation_prompt=gen).tokens
    return hf


def test_save_model_hf_is_complete_for_transformers(tmp_path, tok):
    """A bf16 model: bf16 weights; AutoTokenizer and AutoModelForCausalLM from the folder alone."""
    model = random_model(REAL_VOCAB).to(torch.bfloat16)
    save_model(model, tmp_path / "hf", format="hf", tokenizer=tok, chat_template="llama3.2")
    d = tmp_path / "hf"
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)
    assert stored_dtypes(d) == {"BF16"}
    config = json.loads((d / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["eos_token_id"] == [128001, 128008, 128009]
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == jinja_template("llama3.2")
    check_tokenizer(d, tok, "llama3.2")
    gen = GenerationConfig.from_pretrained(d)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (128000, [128001, 128008, 128009], 128004)

    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    ours = model.float()
    x = torch.tensor([ChatFormat(tok, "llama3.2").encode_dialog(DIALOGS[1]).tokens])
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_reward_model_scores_batches_in_transformers(tmp_path, tok):
    """pad_token_id in config.json: transformers finds each padded sequence's last token."""
    rm = random_model(REAL_VOCAB, head="reward", seed=1)
    with torch.no_grad():
        rm.score.weight.normal_()  # rewards far from 0, so a wrong position shows
    save_model(rm, tmp_path / "rm", format="hf", tokenizer=tok, chat_template="llama3.1")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["pad_token_id"] == 128004 and config["architectures"] == ["LlamaForSequenceClassification"]
    hf_tok = check_tokenizer(tmp_path / "rm", tok, "llama3.1")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    batch = hf_tok.apply_chat_template(DIALOGS, padding=True, return_tensors="pt")  # right-padded
    assert batch["input_ids"].shape[0] == len(DIALOGS) and (batch["input_ids"] == 128004).any()
    chat = ChatFormat(tok, "llama3.1")
    with torch.no_grad():
        theirs = hf(**batch).logits[:, 0]
        ours = torch.stack([rm(torch.tensor([chat.encode_dialog(m).tokens]))[0, -1] for m in DIALOGS])
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)


def test_convert_to_hf_writes_the_source_tokenizer(tmp_path, tok, llama3_tokenizer_dir, capsys):
    """A Meta-style folder (tokenizer.model, a 3.1 chat template) through `python -m llama_posttrain.llama.convert --to hf`."""
    from llama_posttrain.llama.convert import main

    src = tmp_path / "native"
    save_model(random_model(REAL_VOCAB), src)
    shutil.copy(llama3_tokenizer_dir / "tokenizer.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": jinja_template("llama3.1")}))
    main(["--from", "native", "--to", "hf", "--dtype", "bfloat16", str(src), str(tmp_path / "hf")])
    assert "chat template: llama3.1 (from" in capsys.readouterr().out
    assert stored_dtypes(tmp_path / "hf") == {"BF16"}
    check_tokenizer(tmp_path / "hf", tok, "llama3.1")
    main(["--from", "native", "--to", "hf", "--chat-template", "llama3", str(src), str(tmp_path / "hf3")])
    check_tokenizer(tmp_path / "hf3", tok, "llama3")
    # no tokenizer anywhere: the weights only, said so
    bare = tmp_path / "bare"
    save_model(random_model(REAL_VOCAB), bare)
    main(["--from", "native", "--to", "hf", str(bare), str(tmp_path / "hf_bare")])
    assert "writing the weights only" in capsys.readouterr().out
    assert not (tmp_path / "hf_bare" / "tokenizer.json").exists()


def test_native_save_with_tokenizer_is_self_contained(tmp_path, tok):
    """A native folder with the tokenizer files: its tokenizer and chat template are found in it."""
    save_model(random_model(REAL_VOCAB), tmp_path / "n", tokenizer=tok, chat_template="llama3.2")
    assert resolve_chat_template(None, tmp_path / "n") == "llama3.2"
    from llama_posttrain.llama.tokenizer import resolve_tokenizer

    found = resolve_tokenizer(None, tmp_path / "n", 128256)
    assert found.path.name == "tokenizer.json" and found.special_tokens == tok.special_tokens
    assert all(found.encode(t) == tok.encode(t) for t in TEXTS)
    assert load_model(tmp_path / "n").config == REAL_VOCAB
    with pytest.raises(ValueError, match="pass the tokenizer too"):
        save_model(random_model(REAL_VOCAB), tmp_path / "x", chat_template="llama3.1")


def test_sentencepiece_tokenizer_is_copied(tmp_path, sp_model):  # noqa: F811
    """No tokenizer.json form: tokenizer.model is copied, the chat template as chat_template.jinja."""
    sp = load_tokenizer(sp_model)
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=sp.vocab_size)
    save_model(random_model(config), tmp_path / "hf", format="hf", tokenizer=sp, chat_template="llama3.1")
    assert {"tokenizer.model", "chat_template.jinja"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    assert resolve_chat_template(None, tmp_path / "hf") == "llama3.1"


def check_generation_defaults(folder, source, tok, max_seq_len: int):
    """transformers on `folder` alone: the source's sampling defaults (as transformers reads the source's
    generation_config.json), our stop ids; AutoTokenizer's model_max_length is the model's max_seq_len."""
    gen, theirs = GenerationConfig.from_pretrained(folder), GenerationConfig.from_pretrained(source)
    assert theirs.do_sample and (theirs.temperature, theirs.top_p) == (0.6, 0.9)  # the reference itself
    assert {k: getattr(gen, k) for k in SAMPLING} == {k: getattr(theirs, k) for k in SAMPLING}
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (tok.bos_id, tok.stop_ids, tok.pad_id)
    assert AutoTokenizer.from_pretrained(folder).model_max_length == max_seq_len


def test_hf_export_keeps_the_sources_generation_defaults_and_writes_model_max_length(tmp_path, capsys):
    """save_model(source=...) and `llama.convert --to hf SRC DST` from a folder holding a hub Instruct
    model's generation_config.json (do_sample, temperature 0.6, top_p 0.9): kept, with our stop ids; no
    source generation config: none invented. The same conversion again replaces nothing; a DST whose
    generation config differs (other sampling defaults) is still refused without --replace-tokenizer.
    (The byte tokenizer, for speed: the real vocabulary's run is test_training_export_hf_from_a_hub_folder.)"""
    from llama_posttrain.llama.convert import main

    tok, config = load_tokenizer(DEFAULT_TOKENIZER), ModelConfig(**{**TINY, "max_seq_len": 384})
    src = tmp_path / "src"
    save_model(random_model(config), src, tokenizer=tok, chat_template="llama3.2")
    (src / "generation_config.json").write_text(json.dumps(HUB_GENERATION))
    save_model(random_model(config), tmp_path / "saved", format="hf", tokenizer=tok, source=src)
    check_generation_defaults(tmp_path / "saved", src, tok, 384)
    main(["--from", "native", "--to", "hf", str(src), str(tmp_path / "dst")])
    check_generation_defaults(tmp_path / "dst", src, tok, 384)
    capsys.readouterr()
    main(["--from", "native", "--to", "hf", str(src), str(tmp_path / "dst")])
    assert "replaced" not in capsys.readouterr().err
    (src / "generation_config.json").write_text(json.dumps({**HUB_GENERATION, "temperature": 0.9}))
    with pytest.raises(SystemExit, match=r"generation_config\.json would be replaced"):
        main(["--from", "native", "--to", "hf", str(src), str(tmp_path / "dst")])
    assert GenerationConfig.from_pretrained(tmp_path / "dst").temperature == 0.6

    save_model(random_model(config), tmp_path / "plain", format="hf", tokenizer=tok)
    plain = GenerationConfig.from_pretrained(tmp_path / "plain")
    assert not plain.do_sample and plain.eos_token_id == tok.stop_ids
    assert AutoTokenizer.from_pretrained(tmp_path / "plain").model_max_length == 384


def hub_folder(path, llama3_tokenizer_dir, template: str):
    """A model folder as the hub has it: transformers' own config and weights, tokenizer.json (a text
    model's: no <|image|>), tokenizer_config.json naming the model's chat template and an Instruct
    model's generation_config.json (sampling defaults)."""
    save_model(random_model(REAL_VOCAB, seed=3), path.parent / "seed", format="hf")
    AutoModelForCausalLM.from_pretrained(path.parent / "seed").save_pretrained(path)
    raw = json.loads((llama3_tokenizer_dir / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["id"] < 128256]
    (path / "tokenizer.json").write_text(json.dumps(raw))
    config = json.loads((llama3_tokenizer_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 128256}
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": jinja_template(template)}))
    (path / "generation_config.json").write_text(json.dumps(HUB_GENERATION))


def test_training_export_hf_from_a_hub_folder(tmp_path, tok, llama3_tokenizer_dir, one_rank, capsys):
    """SFT from a hub folder with nothing but model.checkpoint: its tokenizer.json and chat template are
    used, and model_hf (bf16, as trained) is complete for transformers, with the hub folder's sampling
    defaults; a rerun of the finished run exports the same files again (the check at its start passes)."""
    from llama_posttrain.train import run_folder, train_state
    from llama_posttrain.train.config import parse_args
    from llama_posttrain.train.sft import SFTConfig, main

    hub = tmp_path / "Llama-3.2-1B-Instruct"
    hub_folder(hub, llama3_tokenizer_dir, "llama3.2")
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"messages": m + [{"role": "assistant", "content": "OK."}]}) for m in DIALOGS))
    run = tmp_path / "run"
    args = [
        "model.checkpoint=" + str(hub), f"data.train={data}", "data.max_len=256", "data.batch_size=2",
        "data.tokens_per_microbatch=512", "train.steps=2", "train.save_every=0", "train.mixed_precision=bf16",
        "train.export_hf=true", "train.kernels=torch", f"train.run_dir={run}", "logging.progress=false", "logging.wandb=disabled",
    ]  # fmt: skip
    main(args)
    out = capsys.readouterr().out
    assert f"tokenizer: {hub / 'tokenizer.json'} (from the checkpoint folder)" in out
    assert f"chat template: llama3.2 (from {hub / 'tokenizer_config.json'})" in out
    assert stored_dtypes(run / "model") == {"F32"}  # the master weights, to train on
    assert stored_dtypes(run / "model_hf") == {"BF16"}
    assert resolve_chat_template(None, run / "model") == "llama3.2"
    check_tokenizer(run / "model_hf", tok, "llama3.2")
    check_generation_defaults(run / "model_hf", hub, tok, REAL_VOCAB.max_seq_len)
    gen = (run / "model_hf" / "generation_config.json").read_bytes()
    assert (run / "model" / "generation_config.json").read_bytes() == gen  # for a stage trained from model/
    # a rerun of the finished run: the check at its start passes, and its export writes the same files
    exported = {p.name: p.read_bytes() for p in (run / "model_hf").iterdir() if p.suffix != ".safetensors"}
    chat = ChatFormat(tok, "llama3.2")
    run_folder.check_exports(parse_args(SFTConfig, args), chat, 0, 1)
    train_state.export(load_model(run / "model"), run / "model", 0, True, chat, torch.bfloat16, source=hub)
    assert {p.name: p.read_bytes() for p in (run / "model_hf").iterdir() if p.suffix != ".safetensors"} == exported
    assert "tokenizer files (replace_tokenizer)" not in capsys.readouterr().err
    hf = AutoModelForCausalLM.from_pretrained(run / "model_hf", dtype=torch.float32, attn_implementation="eager")
    ours = load_model(run / "model_hf", dtype=torch.float32)
    x = torch.tensor([ChatFormat(tok, "llama3.2").encode_dialog(DIALOGS[0]).tokens])
    with torch.no_grad():
        assert (ours(x) - hf.eval()(x).logits).abs().max().item() <= 1e-4
