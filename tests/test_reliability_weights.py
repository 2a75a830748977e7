"""Model files under faults and bad input: nothing deleted that we did not write, no stray file read,
errors that name the file, no silent wrong tokenizer or random reward head, no NaN averaged."""

import json

import pytest
import torch
from conftest import CONFIGS, random_model, with_fields
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from llama_posttrain.llama import CheckpointError, load_model, save_model
from llama_posttrain.llama.tokenizer import DEFAULT_TOKENIZER, load_tokenizer, resolve_tokenizer
from llama_posttrain.train.average import average_checkpoints
from llama_posttrain.train.average import main as average_main

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


# ----------------------------------------------------------------------------- item 5: never delete others' files


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


# ----------------------------------------------------------------------------- item 8: only the named files are read


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


# ----------------------------------------------------------------------------- item 9: errors name the path


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


# ----------------------------------------------------------------------------- item 10: no silent wrong tokenizer/head


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


# ----------------------------------------------------------------------------- item 12: no NaN averaged


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
