"""The greedy generations an evaluation keeps for the dashboards (llama_posttrain/jobs/evaluate.py `generations`): the
first SHOWN prompts' greedy samples, as one greedy `generate` call over every prompt gives them, with the
verifier's score."""

import json
import os
import subprocess

import pytest
import torch
from test_evaluate import CHAT, ROOT, SCORED, N, Scored, files, run  # noqa: F401 (fixtures)

from llama_posttrain.jobs.evaluation import SHOWN
from llama_posttrain.jobs.sampling import read_prompts
from llama_posttrain.llama import load_model
from llama_posttrain.llama.generate import decode_sample, generate
from llama_posttrain.train.distributed import torchrun_command


def greedy_of_every_prompt(files):  # noqa: F811
    model = load_model(files / "policy").eval()
    records = read_prompts(files / "prompts.jsonl")
    ids = [CHAT.encode_dialog(r["messages"], add_generation_prompt=True).tokens for r in records]
    tok = CHAT.tokenizer
    samples = generate(model, ids, 1, 8, tok.stop_ids, 0.0, pad_id=tok.pad_id, generator=torch.Generator())
    return [(r["messages"][-1]["content"], decode_sample(tok, ss[0])) for r, ss in zip(records, samples)]


def test_the_first_prompts_greedy_generations_are_kept(files, one_process):  # noqa: F811
    expected = greedy_of_every_prompt(files)[:SHOWN]
    assert SHOWN < N and len({g for _, g in expected}) > 1  # prompts of their own, answers that differ
    verified = run(files, "policy", "--prompts", str(files / "prompts.jsonl"), *SCORED)["generations"]
    assert verified == [{"prompt": p, "generation": g, "correct": Scored(7).verify(p, g)} for p, g in expected]
    # without a verifier (the RM's score only): generated for the shown prompts alone, no verdict
    scored = run(files, "policy", "--prompts", str(files / "prompts.jsonl"), "--rm", str(files / "rm"))
    assert scored["generations"] == [{"prompt": p, "generation": g, "correct": None} for p, g in expected]
    assert "generations" not in run(files, "policy", "--nll", str(files / "sft.jsonl"))


@pytest.mark.long  # 2 ranks again (test_evaluate.py checks 2 ranks == 1 in CI): pytest -m long
def test_two_ranks_keep_the_same_generations_in_prompt_order(files, one_process):  # noqa: F811
    """Rank r generates prompts r, r + 2, ...: rank 0 gathers them back in the prompts' order."""
    args = ["--prompts", str(files / "prompts.jsonl"), *SCORED]
    one = run(files, "policy", *args)["generations"]
    out = files / "two_generations.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = torchrun_command(str(ROOT / "llama_posttrain" / "jobs" / "evaluate.py"), 2, ["--model", str(files / "policy"), "--out", str(out),
                                                                      *args])  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text())["generations"] == one and len(one) == SHOWN
