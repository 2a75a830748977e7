"""Issue 17, round 2: rejection sampling (llama_posttrain/jobs/sample.py, llama_posttrain/data/drops.py) counts and prints every sample
and every prompt it drops, and warns when most samples reached no stop token; a labels file
(llama_posttrain/data/annotators.py) with two labels for one id or the wrong number of scores is refused."""

import json

import pytest

from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer

CHAT = ChatFormat(load_tokenizer())

# Stand-in samples (text, finished) of 6 prompts x 4 and their labels, and what each prompt loses, by hand.
SAMPLES = {
    "0+0=": ([("1", False), ("2", False), ("3", False), ("4", False)], [0, 0, 0, 0]),  # nothing ends its turn
    "1+1=": ([("", True), ("  ", True), ("7", True), ("8", True)], [1, 1, 1, 1]),  # 2 empty, the rest tied
    "2+2=": ([("12", True), ("12 ", True), ("x" * 50, True), ("9", True)], [2, 0, 5, 1]),  # best, worst: "12"
    "3+3=": ([("1", True), ("2", True), ("3", True), ("4", True)], [1, 2, 3, 4]),  # a pair, an SFT record
    "4+4=": ([("5", True), ("6", False), ("7", False), ("8", False)], [1, 2, 3, 4]),  # 1 left: no pair
    "5+5=": ([(" ", True), ("ab", True), ("abc", True), ("abcd", True)], [0, 1, 2, 3]),  # 1 empty, a pair
}
EXPECTED_DROPS = {
    "unfinished": 4 + 3, "empty": 2 + 1, "over_max_chars": 1,
    "no_sft_record": 1, "no_pair_fewer_than_2": 1 + 1, "no_pair_tied_scores": 1, "no_pair_same_text": 1,
}  # fmt: skip


def _stand_in_sampler(monkeypatch):
    import llama_posttrain.jobs.sampling as train_sample

    def sample(policy, chat, prompts, k, *a, **kw):
        rows = [SAMPLES[p[-1]["content"]][0] for p in prompts]
        return [[t for t, _ in row] for row in rows], [[f for _, f in row] for row in rows]

    monkeypatch.setattr(train_sample, "sample", sample)
    return lambda record, texts: [float(x) for x in SAMPLES[record["messages"][-1]["content"]][1]]


def test_rejection_sampling_counts_every_dropped_sample_and_prompt(monkeypatch):
    from llama_posttrain.jobs.sampling import rejection_sample

    annotate = _stand_in_sampler(monkeypatch)
    records = [{"id": i, "messages": [{"role": "user", "content": p}]} for i, p in enumerate(SAMPLES)]
    sft, pairs, sets, dropped = rejection_sample(records, None, None, CHAT, 4, 8, None, annotate=annotate, max_chars=20)
    assert dict(dropped) == EXPECTED_DROPS
    kept = sum(1 for s in sets for t, f in zip(s["responses"], s["finished"]) if f and t.strip() and len(t) <= 20)
    assert kept + sum(dropped[k] for k in ("unfinished", "empty", "over_max_chars")) == 6 * 4
    assert len(sft) + dropped["no_sft_record"] == 6
    assert len(pairs) + sum(v for k, v in dropped.items() if k.startswith("no_pair")) == 6
    assert [p["id"] for p in pairs] == [3, 5] and [r["id"] for r in sft] == [1, 2, 3, 4, 5]


def test_sample_cli_prints_every_drop_and_warns_when_most_samples_are_unfinished(tmp_path, monkeypatch, capsys):
    """A new user's run: max new tokens too few for anything to end its turn. Every drop is printed, the
    counts match the written sets, and the warning names the flag."""
    import torch
    from conftest import random_model

    from llama_posttrain.jobs.sample import main as sample_main
    from llama_posttrain.llama import get_preset, save_model

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored afterwards: init_distributed sets them
    save_model(random_model(get_preset("debug")), tmp_path / "policy")
    save_model(random_model(get_preset("debug"), head="reward"), tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"{i}+1="}) + "\n" for i in range(4)))
    out = {name: tmp_path / f"{name}.jsonl" for name in ("sft", "pairs", "sets")}
    torch.manual_seed(0)
    sample_main([
        "--policy", str(tmp_path / "policy"), "--rm", str(tmp_path / "rm"), "--prompts", str(prompts), "--k", "3",
        "--max-new-tokens", "2", *(x for name, path in out.items() for x in (f"--out-{name}", str(path))),
    ])  # fmt: skip
    printed = capsys.readouterr()
    sets = [json.loads(line) for line in out["sets"].read_text().splitlines()]
    unfinished = sum(not f for s in sets for f in s["finished"])
    no_sample = sum(not any(s["finished"]) for s in sets)
    assert unfinished > 6, "the random policy ended most samples within 2 tokens"
    assert f"samples: 12 (4 prompts x 3), {12 - unfinished} kept, {unfinished} dropped; " in printed.out
    assert f"; {unfinished} samples that reached no stop token within --max-new-tokens 2" in printed.out
    assert f"{no_sample} of 4 prompts with no sample left: no SFT record" in printed.out
    pct = f"{100 * unfinished / 12:.0f}%"
    assert f"WARNING: {unfinished} of 12 samples ({pct}) reached no stop token within --max-new-tokens 2" in printed.err
    assert "raise --max-new-tokens" in printed.err
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary["dropped"]["unfinished"] == unfinished and summary["sft"] == 4 - no_sample
    assert summary["sft"] == len(out["sft"].read_text().splitlines())


def test_a_labels_file_with_two_labels_for_one_id_or_the_wrong_count_is_refused(tmp_path):
    from llama_posttrain.data.annotators import file_annotator
    from llama_posttrain.data.schema import ValidationError

    labels = tmp_path / "labels.jsonl"
    rows = [{"id": "a", "scores": [1, 0]}, {"id": "b", "scores": [0, 1]}, {"id": "a", "ranking": [1, 0]}]
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        ValidationError, match=r"labels.jsonl:3: id: a second label for id 'a' \(the first is at line 1\)"
    ):
        file_annotator(labels)
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    with pytest.raises(ValueError, match=r"the label of prompt id 'b' scores 2 samples, there are 3"):
        file_annotator(labels)({"id": "b"}, ["x", "y", "z"])
