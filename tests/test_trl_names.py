"""Every metric we log under one of TRL's names means what TRL 1.16 logs under it, on the same batch.

TRL's values come from TRL's own code: the metrics block of DPOTrainer._compute_loss and of
SFTTrainer.compute_loss (their source lines, run on the per-token values of our batch laid out as TRL's
rows: one row per response, its completion left-aligned), with stand-ins for the trainer and accelerator.
Ours come from train/dpo.py's and train/sft.py's objectives on a stand-in model (random float64 hidden
states and vocabulary), summed as the loop sums them (loop.summarize). `dpo.mask_format: false`: the
DPO sums then hold every response token, as TRL's completion mask does.
"""

import inspect
import textwrap
from collections import Counter, defaultdict
from types import SimpleNamespace

import pytest
import torch
from test_losses import CHAT, pref, sft_examples

from llama_posttrain.data.rows import collate, encode_preference
from llama_posttrain.train import loop
from llama_posttrain.train.config import LoggingSection
from llama_posttrain.train.dpo import DPOSection
from llama_posttrain.train.logger import Logger, dashboard_names
from llama_posttrain.train.targets import trl_tokens

V, H = 512, 16  # the test tokenizer (tests/conftest.py) has fewer ids


class StandIn:
    """model(tokens, positions, head_fn=, mask=) -> head_fn(hidden, weight), random float64 hidden states."""

    attention_kind = None  # as llama.model.Transformer's: the mask kind its callers build

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(V, H, generator=self.g, dtype=torch.float64)
        self.config = SimpleNamespace(vocab_size=V)

    def __call__(self, tokens, positions, head_fn, mask=None):
        self.hidden = torch.randn(*tokens.shape, H, generator=self.g, dtype=torch.float64)
        return head_fn(self.hidden, self.weight)


def trl_block(method, first: str, last: str, **scope) -> dict:
    """Run the lines of TRL's `method` from the one containing `first` (if it opens a block, from the next)
    through the one containing `last`."""
    lines = inspect.getsource(method).splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    start += lines[start].rstrip().endswith(":")
    end = next(i for i, line in enumerate(lines) if i > start and last in line)
    exec(textwrap.dedent("\n".join(lines[start : end + 1])), scope)
    return scope


def trainer(beta=0.1):
    same = lambda x: x  # noqa: E731 one process: gather is the identity
    acc = SimpleNamespace(gather_for_metrics=same, gather=same)
    return SimpleNamespace(accelerator=acc, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
                           beta=beta)  # fmt: skip


def trl_rows(values, batch, order):
    """Per-target values (N,) -> TRL's (rows, L) layout, one row per sequence of `order`, left-aligned; the mask."""
    rows = [values[batch.target_seq == k] for k in order]
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r)) for r in rows], batch_first=True).long()
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), mask


def per_target(model, batch):
    """Float64 over the full logits of every target: log p, entropy (TRL's -sum p log p), mean logit, top-1."""
    logits = model.hidden.flatten(0, 1)[batch.target_hidden_index] @ model.weight.T  # (N, V)
    logp = logits.log_softmax(-1)
    t = batch.target_token[:, None]
    return dict(
        logp=logp.gather(-1, t).squeeze(-1), entropy=-(logp.exp() * logp).sum(-1), mean_logits=logits.mean(-1),
        is_top1=logits.gather(-1, t).squeeze(-1) >= logits.max(-1).values,
    )  # fmt: skip


RECORDS = [
    pref("What is 2+2?", "4", "five, I think"),
    pref("Name a colour.", "Blue is a colour.", "cat"),
    pref("Say hi", "hi there", "no"),
]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_metrics_equal_trls_on_the_same_batch(loss, tmp_path):
    from trl import DPOTrainer

    from llama_posttrain.train.dpo_objective import make_objective
    from llama_posttrain.train.targets import PrecomputedReference

    examples = [encode_preference(r, CHAT, 512, "truncate", Counter(), max_responses=2) for r in RECORDS]
    batch = collate([examples])
    P, beta = len(examples), 0.1
    reference = torch.randn(P, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 20
    model = StandIn()
    cfg = DPOSection(loss=loss, beta=beta, mask_format=False)
    objective = make_objective(model, PrecomputedReference(reference), cfg, "torch")
    step = SimpleNamespace(num_pairs=P, num_chosen_targets=int((batch.seq_rank[batch.target_seq] == 0).sum()))
    _, sums = objective.loss(batch, step)
    tokens = (batch.doc_ids >= 0).sum().double()
    ours = {k: float(v) for k, v in loop.summarize(objective, {**sums, "tokens": tokens}).items()}

    # TRL's layout: chosen rows, then rejected rows (group order)
    order = [int((batch.seq_group == g).logical_and(batch.seq_rank == r).nonzero()) for r in (0, 1) for g in range(P)]
    x = per_target(model, batch)
    logp, mask = trl_rows(x["logp"], batch, order)
    chosen_logps, rejected_logps = (logp * mask).sum(1).chunk(2)
    ref_c, ref_r = reference[batch.group_uid].unbind(-1)
    prompt_and_response = [  # TRL's attention mask: each response's row holds its prompt
        torch.ones(ex.branch.count(0) + ex.branch.count(b)) for ex in examples for b in (1, 2)
    ]
    self = trainer(beta)
    trl_block(
        DPOTrainer._compute_loss, "# Log the metrics", '["logps/rejected"].append', self=self, mode="train",
        torch=torch, seq_len=mask.shape[1], shift_completion_mask=mask,
        inputs={"attention_mask": torch.nn.utils.rnn.pad_sequence(prompt_and_response, batch_first=True)},
        outputs=SimpleNamespace(**{k: trl_rows(x[k], batch, order)[0] for k in ("entropy", "mean_logits", "is_top1")}),
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_logratios=chosen_logps - ref_c,
        rejected_logratios=rejected_logps - ref_r,
    )  # fmt: skip
    trl = {k: v[-1] for k, v in self._metrics["train"].items()}
    names = dashboard_names(ours, "dpo")
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected", "logits/chosen", "logits/rejected", "mean_token_accuracy", "entropy"):  # fmt: skip
        assert names[f"train/{name}"] == pytest.approx(trl[name], rel=1e-7), name  # TRL: accuracies in fp32
    assert 0 < trl["rewards/accuracies"] < 1 and trl["entropy"] > 1  # neither metric trivially equal

    # num_tokens: TRL counts every prompt once per response; the logger adds tokens x trl_tokens_per_token
    log = Logger(tmp_path, LoggingSection(wandb="disabled", progress=False), {"dpo": {}}, True, 3, None)
    log._count(1, {"tokens": int(tokens), **ours})
    assert log.num_tokens == trl["num_tokens"] == float(trl_tokens(batch)) > tokens
    assert "train/nll_loss" not in names  # TRL 1.16's DPOTrainer logs no NLL; nll_norm sequence is ours

    if loss == "ipo":  # the per-token scores IPO's loss reads, ours: ipo/score_* against TRL's ipo branch
        ipo = trl_block(
            DPOTrainer._compute_loss, 'loss_type == "ipo"', "ipo_delta =", self=self, torch=torch,
            completion_mask=mask, chosen_scores=chosen_logps - ref_c, rejected_scores=rejected_logps - ref_r,
        )  # fmt: skip
        assert ours["ipo/score_chosen"] == pytest.approx(ipo["chosen_avg_score"].mean().item(), rel=1e-9)
        assert ours["ipo/score_rejected"] == pytest.approx(ipo["rejected_avg_score"].mean().item(), rel=1e-9)
        assert ours["ipo/score_margins"] == pytest.approx(ipo["ipo_delta"].mean().item(), rel=1e-9)
        assert abs(ours["rewards/margins"] / beta) > 3 * abs(ours["ipo/score_margins"])  # sums, not per token
    else:
        assert not any(k.startswith("ipo/") for k in ours)


def test_sft_entropy_and_token_accuracy_equal_trls(tmp_path):
    from trl import SFTTrainer

    from llama_posttrain.train.sft_objective import make_objective

    batch = collate([sft_examples(4)])
    model = StandIn(seed=3)
    objective = make_objective(model, "torch")
    _, sums = objective.loss(batch, SimpleNamespace(num_targets=batch.num_targets))
    ours = dashboard_names({k: float(v) for k, v in loop.summarize(objective, sums).items()}, "sft")
    x = per_target(model, batch)
    self = trainer()
    trl_block(
        SFTTrainer.compute_loss, "num_valid = ", '["mean_token_accuracy"].append', self=self, mode="train",
        outputs=SimpleNamespace(label_mask=torch.ones_like(x["logp"]), entropy=x["entropy"], is_top1=x["is_top1"]),
    )  # fmt: skip
    trl = {k: v[-1] for k, v in self._metrics["train"].items()}
    assert ours["train/entropy"] == pytest.approx(trl["entropy"], rel=1e-9) and trl["entropy"] > 1
    assert ours["train/mean_token_accuracy"] == pytest.approx(trl["mean_token_accuracy"], rel=1e-9)
    # SFT's rows are TRL's rows: num_tokens is the real tokens
    log = Logger(tmp_path, LoggingSection(wandb="disabled", progress=False), {"sft": {}}, True, 3, None)
    log._count(2, {"tokens": 50})
    assert log.num_tokens == 100


def test_names_not_trls_are_ours():
    """A name TRL 1.16 does not log with the same meaning is not given TRL's name on the dashboard."""
    assert "train/nll_loss" in dashboard_names({"nll": 1.0}, "dpo_token_nll")  # CPOTrainer's token-mean NLL
    assert dashboard_names({"nll": 1.0}, "dpo") == {"train/nll": 1.0}
    assert dashboard_names({"reward_std": 1.0}, "rm") == {"train/reward_std": 1.0}  # TRL logs no std_reward


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (dict(loss="robust"), "dpo.loss robust with dpo.label_smoothing=0.0 is plain sigmoid"),
        (dict(alpha=0.0, nll_norm="token"), "dpo.nll_norm='token' changes nothing with dpo.alpha=0"),
        (dict(loss="hinge", label_smoothing=0.1), "dpo.label_smoothing=0.1 is not read by dpo.loss hinge"),
        (dict(loss="ipo", gamma=1.0), "dpo.gamma=1.0 is not read by dpo.loss ipo"),
    ],
)
def test_keys_that_would_change_nothing_fail_at_config(keys, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        DPOSection(**keys)
    DPOSection(loss="robust", label_smoothing=0.1)  # rDPO proper
    DPOSection(alpha=0.0)
