"""The heads on the trunk's final hidden states (B, T, dim): the LM head (logits, tied or not) and the
reward head (a scalar). Everything that depends on the head asks it here: the model (its module, its
initialisation, its forward), the checkpoint formats (its weight names, ours and HF's, HF's architecture and
config keys), sharding (its dtype policy) and the accounting (its parameters, its FLOPs).

A head's weights are a module of the model under `attr` (`output`, `score`), so their names are
`{attr}.weight` in the state dict, as Meta and HF name them. A new head: a `Head` subclass here, added to HEADS.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from llama_posttrain.llama.config import ModelConfig


class ScalarLinear(nn.Linear):
    """dim -> 1 without bias, computed in fp32 whatever the input's and the weight's dtype."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__(dim, 1, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., ) in fp32. Projected on the weight row rather than linear(x).squeeze(-1):
        the output is a tensor of its own, not a view, which FSDP2 warns about on every rank (an in-place
        op on it would skip the backward hook)."""
        return F.linear(x.float(), self.weight[0].float())


class Head:
    """What the model, the checkpoint formats, sharding and the accounting ask of a head."""

    name: str  # as checkpoints record it (native config.json "head"; HF's architecture)
    title: str  # in messages: "LM head"
    model_title: str  # a checkpoint with this head: "language-model"
    attr: str  # the model's attribute holding the head's module: its weights are `{attr}.weight`
    hf_names: dict[str, str]  # our weight name -> HF's
    hf_architecture: str
    hf_config: dict = {}  # the keys HF's config.json adds for this head
    fp32: bool = False  # dtype policy: weights and output in fp32 whatever the trunk's (its own FSDP unit)

    def build(self, config: ModelConfig, device=None, dtype=None) -> nn.Module | None:
        """The head's module (None: it has no weights of its own)."""
        raise NotImplementedError

    def init_std(self, config: ModelConfig) -> float:
        raise NotImplementedError

    def num_params(self, config: ModelConfig) -> int:
        raise NotImplementedError

    def flops(self, config: ModelConfig, positions: int, targets: int) -> int:
        """Forward matmul FLOPs on a micro-batch of `positions` token positions, `targets` of them listed
        as prediction targets."""
        raise NotImplementedError

    def forward(self, model, h: Tensor, head_fn=None) -> Tensor:
        """The model's output from its final hidden states h (B, T, dim); head_fn: see Transformer.forward."""
        raise NotImplementedError

    def weight_names(self, config: ModelConfig) -> set[str]:
        """The names of the head's own weights in a model of `config`'s state dict."""
        return {f"{self.attr}.weight"} if self.num_params(config) else set()

    def module(self, model) -> nn.Module | None:
        """The head's module on `model` (None: none, e.g. a tied LM head or another head's model)."""
        return model._modules.get(self.attr)

    def init_weights(self, model) -> None:
        """Normal(0, init_std) weights."""
        module = self.module(model)
        if module is not None:
            nn.init.normal_(module.weight, std=self.init_std(model.config))

    def fresh(self, model) -> None:
        """Make the head's module of a model built on the meta device real, on the trunk's device and
        dtype, and initialise it (a head the loaded checkpoint does not hold)."""
        ref = model.tok_embeddings.weight
        self.module(model).to_empty(device=ref.device).to(ref.dtype)
        self.init_weights(model)


class LMHead(Head):
    """Logits over the vocabulary: its own (V, dim) matrix `output`, or the embeddings' when tied."""

    name, title, model_title, attr = "lm", "LM head", "language-model", "output"
    hf_names = {"output.weight": "lm_head.weight"}
    hf_architecture = "LlamaForCausalLM"

    def build(self, config, device=None, dtype=None):
        if config.tie_embeddings:
            return None
        return nn.Linear(config.dim, config.vocab_size, bias=False, device=device, dtype=dtype)

    def init_std(self, config):
        return 0.02

    def num_params(self, config):
        return 0 if config.tie_embeddings else config.vocab_size * config.dim

    def flops(self, config, positions, targets):
        return 2 * config.vocab_size * config.dim * targets  # only the target positions are projected

    def weight(self, model) -> Tensor:
        """The vocabulary projection (V, dim): `output`'s, else (tied, or a model with another head) the
        embeddings'."""
        own = self.module(model)
        return own.weight if own is not None else model.tok_embeddings.weight

    def forward(self, model, h, head_fn=None):
        if head_fn is not None:
            return head_fn(h, self.weight(model))
        return F.linear(h, self.weight(model))


class RewardHead(Head):
    """One reward per position, `score` (1, dim), kept and computed in fp32 whatever the trunk's dtype:
    rewards of ~1.6 in bf16 move in steps of 0.0078, coarser than early reward margins (~0.0025) and a
    source of ties."""

    name, title, model_title, attr = "reward", "reward head", "reward-model", "score"
    hf_names = {"score.weight": "score.weight"}
    hf_architecture = "LlamaForSequenceClassification"
    # transformers scores a sequence at its last token that is not pad_token_id: without one it refuses
    # batches of more than one sequence
    hf_config = {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    fp32 = True

    def build(self, config, device=None, dtype=None):
        return ScalarLinear(config.dim, device=device, dtype=dtype)

    def init_std(self, config):
        return 1 / math.sqrt(config.dim + 1)

    def num_params(self, config):
        return config.dim

    def flops(self, config, positions, targets):
        return 2 * config.dim * positions  # the head runs on every position of the rows

    def forward(self, model, h, head_fn=None):
        return self.module(model)(h)  # (B, T) fp32: ScalarLinear


HEADS: dict[str, Head] = {"lm": LMHead(), "reward": RewardHead()}


def get_head(head: str | Head) -> Head:
    """A head by its name (HEADS), or the head given."""
    if isinstance(head, Head):
        return head
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {tuple(HEADS)}")
    return HEADS[head]


def all_weight_names() -> set[str]:
    """Every weight name a head of HEADS may have (a checkpoint may hold another head's: dropped on load)."""
    return {name for head in HEADS.values() for name in head.hf_names}


def model_params(config: ModelConfig, head: str | Head = "lm") -> int:
    """Every parameter of a model: embeddings, blocks, final norm, and the head's own."""
    return config.trunk_params + get_head(head).num_params(config)
