"""The jobs' inputs (sample.py, evaluate.py, average.py, convert, prepare_data): no output onto an input,
averaging weights and values, human labels, the reward model's format, scores beside responses, a
linked Parquet shard, and the sampling job's unclear messages (a prompt over the context, a
missing --rm)."""

import dataclasses
import json
import os

import pytest
import torch
from conftest import random_model

from llama_posttrain.data.annotators import file_annotator, preference_pair
from llama_posttrain.data.drops import drop_report
from llama_posttrain.data.schema import Drop, ValidationError, parse_preference
from llama_posttrain.jobs.average import main as average_main
from llama_posttrain.jobs.averaging import average_checkpoints
from llama_posttrain.jobs.evaluate import main as evaluate_main
from llama_posttrain.jobs.sample import main as sample_main
from llama_posttrain.llama import get_preset, save_model
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.paths import check_outputs
from llama_posttrain.llama.tokenizer import load_tokenizer

CHAT = ChatFormat(load_tokenizer())
DEBUG = get_preset("debug")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prompts(tmp_path, n=3, long=()):
    """n prompt records; those in `long` longer than the debug model's context (2048 tokens)."""
    rows = [{"id": i, "prompt": ("x " * 1100 if i in long else f"{i}+1=")} for i in range(n)]
    return _write(tmp_path / "prompts.jsonl", rows)


# ------------------------------------------------------------------------------------------------ no output is an input


def test_check_outputs_finds_the_same_file_under_every_name(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    (tmp_path / "link.jsonl").symlink_to(data)
    os.link(data, tmp_path / "hard.jsonl")
    monkeypatch.chdir(tmp_path)
    for name in ("data.jsonl", "./sub/../data.jsonl", str(data), "link.jsonl", "hard.jsonl"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert os.path.samefile(name, data)  # the reference: the OS says it is the same file
        with pytest.raises(ValueError, match=rf"--out {name} is the same path as --in data.jsonl"):
            check_outputs({"--in": "data.jsonl"}, {"--out": name})
    with pytest.raises(ValueError, match=r"--out .*d\*.jsonl"):  # a glob input: its matches are inputs
        check_outputs({"--in": str(tmp_path / "d*.jsonl")}, {"--out": str(data)})
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"--out-report .*config.json is a file of --policy .*model"):
        check_outputs({"--policy": str(model)}, {"--out-report": str(model / "config.json")})
    with pytest.raises(ValueError, match=r"--out-pairs .*a.jsonl is the same path as --out-sft .*a.jsonl"):
        check_outputs({}, {"--out-sft": str(tmp_path / "a.jsonl"), "--out-pairs": str(tmp_path / "a.jsonl")})
    # a new file inside an input folder, or a path only named alike, changes nothing read
    check_outputs({"--policy": str(model), "--in": str(data)}, {"--out": str(model / "new.jsonl"), "--o": "data2"})


def test_sample_never_writes_over_its_prompts(tmp_path, monkeypatch):
    """The bug: `--prompts X --out-sft X` sampled, then replaced the prompts with the SFT records."""
    save_model(random_model(DEBUG), tmp_path / "policy")
    prompts = _prompts(tmp_path)
    before = prompts.read_bytes()
    (tmp_path / "alias.jsonl").symlink_to(prompts)
    monkeypatch.chdir(tmp_path)
    argv = ["--policy", "policy", "--prompts", "prompts.jsonl", "--k", "1", "--max-new-tokens", "2"]
    for out in ("prompts.jsonl", "./prompts.jsonl", "alias.jsonl", str(prompts)):
        with pytest.raises(SystemExit) as e:
            sample_main([*argv, "--out-sft", out])
        assert e.value.code == 2
        assert prompts.read_bytes() == before
    with pytest.raises(SystemExit):
        sample_main([*argv, "--out-report", "policy/config.json"])  # a file of the policy folder
    with pytest.raises(SystemExit):
        sample_main([*argv, "--out-sets", "s.jsonl", "--out-pairs", "s.jsonl"])  # one output over another


def test_sample_same_path_error_names_both_options(tmp_path, capsys):
    prompts = _prompts(tmp_path)
    with pytest.raises(SystemExit):
        sample_main(["--policy", "p", "--prompts", str(prompts), "--out-sft", str(prompts)])
    err = capsys.readouterr().err
    assert f"error: --out-sft {prompts} is the same path as --prompts {prompts}" in err


def test_evaluate_average_convert_prepare_refuse_an_output_that_is_an_input(tmp_path, capsys):
    from llama_posttrain.llama.convert import main as convert_main
    from llama_posttrain.train.prepare_data import main as prepare_main

    save_model(random_model(DEBUG, seed=0), tmp_path / "a")
    save_model(random_model(DEBUG, seed=1), tmp_path / "b")
    prompts = _prompts(tmp_path)
    before = {p: p.read_bytes() for p in [prompts, *(tmp_path / "a").iterdir()]}
    with pytest.raises(SystemExit):
        evaluate_main(["--model", str(tmp_path / "a"), "--prompts", str(prompts), "--verifier", "arithmetic",
                       "--out", str(prompts)])  # fmt: skip
    assert f"--out {prompts} is the same path as --prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"error: --out .*a is the same path as a checkpoint averaged"):
        average_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "a")])
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(load_tokenizer().path.read_bytes())
    with pytest.raises(SystemExit, match=r"error: DST .*tokenizer.model is the same path as --tokenizer"):
        convert_main(["--from", "native", "--to", "native", "--tokenizer", str(tok), str(tmp_path / "a"), str(tok)])
    config = tmp_path / "sft.yaml"
    data = _write(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]}])  # fmt: skip
    before[data] = data.read_bytes()
    config.write_text(f"model:\n  preset: debug\ndata:\n  train: {data}\n  cache_dir: {data}\n")
    with pytest.raises(SystemExit):
        prepare_main(["--kind", "sft", "--config", str(config)])
    assert f"data.cache_dir {data} is the same path as data.train {data}" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before


# ------------------------------------------------------------------------------------------------------------ averaging


@pytest.mark.parametrize("weights", [["nan", "1"], ["1", "nan"], ["inf", "nan"], ["nan", "nan"]])
def test_average_refuses_non_finite_weights(tmp_path, weights, capsys):
    save_model(random_model(DEBUG, seed=0), tmp_path / "a")
    save_model(random_model(DEBUG, seed=1), tmp_path / "b")
    w = [float(x) for x in weights]
    assert not (abs(sum(w) - 1) > 1e-6 or min(w) < 0)  # the old check let these through
    with pytest.raises(SystemExit) as e:  # the command line refuses them as every config's float (jobs/configs.py)
        average_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "avg"), "--weights", *weights])
    assert e.value.code == 2 and "argument --weights: weights: must be a finite number" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"weights must be 2 finite non-negative numbers summing to 1"):
        average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "avg", w)  # and so does the function
    assert not (tmp_path / "avg").exists()


def test_average_refuses_to_write_non_finite_values(tmp_path):
    """Finite float32 inputs whose average is beyond float16's range: the fp16 average would hold inf."""
    a, b = random_model(DEBUG, seed=0), random_model(DEBUG, seed=1)
    with torch.no_grad():
        a.norm.weight.fill_(1e5)
        b.norm.weight.fill_(2e5)
    save_model(a, tmp_path / "a")
    save_model(b, tmp_path / "b")
    mean = (a.norm.weight.double() + b.norm.weight.double()) / 2  # the reference, in float64
    assert mean.min() > torch.finfo(torch.float16).max  # so the float16 average is inf
    with pytest.raises(SystemExit, match=r"error: tensor norm.weight: the average has 32 non-finite values"):
        average_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "avg"), "--dtype", "float16"])
    assert not (tmp_path / "avg" / "model.safetensors").exists()


# --------------------------------------------------------------------------------------------------------- human labels


@pytest.mark.parametrize(
    "label, field",
    [
        ({"id": "a", "ranking": [0, 0, 0, 1]}, r"ranking\[1\]: response 0 is ranked twice"),
        ({"id": "a", "ranking": [-1, 0, 1, 2]}, r"ranking\[0\]: -1 is not a response index 0..3"),
        ({"id": "a", "ranking": [0, 1, 4, 2]}, r"ranking\[2\]: 4 is not a response index 0..3"),
        ({"id": "a", "ranking": [0.0, 1, 2, 3]}, r"ranking\[0\]: must be a response index \(an integer\), got 0.0"),
        ({"id": "a", "ranking": [True, 0]}, r"ranking\[0\]: must be a response index"),
        ({"id": "a", "scores": [1.0, float("nan"), 0.0, 2.0]}, r"scores\[1\]: must be a finite number, got nan"),
        ({"id": "a", "scores": [1.0, float("inf"), 0.0, 2.0]}, r"scores\[1\]: must be a finite number, got inf"),
        ({"id": "a", "scores": [1, "2", 0, 3]}, r"scores\[1\]: must be a finite number"),
        ({"id": "a", "scores": [1, 2, 0, 3], "ranking": [0, 1, 2, 3]}, r"scores/ranking: both given"),
        ({"id": "a"}, r"scores/ranking: missing"),
        ({"scores": [1, 2, 0, 3]}, r"id: missing"),
        ({"id": 1.5, "scores": [1, 2, 0, 3]}, r"id: missing, or not a string or an integer \(got 1.5\)"),
        ({"id": ["a"], "scores": [1, 2, 0, 3]}, r"id: missing, or not a string or an integer"),
        ([1, 2], r"record: a label is a JSON object"),
    ],
)
def test_a_bad_label_is_refused_with_its_file_line_and_field(tmp_path, label, field):
    path = _write(tmp_path / "labels.jsonl", [{"id": "ok", "scores": [1, 0, 2, 3]}, label])
    with pytest.raises(ValidationError, match=rf"labels.jsonl:2: {field}"):
        file_annotator(path)


def test_a_ranking_is_a_permutation_read_best_first(tmp_path):
    """Every permutation of 4 gives scores whose order is the ranking (the reference: sorting by them)."""
    from itertools import permutations

    texts = ["r0", "r1", "r2", "r3"]
    rows = [{"id": n, "ranking": list(p)} for n, p in enumerate(permutations(range(4)))]
    annotate = file_annotator(_write(tmp_path / "labels.jsonl", rows), responses=4)
    for row in rows:
        scores = annotate({"id": row["id"], "messages": [{"role": "user", "content": "q"}]}, texts)
        assert sorted(range(4), key=lambda j: -scores[j]) == row["ranking"]
        pair = preference_pair({"messages": []}, texts, scores)
        assert (pair["chosen"], pair["rejected"]) == (texts[row["ranking"][0]], texts[row["ranking"][-1]])


def test_a_label_for_another_number_of_responses_names_its_line(tmp_path):
    path = _write(tmp_path / "labels.jsonl", [{"id": "a", "scores": [1, 0, 2]}, {"id": "b", "ranking": [1, 0]}])
    with pytest.raises(ValidationError, match=r"labels.jsonl:2: scores: .*prompt id 'b' scores 2 samples, there are 3"):
        file_annotator(path, responses=3)  # sample.py checks against --k as it reads the file
    annotate = file_annotator(path)
    with pytest.raises(ValidationError, match=r"labels.jsonl:1: scores: .*prompt id 'a' scores 3 samples, there are 4"):
        annotate({"id": "a"}, ["w", "x", "y", "z"])


def test_partial_labels_pair_the_labelled_sets_and_count_the_rest(tmp_path, monkeypatch):
    import llama_posttrain.jobs.sampling as train_sample

    texts = ["1", "22", "333"]
    monkeypatch.setattr(  # a stand-in policy: three finished samples per prompt
        train_sample, "sample", lambda policy, chat, prompts, k, *a, **kw: ([texts] * len(prompts), [[True] * k] * len(prompts))
    )  # fmt: skip
    labels = _write(tmp_path / "labels.jsonl", [{"id": 1, "ranking": [2, 0, 1]}, {"id": 3, "scores": [0, 5, 1]}])
    records = [{"id": i, "messages": [{"role": "user", "content": f"{i}"}]} for i in range(5)]
    annotate = file_annotator(labels, responses=3)
    _, pairs, _, dropped = train_sample.rejection_sample(records, None, None, CHAT, 3, 4, None, annotate=annotate)
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [(1, "333", "22"), (3, "22", "1")]
    labelled = {json.loads(line)["id"] for line in labels.read_text().splitlines()}
    assert dropped["no_pair_unlabelled"] == len({r["id"] for r in records} - labelled) == 3
    lines, _ = drop_report(dropped, 5, 3, "--max-new-tokens 4")
    assert "3 of 5 prompts the labels file has no label for: no pair" in lines


# -------------------------------------------------------------------------------------- the RM's tokenizer and template


def test_an_rm_of_another_chat_template_or_tokenizer_is_refused(tmp_path, capsys):
    save_model(random_model(DEBUG), tmp_path / "policy", tokenizer=load_tokenizer(), chat_template="llama3")
    rm = random_model(DEBUG, head="reward", seed=1)
    save_model(rm, tmp_path / "rm32", tokenizer=load_tokenizer(), chat_template="llama3.2")
    prompts = _prompts(tmp_path)
    argv = ["--policy", str(tmp_path / "policy"), "--prompts", str(prompts), "--k", "1", "--max-new-tokens", "2"]
    with pytest.raises(SystemExit, match=r"error: --rm .*rm32: its chat template is llama3.2 \(.*\), the policy's "
                                         r"samples are written in llama3"):  # fmt: skip
        sample_main([*argv, "--rm", str(tmp_path / "rm32"), "--out-sets", str(tmp_path / "s.jsonl")])
    with pytest.raises(SystemExit, match=r"error: --rm .*rm32: its chat template is llama3.2"):
        evaluate_main(["--model", str(tmp_path / "policy"), "--prompts", str(prompts), "--rm", str(tmp_path / "rm32"),
                       "--out", str(tmp_path / "e.json")])  # fmt: skip
    # another tokenizer: the byte tokenizer plus one merge (513 ids)
    other = tmp_path / "other.tiktoken"
    import base64

    other.write_text(load_tokenizer().path.read_text() + f"{base64.b64encode(b'+1').decode()} 256\n")
    rm513 = random_model(dataclasses.replace(DEBUG, vocab_size=513), head="reward", seed=1)
    save_model(rm513, tmp_path / "rm513", tokenizer=load_tokenizer(other), chat_template="llama3")
    with pytest.raises(SystemExit, match=r"error: --safety-rm .*rm513: its tokenizer \(.*\) is not the policy's"):
        sample_main([*argv, "--safety-rm", str(tmp_path / "rm513"), "--out-sets", str(tmp_path / "s.jsonl")])
    assert not (tmp_path / "s.jsonl").exists()


def test_an_rm_without_tokenizer_files_is_scored_in_the_policys_format_and_says_so(tmp_path, capsys):
    save_model(random_model(DEBUG), tmp_path / "policy")
    save_model(random_model(DEBUG, head="reward", seed=1), tmp_path / "rm")
    sample_main(["--policy", str(tmp_path / "policy"), "--rm", str(tmp_path / "rm"), "--prompts",
                 str(_prompts(tmp_path)), "--k", "2", "--max-new-tokens", "2", "--out-sets", str(tmp_path / "s.jsonl")])  # fmt: skip
    assert "holds no tokenizer or chat template files, so they are not compared" in capsys.readouterr().out
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 3


# ---------------------------------------------------------------------------------------------- scores beside responses


def test_scores_beside_responses_rank_them_and_ties_are_dropped_and_counted(tmp_path):
    from llama_posttrain.data.loader import load_examples

    responses, scores = ["a", "b", "c", "d", "e"], [0.5, 2.0, 0.5, -1.0, 2.0]
    record = {"prompt": "q", "responses": responses, "scores": scores}
    got = [r[0]["content"] for r in parse_preference(record, "f:1").responses]
    # the reference: the distinct scores, high to low, each with the first response that has it
    distinct = sorted(set(scores), reverse=True)
    assert got == [responses[scores.index(s)] for s in distinct] == ["b", "a", "d"]
    assert parse_preference(record, "f:1").tied == len(scores) - len(distinct) == 2
    with pytest.raises(Drop, match="tied scores"):
        parse_preference({**record, "scores": [1, 1, 1, 1, 1]}, "f:1")
    data = _write(
        tmp_path / "sets.jsonl", [record, {**record, "scores": [3, 2, 1, 0, -1]}, {**record, "scores": [1] * 5}]
    )
    _, report = load_examples(data, "rm", CHAT, 256, verbose=False)
    assert report["dropped: responses tied with another's score"] == 2 and report["dropped: tied scores"] == 1


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"scores": [1.0, float("nan")]}, r"scores\[1\]: must be a finite number, got nan"),
        ({"scores": [1.0, None, 2.0]}, r"scores: must be a list of one number per response \(2\)"),
        ({"scores": [True, 0]}, r"scores\[0\]: must be a finite number"),
        ({"rm_scores": [0.1, 0.9]}, r"responses: a set of samples to label"),
    ],
)
def test_bad_scores_beside_responses_are_refused(extra, field):
    with pytest.raises(ValidationError, match=rf"f.jsonl:7: {field}"):
        parse_preference({"prompt": "q", "responses": ["a", "b"], **extra}, "f.jsonl:7")


# ----------------------------------------------------------------------------------------------- a linked Parquet shard


def test_a_linked_duplicate_parquet_shard_is_read_once_and_printed(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from llama_posttrain.data.records import read_records

    d = tmp_path / "data"
    d.mkdir()
    rows = [{"prompt": f"p{i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), d / "train-0.parquet")
    (d / "train-1.parquet").symlink_to(d / "train-0.parquet")
    got = [r for _, r in read_records(d)]
    assert got == rows  # the reference: the one real file's rows, once
    assert (
        f"data path {d}: {d / 'train-1.parquet'} is the same file as {d / 'train-0.parquet'}" in capsys.readouterr().out
    )


# ----------------------------------------------------------------------------- unclear messages


def test_a_prompt_longer_than_the_context_is_skipped_and_counted(tmp_path, capsys):
    save_model(random_model(DEBUG), tmp_path / "policy")
    save_model(random_model(DEBUG, head="reward", seed=1), tmp_path / "rm")
    prompts = _prompts(tmp_path, n=4, long=(1,))
    max_new = 3
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    lengths = [
        len(CHAT.encode_dialog([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)) for r in records
    ]
    over = [r["id"] for r, n in zip(records, lengths) if n + max_new > DEBUG.max_seq_len]  # the reference
    assert over == [1]
    sample_main(["--policy", str(tmp_path / "policy"), "--rm", str(tmp_path / "rm"), "--prompts", str(prompts),
                 "--k", "2", "--max-new-tokens", str(max_new), "--out-sets", str(tmp_path / "sets.jsonl"),
                 "--out-report", str(tmp_path / "report.json")])  # fmt: skip
    sets = [json.loads(line) for line in (tmp_path / "sets.jsonl").read_text().splitlines()]
    assert [s["id"] for s in sets] == [i for i in range(4) if i not in over]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dropped"]["prompt_too_long"] == len(over) and report["prompts"] == 4 and report["samples"] == 3 * 2
    out = capsys.readouterr().out
    assert f"skipped 1 of 4 prompts: prompt + --max-new-tokens 3 over the context of {DEBUG.max_seq_len}" in out
    assert "samples: 6 (3 prompts x 2)" in out
    assert "1 of 4 prompts whose tokens + --max-new-tokens 3 exceed the policy's context: skipped" in out


def test_a_missing_rm_is_a_clear_error(tmp_path):
    save_model(random_model(DEBUG), tmp_path / "policy")
    argv = ["--policy", str(tmp_path / "policy"), "--prompts", str(_prompts(tmp_path))]
    with pytest.raises(SystemExit, match=rf"^error: --rm {tmp_path / 'nope'}: "):
        sample_main([*argv, "--rm", str(tmp_path / "nope")])


def test_labels_for_ids_no_prompt_has_are_printed(tmp_path, capsys):
    """A label whose id no prompt has (a typo) would otherwise be ignored without a word."""
    labels = _write(tmp_path / "labels.jsonl", [{"id": 0, "scores": [1, 0]}, {"id": "O", "scores": [0, 1]}])
    argv = ["--policy", str(tmp_path / "nope"), "--prompts", str(_prompts(tmp_path)), "--k", "2"]
    with pytest.raises(SystemExit, match="error: --policy"):  # the labels are read before the policy
        sample_main([*argv, "--annotate", f"file:{labels}"])
    assert "1 labels for ids no prompt has, unused: ['O']" in capsys.readouterr().out
