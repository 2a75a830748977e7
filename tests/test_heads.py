"""The heads in one place (llama_posttrain/llama/heads.py): each registered head knows its weights, and a new
head written in one class works through the model, the checkpoints, the parameter counts and the FLOPs."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama_posttrain.driver.memory import param_counts
from llama_posttrain.llama.checkpoint import load_model, save_model
from llama_posttrain.llama.config import get_preset
from llama_posttrain.llama.formats import CheckpointError
from llama_posttrain.llama.heads import HEADS, Head, model_params
from llama_posttrain.llama.model import Transformer
from llama_posttrain.train.flops import step_flops


class ValueHead(Head):
    """A test head: two values per position from a (2, dim) matrix, in fp32."""

    name, title, model_title, attr = "value", "value head", "value-model", "value"
    hf_names = {"value.weight": "value.weight"}
    hf_architecture = "LlamaForTokenClassification"
    fp32 = True

    def build(self, config, device=None, dtype=None):
        return nn.Linear(config.dim, 2, bias=False, device=device, dtype=dtype)

    def init_std(self, config):
        return 0.5

    def num_params(self, config):
        return 2 * config.dim

    def flops(self, config, positions, targets):
        return 2 * 2 * config.dim * positions

    def forward(self, model, h, head_fn=None):
        return F.linear(h.float(), self.module(model).weight.float())


@pytest.mark.parametrize("preset", ["debug", "tiny-untied"])
@pytest.mark.parametrize("name", ["lm", "reward"])
def test_each_head_knows_its_weights(preset, name):
    """The head's weight names and count are those of the model's parameters outside the trunk."""
    config = get_preset(preset)
    model = Transformer(config, head=name)
    trunk = {n for n in model.state_dict() if n.startswith(("tok_embeddings.", "layers.", "norm."))}
    own = set(model.state_dict()) - trunk
    head = HEADS[name]
    assert head.weight_names(config) == own
    assert head.num_params(config) == sum(model.state_dict()[n].numel() for n in own)
    assert model_params(config, name) == sum(p.numel() for p in model.parameters())


def test_a_new_head_in_one_class(tmp_path, monkeypatch):
    """A head written once, as a class: the model's forward, its parameter counts and FLOPs, a native
    checkpoint's round trip and a fresh head on an LM checkpoint all take it from there."""
    head = ValueHead()
    monkeypatch.setitem(HEADS, "value", head)
    config = get_preset("debug")
    torch.manual_seed(0)
    model = Transformer(config, head="value")
    assert "value.weight" in model.state_dict() and "output.weight" not in model.state_dict()
    assert model.value.weight.std().item() == pytest.approx(0.5, rel=0.3)  # its own initialisation

    tokens = torch.randint(0, config.vocab_size, (2, 7))
    out = model(tokens)
    h = model.trunk(tokens).double()
    want = h @ model.value.weight.double().T  # float64 reference
    assert out.dtype == torch.float32 and out.shape == (2, 7, 2)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)

    total = sum(p.numel() for p in model.parameters())
    counts = param_counts(config, "value")
    assert counts["head"] == 2 * config.dim and counts["total"] == total == model_params(config, "value")

    doc = torch.zeros(2, 7, dtype=torch.long)
    mb = SimpleNamespace(tokens=tokens, doc_ids=doc, branch_ids=doc, target_token=torch.zeros(3, dtype=torch.long))
    extra = step_flops(config, "value", [mb]) - step_flops(config, "reward", [mb])
    assert extra == 3 * (2 * 2 - 2) * config.dim * tokens.numel()  # forward + backward of 2 outputs, not 1

    save_model(model, tmp_path / "value")
    back = load_model(tmp_path / "value")
    assert back.head == "value" and torch.equal(back(tokens), out)

    save_model(Transformer(config), tmp_path / "lm")
    with pytest.raises(CheckpointError, match=r"language-model checkpoint with no value head \(value\.weight\)"):
        load_model(tmp_path / "lm", head="value")
    fresh = load_model(tmp_path / "lm", head="value", new_head_ok=True)
    assert fresh.value.weight.device.type == "cpu" and fresh.value.weight.std().item() == pytest.approx(0.5, rel=0.3)
