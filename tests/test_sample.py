"""Rejection sampling: scores of a shared reward row, best-of-K selection, pairs, annotators."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_model

from llama import get_preset, save_model
from llama.chat import ChatFormat
from llama.tokenizer import load_tokenizer
from train.sample import combine_llama2, file_annotator, read_prompts, rejection_sample, score, verifier_annotator

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

    sft, pairs, sets = rejection_sample(records, policy, rm, CHAT, 6, 12, gen, temperature=1.5, annotate=annotate)
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
    from data.tasks.arithmetic import verify

    rec = {"id": "a", "messages": [{"role": "user", "content": "17+25="}]}
    assert verifier_annotator(verify)(rec, ["42", " 42\n", "41", "4 2"]) == [1.0, 1.0, 0.0, 0.0]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        json.dumps({"id": "a", "ranking": [2, 0, 1]}) + "\n" + json.dumps({"id": "b", "scores": [0.5, 0.1]}) + "\n"
    )
    ann = file_annotator(labels)
    assert ann(rec, ["x", "y", "z"]) == [2.0, 1.0, 3.0]
    assert ann({"id": "b"}, ["p", "q"]) == [0.5, 0.1]
    with pytest.raises(KeyError, match="no label for prompt id 'c'"):
        ann({"id": "c"}, ["p"])


def test_llama2_score_combination():
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert combine_llama2(helpful=logit(0.9), safety=logit(0.5), is_safety_prompt=False) == pytest.approx(logit(0.9))
    assert combine_llama2(helpful=logit(0.9), safety=logit(0.1), is_safety_prompt=False) == pytest.approx(logit(0.1))
    assert combine_llama2(helpful=logit(0.9), safety=logit(0.6), is_safety_prompt=True) == pytest.approx(logit(0.6))


def test_cli_two_ranks_write_every_prompt(tmp_path):
    save_model(random_model(get_preset("debug")), tmp_path / "policy")
    save_model(random_model(get_preset("debug"), head="reward"), tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"{i}+1="}) + "\n" for i in range(5)))
    assert [r["id"] for r in read_prompts(prompts)] == list(range(5))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train" / "sample.py"),
        "--policy", str(tmp_path / "policy"), "--rm", str(tmp_path / "rm"), "--prompts", str(prompts), "--k", "4",
        "--max-new-tokens", "8", "--annotate", "verifier:arithmetic", "--out-sft", str(tmp_path / "sft.jsonl"),
        "--out-pairs", str(tmp_path / "pairs.jsonl"), "--out-sets", str(tmp_path / "sets.jsonl"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    sets = [json.loads(line) for line in (tmp_path / "sets.jsonl").read_text().splitlines()]
    assert [s["id"] for s in sets] == list(range(5))
    assert all(len(s["responses"]) == 4 for s in sets)
