"""Cleaning of rejection-sampled data (llama_posttrain/data/clean.py): each rule on hand-written samples, and every drop
counted in llama_posttrain/jobs/sample.py's drop report (in process and through the CLI's --out-report)."""

import json

import pytest
import torch
from conftest import random_model

from llama_posttrain.data.clean import (
    CleanRules,
    banned_phrase,
    count_emoji,
    count_exclamations,
    dedup_key,
    repeat_fraction,
)
from llama_posttrain.data.drops import DROPS, drop_reason, drop_report, drops_for
from llama_posttrain.jobs.sampling import rejection_sample
from llama_posttrain.llama import get_preset, save_model
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer

CHAT = ChatFormat(load_tokenizer())


@pytest.mark.parametrize(
    "text, n, fraction",
    [
        ("one two three four", 3, 0.0),
        ("", 3, 0.0),
        ("a b c a b c", 3, 1.0),  # "a b c" at 0 and 3
        ("x y z w a b c a b c", 3, 6 / 10),  # words 4..9
        ("the cat sat on the mat", 2, 0.0),  # "the" twice, but no 2-gram twice
        ("I think I think I think so", 2, 6 / 7),  # "I think" x3, "think I" x2: all but "so"
        ("ha ha ha ha", 3, 1.0),  # overlapping occurrences of "ha ha ha"
        ("ha ha ha", 3, 0.0),  # one 3-gram only
        ("A B C D A B C D A B C D", 3, 1.0),  # a loop whose period (4) is not n
        ("go  go\ngo\tgo", 2, 1.0),  # any whitespace separates words
        ("Go go", 1, 0.0),  # case-sensitive
    ],
)
def test_repeat_fraction_on_hand_written_samples(text, n, fraction):
    assert repeat_fraction(text, n) == pytest.approx(fraction, abs=1e-12)


@pytest.mark.parametrize(
    "text, count",
    [
        ("no emoji here :) <3", 0),
        ("great \U0001f44d", 1),  # thumbs up
        ("\U0001f44d\U0001f3fd", 1),  # thumbs up + a skin tone: one
        ("\u2764\ufe0f", 1),  # heart + variation selector: one
        ("\U0001f468\u200d\U0001f469\u200d\U0001f467", 1),  # a family joined by ZWJ: one
        ("\U0001f1eb\U0001f1f7 \U0001f1e9\U0001f1ea", 2),  # two flags (two regional indicators each)
        ("\u2b50\u2600\U0001f680\U0001f600", 4),  # star, sun, rocket, grinning face
        ("caf\u00e9 \u00a9 \u2122 \u2192", 0),  # accents, (c), TM, an arrow: not emoji
    ],
)
def test_count_emoji_on_hand_written_samples(text, count):
    assert count_emoji(text) == count


def test_exclamations_banned_phrases_and_the_dedup_key():
    assert count_exclamations("Wow! Great!! \uff01") == 4 and count_exclamations("no. ¡hola?") == 0
    phrases = ("As an AI language model", "STRASSE")
    assert banned_phrase("Sure. as an ai LANGUAGE model, I cannot", phrases) == "As an AI language model"
    assert banned_phrase("die Hauptstraße", phrases) == "STRASSE"  # casefold: ß is ss
    assert banned_phrase("As an AI, language model", phrases) is None
    prompt = [{"role": "user", "content": "1+1="}]
    assert dedup_key(prompt, " 2\n") == dedup_key(prompt, "2") != dedup_key(prompt, "3")
    assert dedup_key(prompt, "2") != dedup_key([{"role": "user", "content": "1+1= "}], "2")


def test_rules_are_off_by_default_and_checked():
    nasty = "!!!! \U0001f600\U0001f600 as an AI language model " + "loop " * 20
    assert drop_reason(nasty, True, None, CleanRules()) is None and drop_reason(nasty, True, None) is None
    assert drop_reason(nasty, False, None, CleanRules(max_repeat=0.1)) == "unfinished"  # the old rules first
    for rules, reason in [
        (CleanRules(max_repeat=0.5), "repetition"),
        (CleanRules(ban_phrases=("AS AN AI",)), "banned_phrase"),
        (CleanRules(max_emoji=1), "too_many_emoji"),
        (CleanRules(max_exclamation=3), "too_many_exclamations"),
        (CleanRules(max_emoji=2, max_exclamation=4), None),  # "more than N": N itself passes
    ]:
        assert drop_reason(nasty, True, None, rules) == reason
    for bad in (dict(max_repeat=1.5), dict(repeat_ngram=0), dict(ban_phrases=(" ",)), dict(max_emoji=-1)):
        with pytest.raises(ValueError):
            CleanRules(**bad)


# prompt -> its 4 samples (all finished), scored by a stand-in annotator: the sample's position
SAMPLES = {
    "p0": ["fine answer", "one two one two one two", "Ha!!!", "ok"],  # 1 repetition, 1 exclamations
    "p1": ["As an AI, no", "\U0001f600\U0001f600\U0001f600 hi", "fine answer", "good"],  # 1 banned, 1 emoji
    "p0 ": ["fine answer", "x", "y", "z"],  # another prompt: its pick is no duplicate
}
RULES = CleanRules(max_repeat=0.5, repeat_ngram=2, ban_phrases=("as an ai",), max_emoji=2, max_exclamation=1)


def _stand_in_sampler(monkeypatch):
    import llama_posttrain.jobs.sampling as train_sample

    def sample(policy, chat, prompts, k, *a, **kw):
        texts = [SAMPLES[p[-1]["content"]] for p in prompts]
        return texts, [[True] * k for _ in prompts]

    monkeypatch.setattr(train_sample, "sample", sample)
    return lambda record, texts: [float(j) for j in range(len(texts))]


def test_every_rule_is_counted_in_the_drop_report(monkeypatch):
    annotate = _stand_in_sampler(monkeypatch)
    prompts = ["p0", "p1", "p0", "p1", "p0 "]  # p0 and p1 twice: the second picks repeat the first
    records = [{"id": i, "messages": [{"role": "user", "content": p}]} for i, p in enumerate(prompts)]
    sft, pairs, sets, dropped = rejection_sample(
        records, None, None, CHAT, 4, 8, None, annotate=annotate, clean=RULES, dedup=True
    )
    expected = {"repetition": 2, "too_many_exclamations": 2, "banned_phrase": 2, "too_many_emoji": 2}
    assert dict(dropped) == {**expected, "duplicate_sft": 2}
    # the picks (RM scores are all 0 here: the first sample left wins) and what was kept
    assert [r["messages"][-1]["content"] for r in sft] == ["fine answer", "fine answer", "fine answer"]
    assert [r["id"] for r in sft] == [0, 1, 4]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("ok", "fine answer"), ("good", "fine answer")] * 2 + [
        ("z", "fine answer")
    ]
    lines, warning = drop_report(dropped, len(records), 4, "--max-new-tokens 8", ("sft", "pairs"))
    assert warning is None
    assert lines[0].startswith("samples: 20 (5 prompts x 4), 12 kept, 8 dropped; ")
    for key, n in expected.items():
        assert f"{n} {DROPS[key]}" in lines[0]
    assert f"2 of 5 {DROPS['duplicate_sft']}" in lines
    assert drops_for(("pairs",)).count("duplicate_sft") == 0 and "duplicate_sft" in drops_for(("sft",))
    # every rule off (the default): nothing of the above is dropped
    sft, pairs, sets, dropped = rejection_sample(records, None, None, CHAT, 4, 8, None, annotate=annotate)
    assert not dropped and len(sft) == 5


def test_cli_flags_drop_and_report_every_rule(tmp_path, monkeypatch, capsys):
    from llama_posttrain.jobs.sample import main as sample_main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored afterwards: init_distributed sets them
    _stand_in_sampler(monkeypatch)
    save_model(random_model(get_preset("debug")), tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(["p0", "p1", "p0"])))
    torch.manual_seed(0)
    flags = ["--dedup", "--max-repeat", "0.5", "--repeat-ngram", "2", "--ban-phrase", "AS AN AI"]
    flags += ["--ban-phrase", "never said", "--max-emoji", "2", "--max-exclamation", "1"]
    report = tmp_path / "report.json"
    sample_main([
        "--policy", str(tmp_path / "policy"), "--prompts", str(prompts), "--k", "4", "--max-new-tokens", "8",
        "--out-sft", str(tmp_path / "sft.jsonl"), "--out-report", str(report), *flags,
    ])  # fmt: skip
    summary = json.loads(report.read_text())
    dropped = {"repetition": 2, "too_many_exclamations": 2, "banned_phrase": 1, "too_many_emoji": 1}
    dropped |= {"duplicate_sft": 1, "no_pair_tied_scores": 3}  # no RM, no annotator: every score 0
    assert summary == {"prompts": 3, "samples": 12, "sft": 2, "pairs": 0, "dropped": dict(sorted(dropped.items()))}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert len((tmp_path / "sft.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-repeat", "1.5"], "argument --max-repeat: a fraction in"),
        (["--max-emoji", "-1"], "argument --max-emoji"),
        (["--ban-phrase", " "], "argument --ban-phrase: an empty phrase"),
        (["--repeat-ngram", "0"], "argument --repeat-ngram"),
    ],
)
def test_cli_refuses_bad_thresholds(flags, message, capsys):
    from llama_posttrain.jobs.sample import main as sample_main

    with pytest.raises(SystemExit) as e:
        sample_main(["--policy", "p", "--prompts", "x.jsonl", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
