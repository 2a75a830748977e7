"""llama_posttrain/jobs/evaluate.py: each metric against an independent computation, 2 ranks against 1, bad input refused."""

import dataclasses
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import random_model

from llama_posttrain.data.io import write_jsonl
from llama_posttrain.data.tasks.arithmetic import Arithmetic
from llama_posttrain.jobs.evaluate import main as evaluate_main
from llama_posttrain.jobs.sampling import read_prompts
from llama_posttrain.jobs.scoring import score
from llama_posttrain.llama import get_preset, load_model, save_model
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.generate import decode_sample, generate
from llama_posttrain.llama.tokenizer import load_tokenizer
from llama_posttrain.train import progress
from llama_posttrain.train.distributed import torchrun_command

CHAT = ChatFormat(load_tokenizer())
ROOT = Path(__file__).parent.parent
N = 12


@dataclass
class Scored:
    """A stand-in task whose verifier gives fractions that depend on the response (a random model gets no
    sum right): the accuracies are sums of unequal floats, so their order of addition shows."""

    scale: int = 7

    def verify(self, prompt: str, response: str) -> float:
        return sum(map(ord, response)) % self.scale / self.scale


SCORED = ["--verifier", "test_evaluate:Scored", "--task-args", '{"scale": 7}']


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A policy whose samples often end (its stop tokens' output rows scaled up), a reward model, and the
    arithmetic task's held-out sets (plus a record whose scores tie: not a pair)."""
    d = tmp_path_factory.mktemp("evaluate")
    policy = random_model(dataclasses.replace(get_preset("debug"), tie_embeddings=False))
    with torch.no_grad():  # weights 10x: greedy samples that differ by prompt (not the same token repeated)
        for name, p in policy.named_parameters():
            p.mul_(1 if name.endswith("norm.weight") else 10)
        policy.output.weight[list(CHAT.tokenizer.stop_ids)] *= 3
    save_model(policy, d / "policy")
    save_model(random_model(get_preset("debug"), head="reward", seed=1), d / "rm")
    task = Arithmetic(max_digits=1)
    _, eval_pairs, eval_sft = task.seed_data(4, N, seed=2)
    tied = {"prompt": "1+1=", "chosen": "2", "rejected": "3", "score_chosen": 1, "score_rejected": 1}
    write_jsonl(d / "pairs.jsonl", [*eval_pairs[:5], tied, *eval_pairs[5:]])
    write_jsonl(d / "sft.jsonl", eval_sft)
    write_jsonl(d / "prompts.jsonl", task.prompts(N, 3, "eval"))
    return d


def run(d: Path, model: str, *args) -> dict:
    evaluate_main(["--model", str(d / model), "--out", str(d / "out.json"), *args])
    return json.loads((d / "out.json").read_text())


def pipeline_task_accuracy(model_path, prompts_path, verify, seed: int, max_new_tokens: int) -> dict:
    """The pipeline's in-process task_accuracy (llama_posttrain/driver/pipeline.py before issue 18), verbatim but for `self`."""
    model = load_model(model_path).eval()
    records = read_prompts(prompts_path)
    ids = [CHAT.encode_dialog(r["messages"], add_generation_prompt=True).tokens for r in records]
    tok, out = CHAT.tokenizer, {}
    gen = torch.Generator().manual_seed(seed)
    for key, n, temp in (("task_accuracy", 1, 0.0), ("task_accuracy_sampled", 4, 1.0)):
        samples = generate(model, ids, n, max_new_tokens, tok.stop_ids, temp, pad_id=tok.pad_id, generator=gen)
        scores = [
            verify(r["messages"][-1]["content"], decode_sample(tok, s)) for r, ss in zip(records, samples) for s in ss
        ]
        out[key] = sum(scores) / len(scores)
    return out


def reward_alone(rm, prompt: list[dict], response: str) -> float:
    """The reward of one response in a row of its own: the dialog's last token's score."""
    ids = CHAT.encode_dialog(prompt + [{"role": "assistant", "content": response}]).tokens
    with torch.no_grad():
        return rm(torch.tensor([ids]))[0, -1].item()


def test_task_accuracy_is_the_pipelines_to_the_last_bit(files, one_process):
    prompts = ["--prompts", str(files / "prompts.jsonl")]
    for verifier, task in ((SCORED, Scored(7)), (["--verifier", "arithmetic"], Arithmetic(max_digits=1))):
        got = run(files, "policy", *prompts, *verifier, "--seed", "5")
        expected = pipeline_task_accuracy(files / "policy", files / "prompts.jsonl", task.verify, 5, 8)
        assert {k: got[k] for k in expected} == expected and got["prompts"] == N and got["ranks"] == 1
        if isinstance(task, Scored):  # fractions, not 0 or 1 only
            assert all(0 < v < 1 for v in expected.values()), expected
    short = run(files, "policy", *prompts, *SCORED, "--max-new-tokens", "3")  # and the seed's default: 0
    assert (
        {k: short[k] for k in expected}
        == pipeline_task_accuracy(files / "policy", files / "prompts.jsonl", Scored(7).verify, 0, 3)
        != {k: got[k] for k in expected}
    )


def test_batch_size_generates_that_many_prompts_per_call(files, one_process, capsys):
    """--batch-size 5 over 12 prompts: three generate calls of 5, 5 and 2 prompts drawing from one
    generator in turn (an independent loop here); greedy results as one call gives; the KV cache line
    names the largest call."""
    prompts = ["--prompts", str(files / "prompts.jsonl"), *SCORED, "--seed", "5"]
    whole = run(files, "policy", *prompts)
    got = run(files, "policy", *prompts, "--batch-size", "5")
    assert "per generate call at most: 5 prompts x 4 samples" in capsys.readouterr().out
    model, records, tok = load_model(files / "policy").eval(), read_prompts(files / "prompts.jsonl"), CHAT.tokenizer
    ids = [CHAT.encode_dialog(r["messages"], add_generation_prompt=True).tokens for r in records]
    gen = torch.Generator().manual_seed(5)
    expected = {}
    for key, n, temp in (("task_accuracy", 1, 0.0), ("task_accuracy_sampled", 4, 1.0)):
        samples = [
            s for i in (0, 5, 10)
            for s in generate(model, ids[i : i + 5], n, 8, tok.stop_ids, temp, pad_id=tok.pad_id, generator=gen)
        ]  # fmt: skip
        scores = [
            Scored(7).verify(r["messages"][-1]["content"], decode_sample(tok, s))
            for r, ss in zip(records, samples)
            for s in ss
        ]
        expected[key] = sum(scores) / len(scores)
    assert {k: got[k] for k in expected} == expected
    assert got["task_accuracy"] == whole["task_accuracy"]  # greedy: the batch does not change a prompt's sample


@pytest.mark.parametrize("k, verifier", [(4, SCORED), (3, [])])  # samples shared with task accuracy, or its own
def test_rm_score_is_the_mean_reward_of_the_samples(files, one_process, k, verifier):
    got = run(files, "policy", "--prompts", str(files / "prompts.jsonl"), "--rm", str(files / "rm"), "--k", str(k),
              *verifier, "--seed", "9")  # fmt: skip
    model, rm = load_model(files / "policy").eval(), load_model(files / "rm").eval()
    records = read_prompts(files / "prompts.jsonl")
    ids = [CHAT.encode_dialog(r["messages"], add_generation_prompt=True).tokens for r in records]
    tok = CHAT.tokenizer
    samples = generate(
        model, ids, k, 8, tok.stop_ids, 1.0, pad_id=tok.pad_id, generator=torch.Generator().manual_seed(9)
    )
    rewards = [reward_alone(rm, r["messages"], decode_sample(tok, s)) for r, ss in zip(records, samples) for s in ss]
    assert got["rm_score"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
    assert ("task_accuracy" in got) == bool(verifier)


def test_rm_accuracy_against_each_response_scored_alone(files, one_process):
    got = run(files, "rm", "--pairs", str(files / "pairs.jsonl"))
    rm = load_model(files / "rm").eval()
    pairs = [json.loads(line) for line in (files / "pairs.jsonl").read_text().splitlines()]
    pairs = [p for p in pairs if "score_chosen" not in p]
    right = [
        reward_alone(rm, [{"role": "user", "content": p["prompt"]}], p["chosen"])
        > reward_alone(rm, [{"role": "user", "content": p["prompt"]}], p["rejected"])
        for p in pairs
    ]
    assert 0 < sum(right) < len(right)
    assert got["rm_accuracy"] == sum(right) / len(right)
    assert (got["pairs"], got["pairs_tied_dropped"]) == (N, 1)
    # and the pipeline's own computation (llama_posttrain/jobs/scoring.py score over all pairs at once), exactly
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in pairs]
    scores = score(rm, CHAT, prompts, [[p["chosen"], p["rejected"]] for p in pairs])
    assert got["rm_accuracy"] == sum(s[0] > s[1] for s in scores) / len(scores)


def test_nll_is_the_mean_negative_log_likelihood_of_the_assistant_tokens(files, one_process):
    got = run(files, "policy", "--nll", str(files / "sft.jsonl"))
    model = load_model(files / "policy").eval().double()
    total, count = 0.0, 0
    for line in (files / "sft.jsonl").read_text().splitlines():
        enc = CHAT.encode_dialog(json.loads(line)["messages"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([enc.tokens]))[0].double(), -1)
        for i in range(1, len(enc.tokens)):
            if enc.is_target[i]:  # the assistant's answer and its end of turn
                total, count = total - logp[i - 1, enc.tokens[i]].item(), count + 1
    assert count == got["nll_tokens"] and count > 2 * N
    assert got["nll"] == pytest.approx(total / count, rel=1e-6)
    assert got["sft_records"] == N and "task_accuracy" not in got


def test_progress_is_reported(files, one_process, monkeypatch):
    monkeypatch.setenv(progress.ENV, str(files / "progress.json"))
    run(files, "policy", "--prompts", str(files / "prompts.jsonl"), *SCORED, "--nll", str(files / "sft.jsonl"))
    state = progress.read(files / "progress.json")
    assert (state["done"], state["total"], state["unit"]) == (2 * N + N, 2 * N + N, "examples")


@pytest.mark.long  # 9 s of 2-rank evaluation (pytest -m long); sample.py's 2-rank test stays in CI
def test_two_ranks_give_what_one_rank_gives(files, one_process):
    """rm_accuracy, nll and greedy task accuracy as 1 rank; the sampled accuracy as each rank's share
    sampled with seed + 1000003 * rank."""
    one_rm = run(files, "rm", "--pairs", str(files / "pairs.jsonl"))
    policy_args = ["--prompts", str(files / "prompts.jsonl"), *SCORED, "--seed", "5", "--nll", str(files / "sft.jsonl")]
    one = run(files, "policy", *policy_args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    two = {}
    for name, args in (("rm", ["--pairs", str(files / "pairs.jsonl")]), ("policy", policy_args)):
        out = files / f"two_{name}.json"
        cmd = torchrun_command(str(ROOT / "llama_posttrain" / "jobs" / "evaluate.py"), 2, ["--model", str(files / name), "--out", str(out),
                                                                          *args])  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        two[name] = json.loads(out.read_text())
    assert two["rm"]["ranks"] == 2 and two["rm"]["rm_accuracy"] == one_rm["rm_accuracy"]
    assert two["rm"]["pairs"] == one_rm["pairs"] and two["policy"]["nll_tokens"] == one["nll_tokens"]
    assert two["policy"]["nll"] == pytest.approx(one["nll"], rel=1e-6)
    # the same greedy samples; their scores (sevenths) added in another order: equal to the rounding
    assert two["policy"]["task_accuracy"] == pytest.approx(one["task_accuracy"], abs=1e-12)
    records, sampled = read_prompts(files / "prompts.jsonl"), []
    for rank in (0, 1):
        mine = records[rank::2]
        write_jsonl(files / f"share_{rank}.jsonl", [{"id": r["id"], "prompt": r["prompt"]} for r in mine])
        part = pipeline_task_accuracy(
            files / "policy", files / f"share_{rank}.jsonl", Scored(7).verify, 5 + 1000003 * rank, 8
        )
        sampled.append(part["task_accuracy_sampled"] * 4 * len(mine))
    assert two["policy"]["task_accuracy_sampled"] == pytest.approx(sum(sampled) / (4 * N), abs=1e-12)


def test_bad_input_is_refused_naming_the_file_line_and_field(files, one_process, tmp_path, capsys):
    bad = {
        "prompts": [{"id": 1, "prompt": "1+1="}, {"id": 2}],
        "pairs": [{"prompt": "1+1=", "chosen": "2"}],
        "sft": [{"messages": [{"role": "user", "content": "1+1="}]}],
    }
    for name, records in bad.items():
        write_jsonl(tmp_path / f"bad_{name}.jsonl", records)
    policy = ["--prompts", str(files / "prompts.jsonl"), *SCORED]
    for model, args, message in [
        ("policy", ["--pairs", str(files / "pairs.jsonl")], r"policy: a policy: --pairs gives dpo_reward_accuracy, .*"),
        ("rm", ["--nll", str(files / "sft.jsonl")], r"rm: --prompts and --nll need a language model, .*'reward'"),
        ("policy", [*policy, "--rm", str(files / "policy")], r"--rm .*policy: not a reward model"),
        (
            "policy",
            ["--prompts", str(tmp_path / "bad_prompts.jsonl"), *SCORED],
            r"bad_prompts.jsonl:2: prompt: missing",
        ),
        ("rm", ["--pairs", str(tmp_path / "bad_pairs.jsonl")], r"bad_pairs.jsonl:1: rejected: missing"),
        ("policy", ["--nll", str(tmp_path / "bad_sft.jsonl")], r"bad_sft.jsonl:1: messages: no non-empty assistant"),
        ("policy", ["--prompts", str(files / "prompts.jsonl"), "--verifier", "chess"], r"unknown task 'chess'"),
        ("policy", [*policy[:-1], '{"scale": "x"}'], r"--verifier test_evaluate:Scored: --task-args: scale"),
    ]:
        with pytest.raises(SystemExit, match=message):
            run(files, model, *args)
    for args, message in [
        (["--verifier", "arithmetic"], "--verifier and --rm score samples of held-out prompts: give --prompts"),
        (["--prompts", str(files / "prompts.jsonl")], "--prompts: give --verifier TASK"),
        (["--nll", str(files / "sft.jsonl"), "--task-args", "{}"], "--task-args: the arguments of --verifier's task"),
        ([], "nothing to evaluate"),
    ]:
        with pytest.raises(SystemExit) as e:
            run(files, "policy", *args)
        assert e.value.code == 2 and message in capsys.readouterr().err
