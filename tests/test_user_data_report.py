"""What the pipeline's report says on a user's data (issue 29 item 2): the evaluation's DPO reward accuracy of
the averaged model, its sample sizes and deviations, one RM scoring every policy's samples, and a summary table
and plots that show only what is true (the real counts, n and confidence intervals, no empty series)."""

import dataclasses
import json
import math

import pytest
import torch
import yaml
from conftest import random_model

from llama_posttrain.data.io import write_jsonl
from llama_posttrain.data.tasks.arithmetic import Arithmetic
from llama_posttrain.jobs.evaluate import main as evaluate_main
from llama_posttrain.llama import get_preset, save_model
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer

CHAT = ChatFormat(load_tokenizer())
N = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A policy, a reference (another random model), a reward model, 10 held-out pairs and prompts."""
    d = tmp_path_factory.mktemp("report")
    config = dataclasses.replace(get_preset("debug"), tie_embeddings=False)
    for name, seed in (("policy", 0), ("reference", 1)):
        model = random_model(config, seed=seed)
        with torch.no_grad():  # larger weights: log-ratios far from 0, no pair tied
            for key, p in model.named_parameters():
                p.mul_(1 if key.endswith("norm.weight") else 4)
        save_model(model, d / name)
    save_model(random_model(get_preset("debug"), head="reward", seed=2), d / "rm")
    task = Arithmetic(max_digits=1)
    _, eval_pairs, _ = task.seed_data(4, N, seed=2)
    write_jsonl(d / "pairs.jsonl", eval_pairs)
    write_jsonl(d / "prompts.jsonl", task.prompts(N, 3, "eval"))
    return d


def run(d, model: str, *args) -> dict:
    evaluate_main(["--model", str(d / model), "--out", str(d / "out.json"), *args])
    return json.loads((d / "out.json").read_text())


def content_logps(model, prompt: list[dict], text: str) -> tuple[float, int]:
    """float64: the sum of log p of the response's own tokens (no header, no end-of-turn: the format mask)
    after the prompt, and their count."""
    head = CHAT.encode_dialog(prompt, add_generation_prompt=True).tokens
    content = CHAT.tokenizer.encode(text)
    ids = head + content + [CHAT.tokenizer.eot_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
    return sum(logp[len(head) - 1 + i, t].item() for i, t in enumerate(content)), len(content)


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_dpo_reward_accuracy_of_a_policy_is_the_dpo_implicit_reward_in_float64(files, one_process, tmp_path, loss):
    from llama_posttrain.llama import load_model

    config = {"dpo": {"loss": loss, "beta": 0.1}, "data": {"max_len": 256}}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(config))
    args = ["--pairs", str(files / "pairs.jsonl"), "--dpo-config", str(tmp_path / "dpo.yaml")]
    args += ["--reference", str(files / "reference")] if loss == "sigmoid" else []
    out = run(files, "policy", *args)
    policy, reference = load_model(files / "policy").double(), load_model(files / "reference").double()
    right = 0
    for line in (files / "pairs.jsonl").read_text().splitlines():
        pair = json.loads(line)
        prompt = [{"role": "user", "content": pair["prompt"]}]
        (pc, nc), (pr, nr) = (content_logps(policy, prompt, pair[k]) for k in ("chosen", "rejected"))
        if loss == "sigmoid":  # beta (log pi - log ref), summed over the response's tokens
            rc, rr = (content_logps(reference, prompt, pair[k])[0] for k in ("chosen", "rejected"))
            chosen, rejected = pc - rc, pr - rr
        else:  # simpo: beta log pi per token, no reference
            chosen, rejected = pc / nc, pr / nr
        assert not math.isclose(chosen, rejected, abs_tol=1e-4)  # no tie a float32 sum could flip
        right += chosen > rejected
    assert out["dpo_reward_accuracy"] == pytest.approx(right / N) and out["n"]["dpo_reward_accuracy"] == N
    assert 0 < right < N  # neither all nor none: the comparison is what is tested


def test_kept_samples_scored_by_another_rm_give_its_mean_n_and_std(files, one_process, tmp_path):
    """A policy's evaluation keeps its samples; the reward model then scores them (--score-samples): the same
    mean as the evaluation's own rm_score by that RM, its n and std those of the scores in float64."""
    import statistics

    from llama_posttrain.jobs.sampling import read_prompts
    from llama_posttrain.jobs.scoring import score
    from llama_posttrain.llama import load_model

    prompts = ["--prompts", str(files / "prompts.jsonl")]
    own = run(files, "policy", *prompts, "--rm", str(files / "rm"), "--keep-samples", "--max-new-tokens", "4")
    kept = tmp_path / "policy_eval.json"
    kept.write_text(json.dumps(own))
    assert len(own["samples"]) == N and all(len(s) == 4 for s in own["samples"])  # --k 4 per prompt, in order
    scored = run(files, "rm", *prompts, "--score-samples", str(kept))[("rm_score_of")][str(kept)]
    records = read_prompts(files / "prompts.jsonl")
    values = [s for ss in score(load_model(files / "rm"), CHAT, [r["messages"] for r in records], own["samples"])
              for s in ss]  # fmt: skip
    assert scored["n"] == own["n"]["rm_score"] == len(values) == 4 * N
    assert scored["rm_score"] == pytest.approx(own["rm_score"], abs=1e-6)
    assert scored["rm_score"] == pytest.approx(statistics.fmean(values), abs=1e-6)
    assert scored["std"] == pytest.approx(statistics.stdev(values), rel=1e-5) == own["std"]["rm_score"]
    with pytest.raises(SystemExit, match=r"--score-samples .*: samples: missing"):
        kept.write_text(json.dumps({k: v for k, v in own.items() if k != "samples"}))
        run(files, "rm", *prompts, "--score-samples", str(kept))


def _results(n_pairs=8, prompts=8):
    """A 1-round run on a user's data: no verifier, a given base, 8 held-out pairs and prompts."""
    n = {"nll": 120, "rm_score": 4 * prompts}
    return [
        {"round": 0, "stage": "data", "files": {}},
        {"round": 0, "stage": "pretrain", "nll": 2.5, "n": {"nll": 120}},
        {"round": 1, "stage": "rm", "rm_accuracy": 0.875, "n": {"rm_accuracy": n_pairs}},
        {"round": 1, "stage": "rs", "mean_best_score": 0.5, "records": 40, "dropped": {"unfinished": 3}},
        {"round": 1, "stage": "sft", "sft_loss": 1.5, "nll": 1.9, "rm_score": 0.25, "n": n,
         "std": {"rm_score": 0.5}},
        {"round": 1, "stage": "pref", "records": 30, "dropped": {"no_pair": 2, "unfinished": 5}},
        {"round": 1, "stage": "dpo", "dpo_reward_accuracy": 0.25, "dpo_reward_accuracy_variant_0": 0.5, "nll": 1.8,
         "rm_score": 0.75, "n": {**n, "dpo_reward_accuracy": n_pairs}, "std": {"rm_score": 0.5}},
    ]  # fmt: skip


def test_the_summary_table_shows_counts_sample_sizes_and_intervals(tmp_path):
    from llama_posttrain.driver.report import sample_sizes, summary_table

    table = summary_table(sample_sizes(tmp_path, _results()), base_given=True)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "round", "stage", "rm_accuracy (n=8)", "mean_best_score (n=40)", "sft_loss", "dpo_reward_accuracy (n=8)",
        "nll (n=120)", "rm_score (the round's RM) (n=32)", "records", "pairs", "dropped",
    ]  # fmt: skip
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in lines[2:8]}
    assert list(rows) == [("0", "base"), ("1", "rm"), ("1", "rs"), ("1", "sft"), ("1", "pref"), ("1", "dpo")]
    cells = lambda key: [c.strip() for c in rows[key].strip("|").split("|")]  # noqa: E731
    low, high = (float(x) for x in cells(("1", "rm"))[2].removeprefix("0.875 [").rstrip("]").split(", "))
    for p0 in (
        low,
        high,
    ):  # Wilson's bounds: the p0 whose z-test of 7 right of 8 is at z, (p - p0)^2 = z^2 p0 (1-p0) / n
        assert (0.875 - p0) ** 2 == pytest.approx(1.959963984540054**2 * p0 * (1 - p0) / 8, abs=2e-3)
    assert 0.4 < low < 0.875 < high < 1  # (0.529, 0.978)
    assert cells(("1", "rs"))[8:] == ["40", "", "3"] and cells(("1", "pref"))[8:] == ["", "30", "7"]
    half = 1.959963984540054 * 0.5 / math.sqrt(32)  # the normal interval of a mean: z std / sqrt(n)
    assert cells(("1", "dpo"))[7] == f"0.750 [{0.75 - half:.3f}, {0.75 + half:.3f}]"
    assert cells(("1", "sft"))[4] == "1.500"  # no n known (no run folder here): none shown, no interval
    assert "| 0 | pretrain |" in summary_table(_results())  # pre-trained by the recipe: so named
    big = summary_table(_results(n_pairs=800))
    assert "rm_accuracy (n=800)" in big and "| 1 | rm | 0.875 |" in big  # n >= 500: no interval


def test_plots_name_the_real_counts_and_leave_out_what_has_no_values(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from llama_posttrain.driver.report import accuracy_by_stage, rewards_by_round, write_report

    results = _results()
    labels, series, errors = rewards_by_round(results, 1)
    assert series == {
        "reward model (n=8 held-out pairs)": [0.875], "DPO implicit reward (n=8 held-out pairs)": [0.25],
        "the RM's pick is right (rejection sampling)": [None],  # no verifier
    }  # fmt: skip
    assert errors["reward model (n=8 held-out pairs)"][0][0] < 0.875 < errors["reward model (n=8 held-out pairs)"][0][1]
    assert accuracy_by_stage(results)[0] == []  # no task accuracy
    write_report(tmp_path, {"name": "mine", "base": "my_base"}, results, True, 1, 200)
    out = capsys.readouterr().out
    assert f"plots: {tmp_path / 'rewards.png'}; not drawn, no values: accuracy.png" in out
    assert not (tmp_path / "accuracy.png").exists() and (tmp_path / "rewards.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 0 | base |" in (tmp_path / "summary.md").read_text()


def test_the_last_rm_scores_every_policys_kept_samples_and_dpo_is_evaluated_against_its_reference(tmp_path, capsys):
    """The recipe's jobs (a stand-in launcher writes their results): the DPO model's evaluation gets the held-out
    pairs, the DPO run's config and the SFT model as reference (none for simpo); after the last round one job
    scores every policy's kept samples with the last RM, added to their results as rm_score_last_rm, redone only
    when an input is newer."""
    from test_job_configs import job_config
    from test_recipe import Recording, recipe

    d = tmp_path / "data"
    d.mkdir()
    pool = [{"prompt": f"{i}+1="} for i in range(10)]
    pair = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    sft = [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}]
    for name, records in (("pool", pool), ("prefs", [pair]), ("sft", sft), ("eval_pairs", [pair])):
        write_jsonl(d / f"{name}.jsonl", records)
    files = {"prompts": str(d / "pool.jsonl"), "preferences": [str(d / "prefs.jsonl")], "sft": [str(d / "sft.jsonl")],
             "eval_pairs": str(d / "eval_pairs.jsonl"), "eval_prompts": str(d / "pool.jsonl")}  # fmt: skip
    r, launcher = recipe(tmp_path, files)
    r.stage(0, "data", r.make_data)
    run_dir = tmp_path / "run"

    def answer(job):  # the evaluation jobs' results
        Recording.run(launcher, job)
        config = job_config(job)  # as the job reads its command line
        out = {"rm_score_of": {f: {"rm_score": float(i), "n": 40, "std": 0.5} for i, f in
                               enumerate(config.score_samples)}}  # fmt: skip
        if config.pairs:
            out |= {"dpo_reward_accuracy": 0.625, "n": {"dpo_reward_accuracy": 8}}
        (run_dir / config.out).write_text(json.dumps(out))

    launcher.run = answer
    dpo = run_dir / "round_1" / "dpo"
    for loss, expect in (("sigmoid", str(tmp_path / "sft")), ("simpo", None)):
        (dpo / "variant_0").mkdir(parents=True, exist_ok=True)
        (dpo / "variant_0" / "config.yaml").write_text(yaml.safe_dump({"dpo": {"loss": loss}}))
        (dpo / "eval_dpo.json").unlink(missing_ok=True)
        result = r.eval_job(dpo, dpo / "model", "dpo", None, reference=tmp_path / "sft")
        config = job_config(launcher.jobs[-1])
        assert (config.pairs, config.dpo_config, config.reference) == (
            files["eval_pairs"], str(dpo / "variant_0" / "config.yaml"), expect
        )  # fmt: skip
        assert config.keep_samples and result == {"dpo_reward_accuracy": 0.625, "n": {"dpo_reward_accuracy": 8}}

    r.results = [{"round": 0, "stage": "pretrain"}] + [{"round": k, "stage": s} for k in (1, 2) for s in ("sft", "dpo")]
    for res in r.results:
        if (res["round"], res["stage"]) != (2, "sft"):  # its evaluation kept no samples
            name = {"pretrain": "base"}.get(res["stage"], res["stage"])
            folder = run_dir / f"round_{res['round']}" / res["stage"]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"eval_{name}.json").write_text(json.dumps({"samples": [["2"]] * 10}))
    rm = run_dir / "round_2" / "rm" / "model"
    rm.mkdir(parents=True)
    (rm / "config.json").write_text("{}")
    jobs = len(launcher.jobs)
    r.score_with_last_rm(rm)
    config = job_config(launcher.jobs[-1])
    assert len(launcher.jobs) == jobs + 1 and config.model == str(rm) and config.prompts == files["eval_prompts"]
    assert config.score_samples == [
        str(run_dir / p) for p in ("round_0/pretrain/eval_base.json", "round_1/sft/eval_sft.json",
                                   "round_1/dpo/eval_dpo.json", "round_2/dpo/eval_dpo.json")
    ]  # fmt: skip
    assert [res.get("rm_score_last_rm") for res in r.results] == [0.0, 1.0, 2.0, None, 3.0]
    assert r.results[2]["n"] == {"rm_score_last_rm": 40} and r.results[2]["std"] == {"rm_score_last_rm": 0.5}
    assert "1 policies kept no samples, left out: ['round_2/sft']" in capsys.readouterr().out
    r.score_with_last_rm(rm)  # its result is newer than its inputs: reused
    assert len(launcher.jobs) == jobs + 1
