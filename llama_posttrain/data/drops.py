"""Rejection sampling's accounting of what it leaves out (llama_posttrain/jobs/sample.py): nothing is dropped silently.

`drop_reason` says why a sample is left out (no stop token, empty, too long, a cleaning rule of
llama_posttrain/data/clean.py); `DROPS` names every drop, of samples and of the prompts that get no SFT record or no
pair; `split_outputs` gathers the per-prompt results into the outputs with their drops summed,
`drop_report` writes the lines that account for every sample and prompt dropped, and `too_lossy` says when
a stage dropped more than the pipeline's `max_dropped` of its samples or prompts (the largest drop, the keys
that change it: KNOBS).
"""

from __future__ import annotations

from collections import Counter

from llama_posttrain.data.clean import RULES, CleanRules, dedup_key, reject_reason


def drop_reason(text: str, finished: bool, max_chars: int | None, clean: CleanRules | None = None) -> str | None:
    """Heuristic filters: None if the sample ended its turn, is not empty, is not too long and breaks none
    of the cleaning rules (llama_posttrain/data/clean.py, each off by default); else the first reason it fails (a DROPS key)."""
    if not finished:
        return "unfinished"
    if not text.strip():
        return "empty"
    if max_chars is not None and len(text) > max_chars:
        return "over_max_chars"
    return reject_reason(text, clean) if clean is not None else None


# Everything sampling drops, counted per key (llama_posttrain/jobs/sampling.py sample_records) and printed (drop_report): samples first, then
# the prompts that get no SFT record or no preference pair. "{limit}" is the max-new-tokens setting's name.
DROPS = {
    "prompt_too_long": "prompts whose tokens + {limit} exceed the policy's context: skipped, not sampled",
    "unfinished": "samples that reached no stop token within {limit}",
    "empty": "empty samples",
    "over_max_chars": "samples longer than --max-chars",
    "repetition": "samples in which repeated word n-grams (--repeat-ngram) cover more than --max-repeat of the words",
    "banned_phrase": "samples containing a --ban-phrase",
    "too_many_emoji": "samples with more than --max-emoji emoji",
    "too_many_exclamations": "samples with more than --max-exclamation exclamation marks",
    "no_sft_record": "prompts with no sample left: no SFT record",
    "duplicate_sft": "prompts whose SFT record repeats an earlier one's prompt and response (--dedup): dropped",
    "no_pair_fewer_than_2": "prompts with fewer than 2 samples left: no pair",
    "no_pair_tied_scores": "prompts whose samples left all scored the same: no pair",
    "no_pair_same_text": "prompts whose best and worst samples are the same text: no pair",
    "no_pair_unlabelled": "prompts the labels file has no label for: no pair",
}
# What a drop's count answers to: the pipeline's keys (llama_posttrain/driver/pipeline.py) to change when that
# drop takes more than `max_dropped` of a sampling stage's work (`too_lossy`; recipe.py stops the stage).
KNOBS = {
    "prompt_too_long": "shorter prompts in the pool, or a smaller max_new_tokens",
    "unfinished": "a larger max_new_tokens (the samples were cut off before their end of turn)",
    "empty": "a policy that answers: its samples ended the turn at once (check the base's chat template, the SFT data)",
    "over_max_chars": "a larger cleaning.max_chars",
    "repetition": "a larger cleaning.max_repeat (or cleaning.repeat_ngram)",
    "banned_phrase": "fewer cleaning.ban_phrase",
    "too_many_emoji": "a larger cleaning.max_emoji",
    "too_many_exclamations": "a larger cleaning.max_exclamation",
    "no_sft_record": "a larger k (samples per prompt), or fewer samples dropped",
    "duplicate_sft": "cleaning.dedup: false, or a prompt pool with fewer repeated prompts",
    "no_pair_fewer_than_2": "a larger k (samples per prompt), or fewer samples dropped",
    "no_pair_tied_scores": "a larger k or temperature (samples that differ more); with a verifier, prompts that the "
    "policy neither always nor never answers right",
    "no_pair_same_text": "a larger temperature or k",
    "no_pair_unlabelled": "labels for the sets left unlabelled",
}
SAMPLE_DROPS = ("unfinished", "empty", "over_max_chars", *RULES)
SFT_DROPS = ("no_sft_record", "duplicate_sft")  # the prompts' drops that lose an SFT record; the others, a pair
ALL_DROPS = ("prompt_too_long",)  # the prompts' drops that lose every output (not sampled at all)


def drops_for(outputs) -> list[str]:
    """The DROPS keys that lose something when `outputs` ("sft", "pairs") are wanted: the samples', then the prompts'."""
    prompts = [key for key in DROPS if key not in SAMPLE_DROPS]
    wanted = [key for key in prompts if key in ALL_DROPS or ("sft" if key in SFT_DROPS else "pairs") in outputs]
    return [*SAMPLE_DROPS, *wanted]


def drop_report(dropped: dict, prompts: int, k: int, limit: str, outputs=("sft", "pairs")) -> tuple[list, str | None]:
    """-> (lines that account for every sample and prompt dropped, a warning or None). `limit`: the max new
    tokens setting as the user gave it ("--max-new-tokens 8", "max_new_tokens 6"); `outputs`: which of the
    SFT records and pairs are wanted (a prompt without the other loses nothing). The warning: most samples
    reached no stop token, so most of the work was dropped."""
    sampled = prompts - dropped.get("prompt_too_long", 0)  # the prompts skipped before sampling drew none
    samples = sampled * k
    lost = sum(dropped.get(key, 0) for key in SAMPLE_DROPS)
    head = f"samples: {samples} ({sampled} prompts x {k}), {samples - lost} kept, {lost} dropped"
    parts = [f"{dropped[key]} {DROPS[key].format(limit=limit)}" for key in SAMPLE_DROPS if dropped.get(key)]
    lines = ["; ".join([head, *parts])]
    lines += [
        f"{dropped[key]} of {prompts} {DROPS[key].format(limit=limit)}"
        for key in drops_for(outputs)[len(SAMPLE_DROPS) :]
        if dropped.get(key)
    ]
    unfinished = dropped.get("unfinished", 0)
    if not samples or unfinished <= samples / 2:
        return lines, None
    setting = limit.rsplit(" ", 1)[0]
    return lines, (
        f"WARNING: {unfinished} of {samples} samples ({100 * unfinished / samples:.0f}%) reached no stop token "
        f"within {limit} and were dropped: raise {setting}"
    )


def too_lossy(
    dropped: dict,
    prompts: int,
    k: int,
    limit: str,
    max_dropped: float,
    outputs=("sft", "pairs"),
    made: int | None = None,
) -> str | None:
    """Why a sampling stage lost more than `max_dropped` (a fraction) of its work, or None: of its prompts x k
    samples, those dropped (a prompt skipped as too long loses its k); given `made` (the SFT records or pairs it
    made, one per prompt at most), of its prompts, those left without one. Each names its largest drop and the
    pipeline keys that change it (KNOBS)."""
    samples, out = prompts * k, []
    lost = {key: dropped.get(key, 0) for key in SAMPLE_DROPS if dropped.get(key)}
    if dropped.get("prompt_too_long"):
        lost["prompt_too_long"] = dropped["prompt_too_long"] * k
    if samples and sum(lost.values()) > max_dropped * samples:
        key = max(lost, key=lost.get)
        what = DROPS[key].format(limit=limit)
        what = f"{dropped[key]} {what} ({lost[key]} samples)" if key == "prompt_too_long" else f"{lost[key]} {what}"
        out.append(
            f"{sum(lost.values())} of {samples} samples ({sum(lost.values()) / samples:.0%}) were dropped, more than "
            f"max_dropped {max_dropped:g}; the most: {what}: {KNOBS[key]}"
        )
    if made is not None and prompts and prompts - made > max_dropped * prompts:
        reasons = {key: dropped.get(key, 0) for key in drops_for(outputs)[len(SAMPLE_DROPS) :] if dropped.get(key)}
        names = {"sft": "SFT record", "pairs": "pair"}
        line = (
            f"{prompts - made} of {prompts} prompts ({(prompts - made) / prompts:.0%}) gave no "
            f"{' or '.join(names.get(o, o) for o in outputs)}, more than max_dropped {max_dropped:g}"
        )
        if reasons:
            key = max(reasons, key=reasons.get)
            line += f"; the most: {reasons[key]} {DROPS[key].format(limit=limit)}: {KNOBS[key]}"
        out.append(line)
    return "; ".join(out) or None


def split_outputs(per_record: list[tuple], dedup: bool = False) -> tuple[list[dict], list[dict], list[dict], Counter]:
    """Per-record (SFT record or None, pair or None, set, drops) -> the three lists (Nones left out: each
    one counted in the drops) and the drops summed. `dedup`: an SFT record whose prompt and response
    (llama_posttrain/data/clean.py dedup_key) repeat an earlier record's is left out too, counted as duplicate_sft."""
    sft, pairs, sets, dropped, seen = [], [], [], Counter(), set()
    for record_sft, pair, set_, drops in per_record:
        if dedup and record_sft is not None:
            key = dedup_key(record_sft["messages"][:-1], record_sft["messages"][-1]["content"])
            if key in seen:
                dropped["duplicate_sft"] += 1
                record_sft = None
            seen.add(key)
        sft += [record_sft] if record_sft is not None else []
        pairs += [pair] if pair is not None else []
        sets.append(set_)
        dropped.update(drops)
    return sft, pairs, sets, dropped
