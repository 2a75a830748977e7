"""The dashboards' training metrics against references written out (issue 20): SFT's and DPO's token
accuracy and DPO's mean logits from float64 full logits (TRL's definitions), the RM's min / max reward
and per-pair rewards over several micro-batches against each response scored in a row of its own."""

import dataclasses
import math
import types
from collections import Counter

import pytest
import torch
from conftest import random_model
from test_losses import CHAT, dpo_batch, dpo_inputs, pref, sft_examples

from llama_posttrain.data.loader import DataLoader, Step
from llama_posttrain.data.rows import encode_preference, pack
from llama_posttrain.llama import get_preset
from llama_posttrain.losses.dpo import dpo_loss
from llama_posttrain.losses.ranking import ranked_pairs, ranking_loss
from llama_posttrain.train import loop
from llama_posttrain.train.distributed import Dist


def full_logits(model, batch):
    """float64 logits (N, V) of every listed target, from the trunk's hidden states."""
    with torch.no_grad():
        h = model.trunk(batch.tokens, batch.positions, batch.doc_ids, batch.branch_ids).flatten(0, 1)
    return h[batch.target_hidden_index].double() @ model.output_weight.double().T


def with_argmax_targets(model, batch):
    """The batch with every other target replaced by the model's argmax token there (a random model
    predicts almost nothing, so the accuracy would be ~0 and the test weak); -> the batch, its logits."""
    logits = full_logits(model, batch)
    target = batch.target_token.clone()
    target[::2] = logits[::2].argmax(-1)
    return dataclasses.replace(batch, target_token=target), logits


def is_argmax(logits, target):
    """TRL's mean_token_accuracy per token (argmax == label), a tie with the max counted as right."""
    return logits.gather(-1, target[:, None]).squeeze(-1) >= logits.max(-1).values


def test_sft_token_accuracy_is_the_argmax_fraction_of_float64_logits():
    from llama_posttrain.train.sft_objective import make_objective

    model = random_model(get_preset("debug"))
    batch, logits = with_argmax_targets(model, pack(sft_examples(8), 128, 128 * 8)[0])
    objective = make_objective(model, "torch")
    loss, sums = objective.loss(batch, Step([batch], batch.num_targets, 0, 0))
    hits = is_argmax(logits, batch.target_token)
    assert 0 < int(hits.sum()) < len(hits)
    metrics = loop.summarize(objective, {k: v.item() for k, v in sums.items()})
    assert metrics["token_accuracy"] == hits.double().mean().item()
    assert metrics["nll"] == pytest.approx(
        -logits.log_softmax(-1).gather(-1, batch.target_token[:, None]).mean().item()
    )


def test_dpo_mean_logits_and_token_accuracy_against_float64_logits():
    """TRL's DPO: logits/chosen = logits[chosen completion tokens].mean() over tokens and vocabulary;
    mean_token_accuracy over the chosen completion tokens. Ours: over the tokens of the DPO sums (the
    formatting tokens masked); the loss is the one without the statistics, to the bit."""
    from llama_posttrain.train.dpo import DPOSection
    from llama_posttrain.train.dpo_objective import make_objective
    from llama_posttrain.train.targets import LiveReference, model_logps

    policy, reference = random_model(get_preset("debug")), random_model(get_preset("debug"), seed=1)
    records = [pref(f"{i}+{i}=", str(2 * i) * (1 + i % 2), f"no, {i}") for i in range(4)]
    batch, logits = with_argmax_targets(policy, dpo_batch(records))
    step = Step([batch], batch.num_targets, 4, int((batch.seq_rank[batch.target_seq] == 0).sum()))
    objective = make_objective(policy, LiveReference(reference, "torch"), DPOSection(), "torch")
    loss, sums = objective.loss(batch, step)
    metrics = loop.summarize(objective, {k: v.item() for k, v in sums.items()})
    kept = ~batch.target_format
    chosen = kept & (batch.seq_rank[batch.target_seq] == 0)
    rejected = kept & (batch.seq_rank[batch.target_seq] == 1)
    assert metrics["logits/chosen"] == pytest.approx(logits[chosen].mean().item(), rel=1e-6)
    assert metrics["logits/rejected"] == pytest.approx(logits[rejected].mean().item(), rel=1e-6)
    hits = is_argmax(logits, batch.target_token)[chosen]
    assert 0 < int(hits.sum()) < len(hits)
    assert metrics["token_accuracy"] == pytest.approx(hits.double().mean().item(), abs=1e-12)
    plain = dpo_loss(**dpo_inputs(model_logps(policy, batch, "torch"), model_logps(reference, batch, "torch"), batch))
    assert loss.item() == plain[0].item()  # the loss from the log-probs alone, to the bit


def rm_loader(records):
    """3 records a step, a record a micro-batch (one row as long as the longest record)."""
    examples = [encode_preference(r, CHAT, 256, "truncate", Counter(), shuffle_seed=i) for i, r in enumerate(records)]
    longest = max(len(e) for e in examples)
    return DataLoader(examples, 3, longest, longest, shuffle=False, drop_last=False)


def reward_alone(rm, prompt, response):
    """A response's reward in a row of its own."""
    ids = CHAT.encode_dialog([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]).tokens
    with torch.no_grad():
        return rm(torch.tensor([ids]))[0, -1].item()


def test_rm_min_max_reward_and_pair_rewards_over_micro_batches():
    """loop.evaluate_objective over 3 steps of several micro-batches: reward_max / reward_min are the max / min of
    every response's reward, and the collected pair rewards are each ordered pair's (better, worse)."""
    from llama_posttrain.train.rm_objective import make_objective

    rm = random_model(get_preset("debug"), head="reward").eval()
    records = [pref(f"{i}*3=", str(3 * i), f"{i}", *([f"{i}{i}"] if i % 3 == 0 else [])) for i in range(1, 9)]
    loader = rm_loader(records)
    assert sum(len(s.micro_batches) for s in loader.eval_steps()) == 8
    d = Dist(0, 1, 0, torch.device("cpu"), None)
    got = loop.evaluate_objective(make_objective(rm, None, collect=True), loader, rm, d)
    rewards = [[reward_alone(rm, r.prompt[0]["content"], x[0]["content"]) for x in r.responses] for r in records]
    flat = [x for rs in rewards for x in rs]
    assert got["eval/reward_max"] == pytest.approx(max(flat), abs=1e-5)
    assert got["eval/reward_min"] == pytest.approx(min(flat), abs=1e-5)
    pairs = [(rs[a], rs[b]) for rs in rewards for a in range(len(rs)) for b in range(a + 1, len(rs))]  # 0 = best
    assert len(got["eval/rewards_chosen"]) == len(got["eval/rewards_rejected"]) == len(pairs) == 8 + 2 * 2
    got_pairs = sorted(zip(got["eval/rewards_chosen"], got["eval/rewards_rejected"]))  # sequences are shuffled
    assert [x for p in got_pairs for x in p] == pytest.approx([x for p in sorted(pairs) for x in p], abs=1e-5)
    # the training objective: nothing collected
    without = loop.evaluate_objective(make_objective(rm, None), loader, rm, d)
    assert {k: v for k, v in got.items() if not isinstance(v, list)} == without


def test_an_empty_micro_batch_changes_no_extremum_and_none_is_logged_without_sequences():
    from llama_posttrain.train.rm_objective import make_objective

    objective = make_objective(None, None)
    none = torch.zeros(0)
    empty = ranking_loss(none, none.long(), none.long())
    rewards = torch.tensor([0.5, -1.25, 2.0, 0.25])
    group, rank = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    mb = types.SimpleNamespace(doc_ids=torch.zeros(1, 4, dtype=torch.long))
    acc, alone = {}, {}
    for loss, sums in (empty, ranking_loss(rewards[:2], group[:2], rank[:2]), empty,
                       ranking_loss(rewards[2:], group[2:], rank[2:])):  # fmt: skip
        loop._add(acc, loss, {**sums, "trl_tokens": torch.tensor(4.0)}, mb, objective.extrema)  # as rm.py's loss adds
    loop._add(alone, empty[0], {**empty[1], "trl_tokens": torch.tensor(4.0)}, mb, objective.extrema)
    metrics = loop.summarize(objective, {k: v.item() for k, v in acc.items()})
    assert (metrics["reward_max"], metrics["reward_min"]) == (2.0, -1.25)
    assert ranked_pairs(group, rank)[0].tolist() == [0, 2]
    assert not {"reward_max", "reward_min"} & set(loop.summarize(objective, {k: v.item() for k, v in alone.items()}))
    assert math.isinf(alone["reward_max"].item())
