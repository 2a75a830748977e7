"""Issue 17, round 2, model files: a folder's own tokenizer files are never replaced silently (convert, save,
training export, average), and the average carries the inputs' tokenizer, chat template and generation
config (inputs that disagree on them are refused). References: transformers (AutoTokenizer,
GenerationConfig) reading the folders, and trl's copies of the models' Jinja templates rendered by jinja2."""

import json
from pathlib import Path

import jinja2.sandbox
import pytest
import torch
import trl
from conftest import CONFIGS, random_model, with_fields
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig

from llama_posttrain.llama import CheckpointError, load_model, save_model
from llama_posttrain.llama.chat import DEFAULT_DATE, ChatFormat
from llama_posttrain.llama.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
from llama_posttrain.train import train_state
from llama_posttrain.train.average import main as average_main

CONFIG = with_fields(CONFIGS["gqa-untied-scaled"], vocab_size=513)  # the byte tokenizer (512 ids), or one merge more
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
    save_model(random_model(CONFIG, seed=5), d, format="hf", tokenizer=tok, chat_template=template)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "temperature": 0.6}))
    return snapshot(d)


# ----------------------------------------------------------------------------- item 2: a folder's tokenizer kept


def test_convert_into_an_hf_folder_refuses_to_replace_its_tokenizer_files(tmp_path, tok, capsys):
    """`llama.convert --from native --to hf SRC DST` into a folder with its own tokenizer_config.json (llama3.2),
    generation_config.json: refused before any work, naming them; kept as transformers reads them;
    --replace-tokenizer replaces them, and says so."""
    from llama_posttrain.llama.convert import main

    src, dst = tmp_path / "src", tmp_path / "dst"
    model = random_model(CONFIG, seed=1)
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
    save_model(random_model(CONFIG), src, tokenizer=tok, chat_template="llama3")
    save_model(random_model(CONFIG), dst, format="hf", tokenizer=tok, chat_template="llama3")
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
    llama_posttrain/train/average.py into a folder holding another chat template are refused, naming the file."""
    model = random_model(CONFIG)
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
                train_state.export(random_model(CONFIG, seed=i), tmp_path / f"in{i}", 0, chat=chat)
            with pytest.raises(SystemExit, match=match):
                average_main([str(tmp_path / "in0"), str(tmp_path / "in1"), "--out", str(d), "--format", "hf"])
        assert snapshot(d) == before, name
        assert hf_template(d) == (TRL / TRL_FILES["llama3.2"]).read_text()


# ----------------------------------------------------------------------------- item 11: the average is complete


def test_the_average_carries_tokenizer_template_and_generate_uses_them(tmp_path, tok, monkeypatch, capsys):
    """Two training exports (tokenizer, llama3.2 template) averaged: the average holds the tokenizer and the
    template; llama.generate on it (with and without --tokenizer) prompts in llama3.2, as trl's template
    renders it; --format hf adds the generation config transformers reads."""
    import llama_posttrain.llama.generate as llama_generate

    chat = ChatFormat(tok, "llama3.2")
    for i in range(2):
        train_state.export(random_model(CONFIG, seed=i), tmp_path / f"run{i}" / "model", 0, hf=False, chat=chat)
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
        train_state.export(random_model(CONFIG), tmp_path / name, 0, chat=ChatFormat(tokenizer, template))
        return str(tmp_path / name)

    a = export("a")
    b = export("b", template="llama3.1")
    merge = tmp_path / "merge.tiktoken"
    merge.write_text(DEFAULT_TOKENIZER.read_text() + "YWI= 256\n")  # 256 bytes + "ab": another tokenizer
    c = export("c", tokenizer=load_tokenizer(merge))
    save_model(random_model(CONFIG), tmp_path / "d")  # no tokenizer
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
    save_model(random_model(CONFIG, seed=3), same)
    (same / "tokenizer.model").write_bytes(DEFAULT_TOKENIZER.read_bytes())
    (same / "tokenizer_config.json").write_text((tmp_path / "a" / "tokenizer_config.json").read_text())
    average_main([a, str(same), "--out", out])
    assert load_tokenizer(Path(out)).path.name == "tokenizer.json"
