"""Model folders under faults and bad input (llama.checkpoint, llama.convert, save_model, the training export,
jobs/average.py): nothing deleted that we did not write, no stray file read, errors that name the file, no
silent wrong tokenizer or random reward head, no NaN averaged; a folder's own tokenizer files never replaced
silently, and the average carries the inputs' tokenizer, chat template and generation config (inputs that
disagree on them are refused). References: transformers (AutoTokenizer, GenerationConfig) reading the
folders, and trl's copies of the models' Jinja templates rendered by jinja2."""

import json
from pathlib import Path

import jinja2.sandbox
import pytest
import torch
import trl
from conftest import CONFIGS, random_model, with_fields
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

from llama_posttrain.jobs.average import main as average_main
from llama_posttrain.jobs.averaging import average_checkpoints
from llama_posttrain.llama import CheckpointError, load_model, save_model
from llama_posttrain.llama.chat import DEFAULT_DATE, ChatFormat
from llama_posttrain.llama.tokenizer import DEFAULT_TOKENIZER, load_tokenizer, resolve_tokenizer
from llama_posttrain.train import train_state

CONFIG = CONFIGS["gqa-untied-scaled"]


def _snapshot(directory, names):
    return {n: (directory / n).read_bytes() for n in names}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _bpe_with_one_merge(path):
    """A tiktoken file: the 256 bytes of the shipped tokenizer plus the merge "ab" (513 ids in all)."""
    path.write_text(DEFAULT_TOKENIZER.read_text() + "YWI= 256\n")
    return path


# ------------------------------------------------------------------------------------------- never delete others' files


def test_convert_into_folder_with_other_files_keeps_them(tmp_path):
    from llama_posttrain.llama.convert import main

    model = random_model(CONFIG)
    save_model(model, tmp_path / "hf", format="hf")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "README.md").write_text("my notes")
    (dst / "tokenizer.model").write_bytes(DEFAULT_TOKENIZER.read_bytes())
    (dst / "sub").mkdir()
    (dst / "sub" / "keep.txt").write_text("x")
    main(["--from", "hf", "--to", "native", str(tmp_path / "hf"), str(dst)])
    assert (dst / "README.md").read_text() == "my notes"
    assert (dst / "tokenizer.model").read_bytes() == DEFAULT_TOKENIZER.read_bytes()
    assert (dst / "sub" / "keep.txt").read_text() == "x"
    assert _same_weights(load_model(dst), model)
    # model files are safetensors only, tagged as ours
    ours = {p.name for p in dst.iterdir()} - {"README.md", "tokenizer.model", "sub"}
    assert ours == {"config.json", "model.safetensors"}
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["writer"] == "llama-posttrain"


def test_in_place_convert_keeps_tokenizer_and_other_files(tmp_path, capsys):
    """An HF checkpoint written by transformers (sharded), converted to native in place."""
    from llama_posttrain.llama.convert import main

    model = random_model(CONFIG)
    save_model(model, tmp_path / "seed", format="hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "seed", dtype=torch.float32)
    d = tmp_path / "ckpt"
    hf.save_pretrained(d, max_shard_size=40_000)  # transformers' own shards and index
    hf_shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(hf_shards) > 1
    (d / "tokenizer.model").write_bytes(DEFAULT_TOKENIZER.read_bytes())
    (d / "notes.txt").write_text("keep me")
    extras = _snapshot(d, ["tokenizer.model", "notes.txt", "generation_config.json"])

    main(["--from", "hf", "--to", "native", str(d), str(d)])
    assert _snapshot(d, list(extras)) == extras
    assert _same_weights(load_model(d), model)
    # transformers' shards are not ours: left (and listed), never read; the index names only our file
    assert all((d / n).exists() for n in hf_shards)
    assert "did not write" in capsys.readouterr().err
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}


def test_resave_removes_only_our_own_stale_shards(tmp_path):
    d = tmp_path / "c"
    save_model(random_model(CONFIG, seed=1), d, max_shard_bytes=20_000)
    old_shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(old_shards) > 2
    (d / "tokenizer.model").write_bytes(DEFAULT_TOKENIZER.read_bytes())
    model = random_model(CONFIG, seed=2)
    save_model(model, d)  # one file now: our old shards go, the tokenizer stays
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
    ]
    assert _same_weights(load_model(d), model)


def test_save_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    d = tmp_path / "project"
    d.mkdir()
    (d / "config.json").write_text('{"name": "my web app"}')
    (d / "main.py").write_text("print(1)")
    before = _snapshot(d, ["config.json", "main.py"])
    with pytest.raises(CheckpointError, match="refusing to write a checkpoint into .*project"):
        save_model(random_model(CONFIG), d)
    assert _snapshot(d, ["config.json", "main.py"]) == before and len(list(d.iterdir())) == 2

    foreign = tmp_path / "weights"  # someone's weights without a config: not ours to overwrite
    foreign.mkdir()
    save_file({"x": torch.zeros(2)}, str(foreign / "model.safetensors"))
    with pytest.raises(CheckpointError, match="did not write"):
        save_model(random_model(CONFIG), foreign)
    assert list(load_file(foreign / "model.safetensors")) == ["x"]


def test_average_out_refuses_a_foreign_folder(tmp_path):
    for seed in range(2):
        save_model(random_model(CONFIG, seed=seed), tmp_path / f"m{seed}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="refusing to write a checkpoint into"):
        average_main([str(tmp_path / "m0"), str(tmp_path / "m1"), "--out", str(out)])
    assert (out / "config.json").read_text() == "[1, 2]"


def test_convert_refuses_in_place_meta(tmp_path):
    from llama_posttrain.llama.convert import main

    d = tmp_path / "meta"
    d.mkdir()
    (d / "params.json").write_text("{}")
    (d / "tokenizer.model").write_text("x")
    with pytest.raises(SystemExit, match="Meta checkpoint"):
        main(["--from", "meta", "--to", "native", str(d), str(d)])
    assert sorted(p.name for p in d.iterdir()) == ["params.json", "tokenizer.model"]


# ---------------------------------------------------------------------------------------- only the named files are read


def test_stray_safetensors_is_ignored(tmp_path, capsys):
    model = random_model(CONFIG)
    save_model(model, tmp_path / "c")
    save_file({"norm.weight": torch.zeros(CONFIG.dim)}, str(tmp_path / "c" / "zz_stray.safetensors"))
    assert _same_weights(load_model(tmp_path / "c"), model)
    assert (
        "ignoring 1 safetensors file(s) the checkpoint does not name: zz_stray.safetensors" in capsys.readouterr().err
    )


def test_tensor_in_two_shards_is_an_error(tmp_path):
    d = tmp_path / "c"
    save_model(random_model(CONFIG), d, max_shard_bytes=20_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    first, last = sorted(set(index.values()))[0], sorted(set(index.values()))[-1]
    name = next(n for n, f in index.items() if f == first)
    shard = load_file(d / last)
    shard[name] = torch.zeros_like(load_file(d / first)[name])
    save_file(shard, str(d / last))
    with pytest.raises(CheckpointError, match=f"tensor {name} is in two weight files: .*{first} and .*{last}"):
        load_model(d)
    with pytest.raises(CheckpointError, match="two weight files"):
        average_checkpoints([d, d], tmp_path / "avg")


# ------------------------------------------------------------------------------------------------- errors name the path


def test_truncated_safetensors_names_the_path(tmp_path):
    d = tmp_path / "c"
    save_model(random_model(CONFIG), d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"c/model.safetensors: not a readable safetensors file"):
        load_model(d)
    with pytest.raises(CheckpointError, match=r"c/model.safetensors: not a readable safetensors file"):
        average_checkpoints([d], tmp_path / "avg")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"format": "llama-native", "head": "lm", "mod', "cannot read it as JSON"),
        (b"\xff\xfe{}", "cannot read it as JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"format": "llama-native", "head": "lm"}', "missing key 'model'"),
        ('{"format": "llama-native", "model": {"dim": "64"}}', "dim must be a positive integer"),
        ('{"model_type": "llama", "hidden_size": 64}', "missing key 'num_attention_heads'"),
    ],
)
def test_bad_config_json_names_the_path(tmp_path, text, message):
    d = tmp_path / "c"
    save_model(random_model(CONFIG), d)
    (d / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError, match=rf"c/config.json: .*{message}"):
        load_model(d)


def test_tokenizer_directory(tmp_path):
    with pytest.raises(
        IsADirectoryError, match=r"is a directory .*looked for tokenizer.model, tokenizer.json, original/"
    ):
        load_tokenizer(tmp_path)
    _bpe_with_one_merge((tmp_path / "original").mkdir() or tmp_path / "original" / "tokenizer.model")
    assert load_tokenizer(tmp_path).vocab_size == 513


# --------------------------------------------------------------------------------------- no silent wrong tokenizer/head


def test_resolve_tokenizer_takes_the_checkpoint_folders(tmp_path):
    _bpe_with_one_merge(tmp_path / "tokenizer.model")
    tok = resolve_tokenizer(None, tmp_path, 513)
    assert tok.path == tmp_path / "tokenizer.model" and tok.encode("ab") == [256]
    assert resolve_tokenizer(DEFAULT_TOKENIZER, tmp_path, 513).path == DEFAULT_TOKENIZER  # given wins
    assert resolve_tokenizer(None, tmp_path / "none", 512).path == DEFAULT_TOKENIZER
    with pytest.raises(ValueError, match="vocab_size 600 .*pass the model's tokenizer"):
        resolve_tokenizer(None, tmp_path / "none", 600)
    with pytest.raises(ValueError, match="513 ids, more than the model's vocab_size 512"):
        resolve_tokenizer(None, tmp_path, 512)


def test_generate_uses_the_checkpoint_folders_tokenizer(tmp_path, capsys):
    from llama_posttrain.llama.generate import main

    d = tmp_path / "c"
    save_model(random_model(with_fields(CONFIG, vocab_size=513)), d)
    _bpe_with_one_merge(d / "tokenizer.model")
    main(["--checkpoint", str(d), "--prompt", "ab", "--raw", "--max-new-tokens", "2", "--device", "cpu"])
    assert f"tokenizer: {d / 'tokenizer.model'} (from the checkpoint folder)" in capsys.readouterr().out


def test_generate_fails_at_start_on_a_vocab_mismatch(tmp_path):
    from llama_posttrain.llama.generate import main

    save_model(random_model(with_fields(CONFIG, vocab_size=600)), tmp_path / "c")
    with pytest.raises(SystemExit, match="vocab_size 600 .*pass the model's tokenizer"):
        main(["--checkpoint", str(tmp_path / "c"), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"])


def test_reward_head_from_an_lm_only_when_asked(tmp_path):
    save_model(random_model(CONFIG), tmp_path / "lm")
    with pytest.raises(CheckpointError, match="no reward head"):
        load_model(tmp_path / "lm", head="reward")
    assert load_model(tmp_path / "lm", head="reward", new_head_ok=True).head == "reward"


# ------------------------------------------------------------------------------------------------------ no NaN averaged


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_average_refuses_non_finite_values(tmp_path, bad):
    for seed in range(2):
        save_model(random_model(CONFIG, seed=seed), tmp_path / f"m{seed}")
    sd = load_file(tmp_path / "m1" / "model.safetensors")
    sd["layers.1.attention.wv.weight"][0, 0] = bad
    save_file(sd, str(tmp_path / "m1" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"m1: tensor layers.1.attention.wv.weight .*non-finite"):
        average_checkpoints([tmp_path / "m0", tmp_path / "m1"], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


CONFIG_513 = with_fields(
    CONFIGS["gqa-untied-scaled"], vocab_size=513
)  # the byte tokenizer (512 ids), or one merge more
TRL = Path(trl.__file__).parent / "chat_templates"
TRL_FILES = {"llama3": "llama3.jinja", "llama3.1": "llama3_1.jinja", "llama3.2": "llama3_2.jinja"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEFAULT_TOKENIZER)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def hf_template(d: Path) -> str:
    """The chat template transformers uses for the folder."""
    return AutoTokenizer.from_pretrained(d).chat_template


def users_hf_folder(d: Path, tok, template: str) -> dict[str, bytes]:
    """An HF model folder whose tokenizer files are the user's own: the llama3.2 template, a
    generation_config.json with sampling settings. -> its files."""
    save_model(random_model(CONFIG_513, seed=5), d, format="hf", tokenizer=tok, chat_template=template)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "temperature": 0.6}))
    return snapshot(d)


# -------------------------------------------------------------------------------------------- a folder's tokenizer kept


def test_convert_into_an_hf_folder_refuses_to_replace_its_tokenizer_files(tmp_path, tok, capsys):
    """`llama.convert --from native --to hf SRC DST` into a folder with its own tokenizer_config.json (llama3.2),
    generation_config.json: refused before any work, naming them; kept as transformers reads them;
    --replace-tokenizer replaces them, and says so."""
    from llama_posttrain.llama.convert import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    model = random_model(CONFIG_513, seed=1)
    save_model(model, src, tokenizer=tok, chat_template="llama3")
    before = users_hf_folder(dst, tok, "llama3.2")
    with pytest.raises(SystemExit, match=r"error: refusing to write the tokenizer files into .*dst") as e:
        main(["--from", "native", "--to", "hf", str(src), str(dst)])
    assert "tokenizer_config.json, generation_config.json would be replaced" in str(e.value)
    assert "--replace-tokenizer" in str(e.value)
    assert snapshot(dst) == before  # nothing written, the weights included
    assert hf_template(dst) == (TRL / TRL_FILES["llama3.2"]).read_text()
    assert GenerationConfig.from_pretrained(dst).temperature == 0.6

    main(["--from", "native", "--to", "hf", "--replace-tokenizer", str(src), str(dst)])
    assert "replaced tokenizer_config.json, generation_config.json with this checkpoint's" in capsys.readouterr().err
    assert hf_template(dst) == (TRL / TRL_FILES["llama3"]).read_text()
    assert GenerationConfig.from_pretrained(dst).eos_token_id == tok.stop_ids
    assert torch.equal(load_model(dst).tok_embeddings.weight, model.tok_embeddings.weight)
    main(["--from", "native", "--to", "hf", str(src), str(dst)])  # the same files again: nothing to replace
    assert "replaced" not in capsys.readouterr().err


def test_a_chat_template_jinja_that_would_be_read_instead_is_refused(tmp_path, tok, capsys):
    """transformers (and llama.chat) read chat_template.jinja before tokenizer_config.json's template: one in
    DST would silently win over the template written; refused, and removed only with --replace-tokenizer."""
    from llama_posttrain.llama.convert import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    save_model(random_model(CONFIG_513), src, tokenizer=tok, chat_template="llama3")
    save_model(random_model(CONFIG_513), dst, format="hf", tokenizer=tok, chat_template="llama3")
    (dst / "chat_template.jinja").write_text((TRL / TRL_FILES["llama3.1"]).read_text())
    before = snapshot(dst)
    with pytest.raises(SystemExit, match=r"chat_template\.jinja would be read instead of the tokenizer files"):
        main(["--from", "native", "--to", "hf", str(src), str(dst)])
    assert snapshot(dst) == before and hf_template(dst) == (TRL / TRL_FILES["llama3.1"]).read_text()
    main(["--from", "native", "--to", "hf", "--replace-tokenizer", str(src), str(dst)])
    assert "removed chat_template.jinja" in capsys.readouterr().err
    assert hf_template(dst) == (TRL / TRL_FILES["llama3"]).read_text()


def test_save_training_export_and_average_never_replace_a_folders_tokenizer(tmp_path, tok):
    """The same guard in save_checkpoint: save_model, the training export (train_state.export) and
    llama_posttrain/jobs/average.py into a folder holding another chat template are refused, naming the file."""
    model = random_model(CONFIG_513)
    chat = ChatFormat(tok, "llama3.1")
    for name in ("save", "export", "average"):
        d = tmp_path / name
        before = users_hf_folder(d, tok, "llama3.2")
        match = rf"refusing to write the tokenizer files into {d}: its own tokenizer_config\.json"
        if name == "save":
            with pytest.raises(CheckpointError, match=match):
                save_model(model, d, format="hf", tokenizer=tok, chat_template="llama3.1")
        elif name == "export":  # a run's <run_dir>/model holding the user's files
            with pytest.raises(CheckpointError, match=match):
                train_state.export(model, d, 0, hf=False, chat=chat)
        else:
            for i in range(2):
                train_state.export(random_model(CONFIG_513, seed=i), tmp_path / f"in{i}", 0, chat=chat)
            with pytest.raises(SystemExit, match=match):
                average_main([str(tmp_path / "in0"), str(tmp_path / "in1"), "--out", str(d), "--format", "hf"])
        assert snapshot(d) == before, name
        assert hf_template(d) == (TRL / TRL_FILES["llama3.2"]).read_text()


# ---------------------------------------------------------------------------------------------- the average is complete


def test_the_average_carries_tokenizer_template_and_generate_uses_them(tmp_path, tok, monkeypatch, capsys):
    """Two training exports (tokenizer, llama3.2 template) averaged: the average holds the tokenizer and the
    template; llama.generate on it (with and without --tokenizer) prompts in llama3.2, as trl's template
    renders it; --format hf adds the generation config transformers reads."""
    import llama_posttrain.llama.generate as llama_generate

    chat = ChatFormat(tok, "llama3.2")
    for i in range(2):
        train_state.export(random_model(CONFIG_513, seed=i), tmp_path / f"run{i}" / "model", 0, hf=False, chat=chat)
    inputs = [str(tmp_path / f"run{i}" / "model") for i in range(2)]
    average_main([*inputs, "--out", str(tmp_path / "avg")])
    average_main([*inputs, "--out", str(tmp_path / "avg_hf"), "--format", "hf"])
    capsys.readouterr()
    avg = tmp_path / "avg"
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(snapshot(avg))
    assert json.loads((avg / "tokenizer_config.json").read_text())["chat_template"] == (
        (TRL / TRL_FILES["llama3.2"]).read_text()
    )
    a, b = (load_file(Path(p) / "model.safetensors") for p in inputs)
    mean = load_file(avg / "model.safetensors")
    assert all(torch.allclose(mean[k].double(), (a[k].double() + b[k].double()) / 2, rtol=2**-24) for k in a)

    prompts = []

    def recording(model, ids, *args, **kw):
        prompts.extend(ids)
        return [[[tok.eot_id]] for _ in ids]

    monkeypatch.setattr(llama_generate, "generate", recording)
    # the reference: trl's llama3.2 template as transformers renders it, with the date llama.generate writes
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string((TRL / TRL_FILES["llama3.2"]).read_text()).render(
        messages=[{"role": "user", "content": "Hi"}], bos_token="<|begin_of_text|>", add_generation_prompt=True,
        date_string=DEFAULT_DATE,
    )  # fmt: skip
    expected = tok.encode(text, allow_special=True)
    llama_generate.main(["--checkpoint", str(avg), "--prompt", "Hi", "--device", "cpu"])
    out = capsys.readouterr().out
    assert f"tokenizer: {avg / 'tokenizer.json'} (from the checkpoint folder)" in out
    assert f"chat template: llama3.2 (from {avg / 'tokenizer_config.json'})" in out
    assert prompts.pop() == expected
    llama_generate.main(["--checkpoint", str(avg), "--tokenizer", str(DEFAULT_TOKENIZER), "--prompt", "Hi"])
    assert f"chat template: llama3.2 (from {avg / 'tokenizer_config.json'})" in capsys.readouterr().out
    assert prompts.pop() == expected

    hf = tmp_path / "avg_hf"
    assert GenerationConfig.from_pretrained(hf).eos_token_id == tok.stop_ids
    assert hf_template(hf) == (TRL / TRL_FILES["llama3.2"]).read_text()


def test_average_refuses_inputs_whose_tokenizers_or_templates_differ(tmp_path, tok, capsys):
    """Inputs trained with another chat template, another tokenizer, or holding none: refused naming both,
    nothing written. The same tokenizer as tokenizer.model in one and tokenizer.json in the other: averaged."""

    def export(name, template="llama3.2", tokenizer=tok):
        train_state.export(random_model(CONFIG_513), tmp_path / name, 0, chat=ChatFormat(tokenizer, template))
        return str(tmp_path / name)

    a = export("a")
    b = export("b", template="llama3.1")
    merge = tmp_path / "merge.tiktoken"
    merge.write_text(DEFAULT_TOKENIZER.read_text() + "YWI= 256\n")  # 256 bytes + "ab": another tokenizer
    c = export("c", tokenizer=load_tokenizer(merge))
    save_model(random_model(CONFIG_513), tmp_path / "d")  # no tokenizer
    d = str(tmp_path / "d")
    out = str(tmp_path / "out")
    cases = [
        (b, rf"cannot average {a} and {b}: their chat templates differ: llama3\.2 \({a}/tokenizer_config\.json\) "
            rf"and llama3\.1 \({b}/tokenizer_config\.json\)"),
        (c, rf"cannot average {a} and {c}: their tokenizers differ \({a}/tokenizer\.json and {c}/tokenizer\.json\)"),
        (d, rf"cannot average {a} and {d}: {a} holds a tokenizer \({a}/tokenizer\.json\) and {d} none"),
    ]  # fmt: skip
    for other, message in cases:
        with pytest.raises(SystemExit, match=message):
            average_main([a, other, "--out", out])
        assert not Path(out).exists()

    same = tmp_path / "e"
    save_model(random_model(CONFIG_513, seed=3), same)
    (same / "tokenizer.model").write_bytes(DEFAULT_TOKENIZER.read_bytes())
    (same / "tokenizer_config.json").write_text((tmp_path / "a" / "tokenizer_config.json").read_text())
    average_main([a, str(same), "--out", out])
    assert load_tokenizer(Path(out)).path.name == "tokenizer.json"
