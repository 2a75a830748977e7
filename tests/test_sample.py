"""Rejection sampling: scores of a shared reward row, best-of-K selection, pairs, annotators."""

import base64
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_model

from llama_posttrain.data.annotators import file_annotator, verifier_annotator
from llama_posttrain.data.schema import ValidationError, parse_preference
from llama_posttrain.jobs.sample import main as sample_main
from llama_posttrain.jobs.sampling import read_prompts, rejection_sample
from llama_posttrain.jobs.scoring import combine_llama2, score
from llama_posttrain.llama import get_preset, save_model
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer
from llama_posttrain.train.distributed import torchrun_command

CHAT = ChatFormat(load_tokenizer())
ROOT = Path(__file__).parent.parent


def test_scores_equal_separate_rows():
    rm = random_model(get_preset("debug"), head="reward")
    prompts = [[{"role": "user", "content": "12+30="}], [{"role": "user", "content": "hello"}]]
    responses = [["42", "41", "forty-two", "4 2"], ["hi", "hey there", "x"]]
    for max_len in (512, 45):  # 45: the responses of a prompt are split over several rows
        got = score(rm, CHAT, prompts, responses, max_len=max_len)
        for p, texts in enumerate(responses):
            for j, text in enumerate(texts):
                ids = CHAT.encode_dialog(prompts[p] + [{"role": "assistant", "content": text}]).tokens
                with torch.no_grad():
                    alone = rm(torch.tensor([ids]))[0, -1].item()
                assert got[p][j] == pytest.approx(alone, abs=1e-5), (max_len, p, j)


def test_rejection_sample_keeps_the_best_and_pairs_by_annotator():
    torch.manual_seed(0)
    policy = random_model(get_preset("debug"))
    rm = random_model(get_preset("debug"), head="reward", seed=1)
    records = [{"id": i, "messages": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(3)]
    gen = torch.Generator().manual_seed(0)
    calls = []

    def annotate(record, texts):
        calls.append(texts)
        return [float(len(t)) for t in texts]  # a stand-in judge: longer is better

    sft, pairs, sets, _ = rejection_sample(records, policy, rm, CHAT, 6, 12, gen, temperature=1.5, annotate=annotate)
    assert len(sets) == 3 and all(len(s["responses"]) == 6 for s in sets)
    for s in sets:
        ok = [j for j in range(6) if s["finished"][j] and s["responses"][j].strip()]
        match = [r for r in sft if r["id"] == s["id"]]
        if not ok:
            assert not match
            continue
        best = max(ok, key=lambda j: s["rm_scores"][j])
        assert match[0]["messages"][-1] == {"role": "assistant", "content": s["responses"][best]}
        assert match[0]["score"] == s["rm_scores"][best]
    for p in pairs:
        assert len(p["chosen"]) > len(p["rejected"])


def test_verifier_and_file_annotators(tmp_path):
    from llama_posttrain.data.tasks.arithmetic import verify

    rec = {"id": "a", "messages": [{"role": "user", "content": "17+25="}]}
    assert verifier_annotator(verify)(rec, ["42", " 42\n", "41", "4 2"]) == [1.0, 1.0, 0.0, 0.0]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        json.dumps({"id": "a", "ranking": [2, 0, 1]}) + "\n" + json.dumps({"id": "b", "scores": [0.5, 0.1]}) + "\n"
    )
    ann = file_annotator(labels)
    assert ann(rec, ["x", "y", "z"]) == [2.0, 1.0, 3.0]
    assert ann({"id": "b"}, ["p", "q"]) == [0.5, 0.1]
    assert ann({"id": "c"}, ["p"]) is None  # not labelled: the caller counts it (partial labelling)


def test_llama2_score_combination():
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert combine_llama2(helpful=logit(0.9), safety=logit(0.5), is_safety_prompt=False) == pytest.approx(logit(0.9))
    assert combine_llama2(helpful=logit(0.9), safety=logit(0.1), is_safety_prompt=False) == pytest.approx(logit(0.1))
    assert combine_llama2(helpful=logit(0.9), safety=logit(0.6), is_safety_prompt=True) == pytest.approx(logit(0.6))


@pytest.mark.slow
def test_cli_two_ranks_write_every_prompt(tmp_path):
    """Rank r samples prompts r, r + 2, ... with a generator seeded with --seed + 1000003 * r; rank 0
    writes them all in prompt order."""
    from llama_posttrain.jobs.sampling import rank_seed, sample_records

    policy, rm = stopping_policy(), random_model(get_preset("debug"), head="reward")
    save_model(policy, tmp_path / "policy")
    save_model(rm, tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"{i}+1="}) + "\n" for i in range(5)))
    assert [r["id"] for r in read_prompts(prompts)] == list(range(5))
    cmd = torchrun_command(str(ROOT / "llama_posttrain" / "jobs" / "sample.py"), 2, [
        "--policy", str(tmp_path / "policy"), "--rm", str(tmp_path / "rm"), "--prompts", str(prompts), "--k", "4",
        "--max-new-tokens", "8", "--annotate", "verifier:arithmetic", "--out-sft", str(tmp_path / "sft.jsonl"),
        "--out-pairs", str(tmp_path / "pairs.jsonl"), "--out-sets", str(tmp_path / "sets.jsonl"), "--seed", "7",
    ])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    sets = [json.loads(line) for line in (tmp_path / "sets.jsonl").read_text().splitlines()]
    assert [s["id"] for s in sets] == list(range(5))
    assert all(len(s["responses"]) == 4 for s in sets)
    assert rank_seed(7, 0) == 7 and rank_seed(7, 1) == 7 + 1000003
    records = read_prompts(prompts)
    for rank in (0, 1):
        generator = torch.Generator().manual_seed(7 + 1000003 * rank)
        mine = sample_records(records[rank::2], policy, rm, CHAT, 4, 8, generator)
        assert [s["responses"] for _, _, s, _ in mine] == [s["responses"] for s in sets[rank::2]], rank


def test_generated_fields_win_over_the_prompt_records_own(monkeypatch):
    import llama_posttrain.jobs.sampling as train_sample

    rm = random_model(get_preset("debug"), head="reward", seed=1)
    texts = ["1", "22", "333", "4444", "55555", "666666"]  # a stand-in policy: all finished, distinct lengths
    monkeypatch.setattr(
        train_sample,
        "sample",
        lambda policy, chat, prompts, k, *a, **kw: ([texts] * len(prompts), [[True] * k] * len(prompts)),
    )
    own = {"chosen": "IN-C", "rejected": "IN-R", "responses": ["IN-1", "IN-2"], "score": 99.0, "scores": [9.0]}
    own |= {"rm_scores": [8.0], "finished": [False], "strength": "slightly_better", "edited": "IN-E", "source": "x"}
    records = [{"id": i, "messages": [{"role": "user", "content": f"{i}+{i}="}], **own} for i in range(3)]
    gen = torch.Generator().manual_seed(0)
    sft, pairs, sets, dropped = rejection_sample(
        records, None, rm, CHAT, 6, 12, gen, annotate=lambda r, ts: [float(len(t)) for t in ts]
    )
    assert len(sft) == len(pairs) == len(sets) == 3 and not dropped
    generated = {"id", "source"}  # besides the generated fields, only these: nothing of the input on top
    for outputs, keys in ((sft, {"messages", "score", "scores"}), (pairs, {"prompt", "chosen", "rejected", "scores"})):
        assert all(set(out) == generated | keys for out in outputs)
    assert all(set(s) == generated | {"prompt", "responses", "finished", "rm_scores"} for s in sets)
    for out in sft + pairs + sets:
        assert out["source"] == {"id": out["id"], **own}, "the input record's fields go under 'source'"
    for s in sets:
        assert s["responses"] == texts and s["finished"] == [True] * 6 and len(s["rm_scores"]) == 6
    for r in sft:
        assert r["score"] == max(r["scores"]) != 99.0 and len(r["scores"]) == 6
    for p in pairs:
        assert (p["chosen"], p["rejected"], p["scores"]) == ("666666", "1", [6.0, 1.0])
        # what DPO reads from the written pair: the generated responses, not the input's
        parsed = parse_preference(p, "pairs.jsonl:1")
        assert [m[0]["content"] for m in parsed.responses] == [p["chosen"], p["rejected"]]
        assert parsed.strength is None


def test_prompt_record_with_its_own_messages_is_refused(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "messages": [{"role": "user", "content": "2+2="}]}) + "\n")
    with pytest.raises(ValidationError, match=r"prompts.jsonl:1: messages"):
        read_prompts(path)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--k", "0"),
        ("--k", "-1"),
        ("--max-new-tokens", "0"),
        ("--temperature", "-0.5"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
    ],
)
def test_cli_rejects_bad_numbers(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        sample_main(["--policy", "p", "--prompts", "x.jsonl", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def _prompts(tmp_path, n=3):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"{i}+1="}) + "\n" for i in range(n)))
    return path


def test_cli_refuses_an_lm_checkpoint_as_reward_model(tmp_path):
    save_model(random_model(get_preset("debug")), tmp_path / "policy")
    argv = ["--policy", str(tmp_path / "policy"), "--prompts", str(_prompts(tmp_path)), "--k", "2"]
    for flag in ("--rm", "--safety-rm"):
        with pytest.raises(SystemExit, match=rf"{flag} .*policy: not a reward model .*freshly initialized"):
            sample_main([*argv, flag, str(tmp_path / "policy")])


def test_cli_takes_the_tokenizer_from_the_policy_folder(tmp_path):
    """A 513-id model (the byte tokenizer plus one merge): without a tokenizer in its folder it must not
    sample with the shipped 512-id byte tokenizer; with one there, that one is used."""
    config = dataclasses.replace(get_preset("debug"), vocab_size=513)
    save_model(random_model(config), tmp_path / "policy")
    argv = ["--policy", str(tmp_path / "policy"), "--prompts", str(_prompts(tmp_path)), "--k", "2"]
    with pytest.raises(
        SystemExit, match=r"policy: checkpoint .*policy has vocab_size 513 .*pass the model's tokenizer"
    ):
        sample_main([*argv, "--max-new-tokens", "4"])
    merges = (
        ROOT / "llama_posttrain" / "llama" / "assets" / "bytes.tiktoken"
    ).read_text() + f"{base64.b64encode(b'+1').decode()} 256\n"
    (tmp_path / "policy" / "tokenizer.model").write_text(merges)
    cmd = [sys.executable, str(ROOT / "llama_posttrain" / "jobs" / "sample.py"), *argv, "--max-new-tokens", "4"]
    cmd += ["--out-sets", str(tmp_path / "sets.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"tokenizer: {tmp_path / 'policy' / 'tokenizer.model'} (from the checkpoint folder)" in out.stdout
    assert len((tmp_path / "sets.jsonl").read_text().splitlines()) == 3


def test_single_process_run_uses_init_distributed_and_tears_the_group_down(tmp_path, monkeypatch):
    """The one process-group setup (it sets the CUDA device per local rank) serves sample.py too."""
    import torch.distributed as dist

    import llama_posttrain.jobs.sampling as sampling

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored afterwards: init_distributed sets them
    calls = []
    real = sampling.init_distributed  # the run's (sample.py imports sampling.py when it runs, not at --help)
    monkeypatch.setattr(sampling, "init_distributed", lambda: calls.append(1) or real())
    save_model(random_model(get_preset("debug")), tmp_path / "policy")
    save_model(random_model(get_preset("debug"), head="reward"), tmp_path / "rm")
    argv = ["--policy", str(tmp_path / "policy"), "--rm", str(tmp_path / "rm"), "--prompts", str(_prompts(tmp_path))]
    sample_main([*argv, "--k", "3", "--max-new-tokens", "4", "--out-sets", str(tmp_path / "sets.jsonl")])
    assert calls == [1] and not dist.is_initialized()
    sets = [json.loads(line) for line in (tmp_path / "sets.jsonl").read_text().splitlines()]
    assert [s["id"] for s in sets] == [0, 1, 2] and all(len(s["rm_scores"]) == 3 for s in sets)


class _StandInLLM:
    """vllm.LLM's generate: per prompt n completions, the first ending on the stop id (kept in token_ids),
    the second on it too (left out of token_ids, as some vLLM versions do), the third cut at max_tokens."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        from types import SimpleNamespace as NS

        self.calls.append((prompts, params))
        eot, tok = CHAT.tokenizer.eot_id, CHAT.tokenizer
        outs = []
        for i, _ in enumerate(prompts):
            a, b, c = (tok.encode(f"answer {i}.{j}") for j in range(3))
            outs.append(NS(outputs=[
                NS(token_ids=(*a, eot), finish_reason="stop", stop_reason=eot),
                NS(token_ids=tuple(b), finish_reason="stop", stop_reason=eot),
                NS(token_ids=tuple(c), finish_reason="length", stop_reason=None),
            ]))  # fmt: skip
        return outs


def test_vllm_engine_renders_prompts_to_ids_and_maps_samples_back():
    from llama_posttrain.jobs.vllm_engine import VLLMEngine

    llm = _StandInLLM()
    engine = VLLMEngine(llm, lambda **kw: kw, seed=5)
    rm = random_model(get_preset("debug"), head="reward", seed=1)
    records = [{"id": i, "messages": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(2)]
    sft, pairs, sets, _ = rejection_sample(records, engine, rm, CHAT, 3, 12, None, temperature=0.7, top_p=0.9)
    ((prompts, params),) = llm.calls  # one call: vLLM batches all prompts itself
    assert prompts == [
        {"prompt_token_ids": CHAT.encode_dialog(r["messages"], add_generation_prompt=True).tokens} for r in records
    ]
    assert params == dict(
        n=3, temperature=0.7, top_p=0.9, top_k=-1, max_tokens=12, seed=5,
        stop_token_ids=list(CHAT.tokenizer.stop_ids), detokenize=False,
    )  # fmt: skip
    texts = [[f"answer {i}.{j}" for j in range(3)] for i in range(2)]
    assert [s["responses"] for s in sets] == texts and [s["id"] for s in sets] == [0, 1]
    assert all(s["finished"] == [True, True, False] for s in sets)  # the stop id restored on the second
    expected = score(rm, CHAT, [r["messages"] for r in records], texts)
    assert [x for s in sets for x in s["rm_scores"]] == pytest.approx([x for e in expected for x in e], abs=1e-6)
    assert [r["messages"][-1]["content"] for r in sft] == [
        texts[i][max((0, 1), key=lambda j: expected[i][j])] for i in range(2)
    ]  # best of the finished samples by the reward model


def test_vllm_engine_without_vllm_names_the_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda name, *a, **kw: _raise_import(name) if name == "vllm" else real_import(name, *a, **kw),
    )
    save_model(random_model(get_preset("debug")), tmp_path / "policy")
    argv = ["--policy", str(tmp_path / "policy"), "--prompts", str(_prompts(tmp_path)), "--engine", "vllm"]
    with pytest.raises(SystemExit, match=r"--engine vllm needs vLLM and a CUDA GPU: pip install vllm .*not installed"):
        sample_main(argv)


def _raise_import(name):
    raise ImportError(f"No module named {name!r}")


def stopping_policy(factor: float = 30.0):
    """A random debug model (untied) whose stop tokens' output rows are scaled up: most samples end their
    turn within a few tokens, so that sampling yields SFT records and pairs."""
    model = random_model(dataclasses.replace(get_preset("debug"), tie_embeddings=False))
    with torch.no_grad():
        model.output.weight[list(CHAT.tokenizer.stop_ids)] *= factor
    return model


def _clear_dist_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored afterwards: init_distributed sets them


@pytest.mark.parametrize("annotator", ["rm", "verifier"])  # the rs stage's, the pref stage's
def test_cli_one_rank_writes_what_the_in_process_rejection_sample_writes(tmp_path, monkeypatch, annotator):
    """The driver's sampling job (--seed S, 1 rank) against the pipeline's in-process call (a generator
    seeded with S, batch 64, default max_len): the same SFT records, pairs and sets, byte for byte. 70
    prompts: two batches of 64 and 6. The summary goes to --out-report and the progress file."""
    from llama_posttrain.data.io import write_jsonl
    from llama_posttrain.data.tasks.arithmetic import Arithmetic
    from llama_posttrain.llama import load_model
    from llama_posttrain.train import progress

    _clear_dist_env(monkeypatch)
    save_model(stopping_policy(), tmp_path / "policy")
    save_model(random_model(get_preset("debug"), head="reward", seed=1), tmp_path / "rm")
    task = Arithmetic(max_digits=1, noise=0.35)
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, task.prompts(70, 3, "r1rs"))
    seed, k = 2001, 3  # the driver's seed * 1000 + round
    records = read_prompts(prompts)
    policy, reward = load_model(tmp_path / "policy").eval(), load_model(tmp_path / "rm").eval()
    expected = rejection_sample(
        records, policy, reward, CHAT, k, 8, torch.Generator().manual_seed(seed), 1.0,
        annotate=verifier_annotator(task.verify) if annotator == "verifier" else None,
    )  # fmt: skip
    verifier = ["--annotate", "verifier:arithmetic", "--task-args", '{"max_digits": 1, "noise": 0.35}']
    for name, recs in zip(("sft", "pairs", "sets"), expected):
        write_jsonl(tmp_path / f"expected_{name}.jsonl", recs)
    monkeypatch.setenv(progress.ENV, str(tmp_path / "progress.json"))
    sample_main([
        "--policy", str(tmp_path / "policy"), "--rm", str(tmp_path / "rm"), "--prompts", str(prompts),
        "--k", str(k), "--max-new-tokens", "8", "--seed", str(seed), *(verifier if annotator == "verifier" else []),
        "--out-report", str(tmp_path / "report.json"),
        *(x for name in ("sft", "pairs", "sets") for x in (f"--out-{name}", str(tmp_path / f"{name}.jsonl"))),
    ])  # fmt: skip
    for name in ("sft", "pairs", "sets"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (tmp_path / f"expected_{name}.jsonl").read_bytes(), name
    sft, pairs, _, dropped = expected
    assert len(sft) > 50 and (len(pairs) > 20 if annotator == "rm" else dropped["no_pair_tied_scores"] > 20)
    assert json.loads((tmp_path / "report.json").read_text()) == {
        "prompts": 70, "samples": 210, "sft": len(sft), "pairs": len(pairs), "dropped": dict(sorted(dropped.items())),
    }  # fmt: skip
    assert {key: progress.read(tmp_path / "progress.json")[key] for key in ("done", "total", "unit")} == {
        "done": 70, "total": 70, "unit": "prompts",
    }  # fmt: skip


def test_task_args_make_the_verifiers_task_and_bad_ones_are_refused(tmp_path, capsys):
    from llama_posttrain.data.tasks.arithmetic import Arithmetic
    from llama_posttrain.jobs.sampling import task_from_flags

    assert task_from_flags("arithmetic", {"max_digits": 1, "noise": 0.1}) == Arithmetic(max_digits=1, noise=0.1)
    save_model(random_model(get_preset("debug")), tmp_path / "policy")
    argv = ["--policy", str(tmp_path / "policy"), "--prompts", str(_prompts(tmp_path)), "--k", "2"]
    for args, message in [
        (["--task-args", "[1]"], "argument --task-args: must be a JSON object"),
        (["--task-args", "{max_digits: 1}"], "argument --task-args: not valid JSON"),
        (["--task-args", "{}"], "argument --task-args: the arguments of --annotate verifier:TASK's task"),
    ]:
        with pytest.raises(SystemExit) as e:
            sample_main([*argv, *args])
        assert e.value.code == 2 and message in capsys.readouterr().err
    verifier = ["--annotate", "verifier:arithmetic"]
    for task_args, message in [
        ('{"max_digits": 0}', r"--task-args: max_digits: must be >= 1"),
        ('{"digits": 2}', r"--task-args: unknown key\(s\) digits"),
        ('{"max_digits": "two"}', r"--task-args: max_digits"),
    ]:
        with pytest.raises(SystemExit, match=rf"--annotate verifier:arithmetic: {message}"):
            sample_main([*argv, *verifier, "--task-args", task_args])
