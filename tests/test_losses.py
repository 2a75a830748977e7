"""The three losses against float64 formulas written out, and through the model on real rows."""

import math
from collections import Counter

import pytest
import torch
from conftest import random_model

from llama_posttrain.data.rows import collate, encode_preference, pack
from llama_posttrain.data.schema import PreferenceRecord
from llama_posttrain.llama import Transformer, get_preset
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer
from llama_posttrain.losses.dpo import Hyper, dpo_loss
from llama_posttrain.losses.ranking import LLAMA2_MARGINS, ranking_loss
from llama_posttrain.losses.sft import sft_loss
from llama_posttrain.train.targets import Pairs, dpo_logps, strength_margins, target_logps

CHAT = ChatFormat(load_tokenizer())


def pref(prompt, *responses, strength=None):
    return PreferenceRecord(
        [{"role": "user", "content": prompt}], [[{"role": "assistant", "content": r}] for r in responses], strength
    )


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------- ranking


def test_ranking_loss_equals_pairwise_formula():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, generator=g, dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    rank = torch.tensor([1, 0, 2, 0, 1, 1, 0])
    strength = torch.tensor([0, 2, -1])
    margin = strength_margins(strength, LLAMA2_MARGINS["large"]).double()
    for m in (None, margin):
        loss, metrics = ranking_loss(rewards, group, rank, margin=m)
        terms, correct = [], 0
        r = rewards.tolist()
        for a in range(7):
            for b in range(7):
                if group[a] == group[b] and rank[a] < rank[b]:
                    mm = 0.0 if m is None else [3.0, 1.0, 0.0][group[a]]
                    terms.append(-log_sigmoid(r[a] - r[b] - mm))
                    correct += r[a] > r[b]
        assert len(terms) == 3 + 1 + 1  # edited > chosen > rejected gives 3 pairs
        assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
        assert (metrics["correct"] / metrics["pairs"]).item() == pytest.approx(correct / len(terms))
    loss, _ = ranking_loss(rewards, group, rank, num_pairs=10)  # the step's count, for accumulation
    assert loss.item() == pytest.approx(ranking_loss(rewards, group, rank)[0].item() * 5 / 10)


def test_ranking_loss_options_are_keywords():
    """rewards, group and rank by position; the options (margin, num_pairs, classes, ...) by name only."""
    rewards, group, rank = torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([0, 1])
    with pytest.raises(TypeError, match="positional"):
        ranking_loss(rewards, group, rank, torch.zeros(1))
    loss, _ = ranking_loss(rewards, group, rank, margin=torch.zeros(1))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))  # -log sigmoid(1 - 0)


def test_ranking_loss_gradcheck():
    rewards = torch.randn(5, dtype=torch.float64, requires_grad=True)
    group, rank = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([2, 0, 1, 0, 1])
    margin = torch.tensor([0.5, 1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda r: ranking_loss(r, group, rank, margin=margin)[0], (rewards,))


def test_shuffled_reward_row_equals_separate_rows():
    torch.manual_seed(0)
    model = Transformer(get_preset("debug"), head="reward").eval()
    records = [pref("What is 12+30?", "42", "It is 42.", "41", strength="better"), pref("Say hi", "hi!", "no")]
    examples = [
        encode_preference(r, CHAT, 256, "truncate", Counter(), shuffle_seed=7 + i) for i, r in enumerate(records)
    ]
    batch = pack(examples, max_len=256, tokens_per_microbatch=256)[0]  # both in one row
    assert batch.tokens.shape[0] == 1
    with torch.no_grad():
        rewards = model(batch.tokens, batch.positions, batch.doc_ids, batch.branch_ids).flatten()[batch.seq_score_index]
        k = 0
        for rec in records:
            prompt = CHAT.encode_dialog(rec.prompt, add_generation_prompt=True).tokens
            for resp in rec.responses:
                alone = prompt + CHAT.tokenizer.encode(resp[0]["content"]) + [CHAT.tokenizer.eot_id]
                assert abs(rewards[k] - model(torch.tensor([alone]))[0, -1]) <= 1e-5
                k += 1
    assert batch.seq_rank.tolist() == [0, 1, 2, 0, 1] and batch.seq_group.tolist() == [0, 0, 0, 1, 1]


# ----------------------------------------------------------------------------- DPO


def dpo_batch(records, chat=CHAT):
    examples = [encode_preference(r, chat, 512, "truncate", Counter(), max_responses=2) for r in records]
    return collate([examples])


def dpo_inputs(pi, ref, batch, mask_format=True):
    """dpo_loss's tensor arguments from per-token log-probs of policy and reference (ref None: none),
    this micro-batch being the whole step."""
    pairs = Pairs(batch, mask_format)
    policy = pairs.policy(pi)
    reference = pairs.sums(ref) if ref is not None else None
    return dict(policy=policy, reference=reference, num_pairs=len(policy.chosen),
                num_chosen_tokens=int(policy.chosen_nll_tokens.sum()))  # fmt: skip


@pytest.mark.parametrize("nll_norm", ["sequence", "token"])
def test_dpo_loss_equals_float64_formula(nll_norm):
    batch = dpo_batch([pref("a?", "yes", "no way"), pref("b?", "maybe so, I think", "x")])
    N = batch.num_targets
    g = torch.Generator().manual_seed(1)
    pi, ref = -torch.rand(N, generator=g, dtype=torch.float64) * 3, -torch.rand(N, generator=g, dtype=torch.float64) * 3
    beta, alpha, eps = 0.1, 0.2, 0.1
    hp = Hyper(beta=beta, alpha=alpha, label_smoothing=eps, nll_norm=nll_norm)
    loss, m = dpo_loss(**dpo_inputs(pi, ref, batch), hp=hp)

    seq, fmt = batch.target_seq.tolist(), batch.target_format.tolist()
    pref_sum, rewards, nll_of_means, nll_sum, chosen_tokens = 0.0, [], 0.0, 0.0, 0
    for c, r in ((0, 1), (2, 3)):

        def s(x, k, masked=True):
            return sum(x[i].item() for i in range(N) if seq[i] == k and not (masked and fmt[i]))

        h = beta * ((s(pi, c) - s(ref, c)) - (s(pi, r) - s(ref, r)))
        pref_sum += -(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h)
        n_c = sum(1 for i in range(N) if seq[i] == c)  # every chosen token, formatting ones too
        nll_of_means += -s(pi, c, False) / n_c
        nll_sum, chosen_tokens = nll_sum - s(pi, c, False), chosen_tokens + n_c
        rewards.append((beta * (s(pi, c) - s(ref, c)), beta * (s(pi, r) - s(ref, r))))
    # sequence: the mean over pairs of each chosen sequence's mean NLL; token: the mean over all chosen tokens
    nll = nll_of_means / 2 if nll_norm == "sequence" else nll_sum / chosen_tokens
    assert loss.item() == pytest.approx(pref_sum / 2 + alpha * nll, abs=1e-12)
    assert (m["nll"] / m["nll_terms"]).item() == pytest.approx(nll, abs=1e-12)  # the logged nll: the loss's term
    assert m["pairs"].item() == 2
    assert m["rewards/chosen"].item() / 2 == pytest.approx(sum(c for c, _ in rewards) / 2)
    assert m["rewards/margins"].item() / 2 == pytest.approx(sum(c - r for c, r in rewards) / 2)
    assert m["rewards/accuracies"].item() / 2 == pytest.approx(sum(c > r for c, r in rewards) / 2)
    assert sum(fmt) == 4  # one terminator per response


def test_dpo_without_mask_and_nll_is_plain_dpo():
    batch = dpo_batch([pref("q", "good answer", "bad")])
    N = batch.num_targets
    pi, ref = -torch.rand(N, dtype=torch.float64), -torch.rand(N, dtype=torch.float64)
    loss, _ = dpo_loss(**dpo_inputs(pi, ref, batch, mask_format=False), hp=Hyper(beta=0.5, alpha=0.0))
    c, r = batch.target_seq == 0, batch.target_seq == 1
    h = 0.5 * ((pi[c].sum() - ref[c].sum()) - (pi[r].sum() - ref[r].sum()))
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(h).item(), abs=1e-12)


def test_dpo_mask_on_real_llama3_ids(llama3_tokenizer_dir):
    tok = load_tokenizer(llama3_tokenizer_dir / "tokenizer.model")
    chat = ChatFormat(tok)
    chosen = [
        {"role": "assistant", "content": "Let me compute."},
        {"role": "ipython", "content": "42"},
        {"role": "assistant", "content": "The answer is 42."},
    ]
    rec = PreferenceRecord(
        [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "6*7?"}],
        [chosen, [{"role": "assistant", "content": "41"}]],
    )
    batch = dpo_batch([rec], chat)
    fmt, seq, toks = batch.target_format, batch.target_seq, batch.target_token
    # the chosen targets: assistant text, its terminator; the ipython turn is context, not a target;
    # the second assistant turn's header is a target only in the sense of being predicted? no: headers
    # are not generated by the policy, so they are not targets at all
    kept = tok.decode(toks[(seq == 0) & ~fmt].tolist())
    assert kept == "Let me compute.The answer is 42."
    masked = toks[(seq == 0) & fmt].tolist()
    assert masked == [tok.eot_id, tok.eot_id]
    assert tok.decode(toks[(seq == 1) & ~fmt].tolist()) == "41" and toks[(seq == 1) & fmt].tolist() == [tok.eot_id]
    # formatting inside the row: every header span and terminator in the rows is flagged by the chat format
    enc = chat.encode_dialog(rec.prompt + chosen)
    spans = tok.decode([t for t, f in zip(enc.tokens, enc.is_format) if f])
    assert spans == "".join(
        f"<|start_header_id|>{r}<|end_header_id|>\n\n" + "<|eot_id|>" for r in ("system", "user")
    ) + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n<|eot_id|>" for m in chosen)


def test_shared_prompt_dpo_row_equals_separate_sequences():
    model = random_model(get_preset("debug"))
    rec = pref("Add 17 and 25.", "17 + 25 = 42", "40")
    batch = dpo_batch([rec])
    with torch.no_grad():
        h = model.trunk(batch.tokens, batch.positions, batch.doc_ids, batch.branch_ids)
        token_logps = target_logps(h, model.output_weight, batch)
        pc, pr = dpo_logps(token_logps, batch, mask_format=False)
        prompt = CHAT.encode_dialog(rec.prompt, add_generation_prompt=True).tokens
        for resp, got in zip(rec.responses, (pc, pr)):
            full = torch.tensor([prompt + CHAT.tokenizer.encode(resp[0]["content"]) + [CHAT.tokenizer.eot_id]])
            logp = model(full)[0].double().log_softmax(-1)
            expected = sum(logp[i - 1, full[0, i]].item() for i in range(len(prompt), full.shape[1]))
            assert got.item() == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------- SFT


def sft_examples(n):
    from llama_posttrain.data.rows import encode_sft
    from llama_posttrain.data.schema import SFTRecord

    recs = [
        SFTRecord(
            [{"role": "user", "content": f"{i}+{i}="}, {"role": "assistant", "content": str(2 * i) * (1 + i % 3)}]
        )
        for i in range(n)
    ]
    return [encode_sft(r, CHAT, 128, "truncate", Counter()) for r in recs]


def sft_step(model, batches, num_targets):
    model.zero_grad()
    total = 0.0
    for b in batches:
        h = model.trunk(b.tokens, b.positions, b.doc_ids, b.branch_ids)
        loss, _ = sft_loss(target_logps(h, model.output_weight, b), num_targets)
        loss.backward()
        total += loss.item()
    return total, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_sft_accumulation_equals_one_batch():
    model = random_model(get_preset("debug")).double()
    examples = sft_examples(8)
    n = sum(len(e.targets) for e in examples)
    one, g_one = sft_step(model, pack(examples, 128, 128 * 8), n)
    micro = [b for k in range(4) for b in pack(examples[2 * k : 2 * k + 2], 128, 128)]
    assert len(micro) >= 4
    acc, g_acc = sft_step(model, micro, n)
    assert acc == pytest.approx(one, abs=1e-12)
    for k in g_one:
        assert torch.allclose(g_one[k], g_acc[k], atol=1e-12), k
    # and the loss is the formula: mean NLL over the targets, from plain logits
    b = pack(examples, 128, 128 * 8)[0]
    logp = model(b.tokens, b.positions, b.doc_ids).log_softmax(-1).flatten(0, 1)
    assert one == pytest.approx(-logp[b.target_hidden_index, b.target_token].mean().item(), abs=1e-12)


def test_separate_rows_baseline_gives_the_same_rewards_and_loss():
    """The ablation baseline (each response after its own prompt copy) computes the same thing."""
    torch.manual_seed(0)
    model = Transformer(get_preset("debug"), head="reward").eval()
    rec = pref("What is 12+30?", "42", "It is 42.", "41")
    out = []
    for one_row in (True, False):
        ex = encode_preference(rec, CHAT, 256, "truncate", Counter(), shuffle_seed=3, one_row=one_row)
        b = collate([[ex]])
        with torch.no_grad():
            r = model(b.tokens, b.positions, b.doc_ids, b.branch_ids).flatten()[b.seq_score_index]
        out.append((r, ranking_loss(r, b.seq_group, b.seq_rank)[0], len(ex)))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    assert out[0][1].item() == pytest.approx(out[1][1].item(), abs=1e-5)
    assert out[1][2] > out[0][2]  # the prompt is repeated
