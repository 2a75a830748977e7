"""The benchmarks' --checkpoint paths (experiments/bench: generate.py, sft_step.py, dpo_step.py, summary_table.py)
on a tiny model folder with its own ChatML tokenizer and template (tests/fixtures/chatml_bpe, SmolLM2's template):
each side runs, the prompt and training ids equal transformers' and TRL's rendering of the folder's template, and
the one summary table's ratios are the peer's time over ours."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_posttrain.llama import ModelConfig, Transformer, save_model

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "experiments" / "bench"
FIXTURE = ROOT / "tests" / "fixtures" / "chatml_bpe"
spec = importlib.util.spec_from_file_location("bench_summary_table", BENCH / "summary_table.py")
summary_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summary_table)


@pytest.fixture(scope="module")
def chatml_model(tmp_path_factory) -> Path:
    """A 1-layer model over the fixture's 762-token vocabulary, native format, with the tokenizer files beside it."""
    d = tmp_path_factory.mktemp("bench") / "model"
    vocab = len(json.loads((FIXTURE / "tokenizer.json").read_text())["model"]["vocab"]) + 1  # + the added <think>
    config = ModelConfig(
        dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=vocab, max_seq_len=8192, tie_embeddings=True
    )
    torch.manual_seed(0)
    save_model(Transformer(config), d)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(FIXTURE / name, d / name)
    return d


def run(script: str, *argv) -> str:
    cmd = [sys.executable, str(BENCH / script), *map(str, argv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def summary(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.long  # ~10 s each, a benchmark's own run against its peer (pytest -m long)
def test_generate_checkpoint_against_hf(chatml_model, tmp_path):
    out = run(
        "generate.py", "--checkpoint", chatml_model, "--prompts", 2, "--samples", 3, "--new", 5, "--repeats", 1,
        "--quick", "--temperature", 0.7, "--top-p", 0.9, "--methods", "fanout", "hf", "--threads", 1,
        "--summary", tmp_path / "s.jsonl",
    )  # fmt: skip
    assert "same prompt ids (transformers' apply_chat_template == our chat format): yes" in out
    rows = summary(tmp_path / "s.jsonl")
    assert [r["side"] for r in rows] == ["ours: fan-out", "HF generate"] and [r["peer"] for r in rows] == [False, True]
    for r in rows:  # 2 prompts x 3 samples x 5 tokens each
        assert r["throughput"] == pytest.approx(6 / r["time_s"]) and r["tokens_per_s"] == pytest.approx(
            30 / r["time_s"]
        )
        assert r["peak_gib"] > 0


@pytest.mark.long  # ~10 s each, a benchmark's own run against its peer (pytest -m long)
@pytest.mark.parametrize("script", ["sft_step.py", "dpo_step.py"])
def test_step_checkpoint_against_trl(chatml_model, tmp_path, script):
    out = run(
        script, "--checkpoint", chatml_model, "--warmup", 0, "--steps", 1, "--batch", 2, "--records", 2,
        "--max-len", 4096, "--threads", 1, "--summary", tmp_path / "s.jsonl",
    )  # fmt: skip
    assert f"model: {chatml_model} (dim 32, 1 layers" in out and "vocab 762, tied" in out
    assert "same token ids on both sides (TRL's tokenized" in out and "our chat format): yes" in out
    rows = summary(tmp_path / "s.jsonl")
    assert [r["peer"] for r in rows] == [False, True]
    for r in rows:  # 2 records per step
        assert r["throughput"] == pytest.approx(2 / r["time_s"])


def test_summary_table_ratios_against_the_peer():
    rows = [
        dict(benchmark="b", side="ours", peer=False, time_s=2.0, throughput=4.0, unit="x/s", tokens_per_s=10,
             peak_gib=1.5, growth_gib=0.5),
        dict(benchmark="b", side="peer", peer=True, time_s=3.0, throughput=8 / 3, unit="x/s", tokens_per_s=7,
             peak_gib=3.0, growth_gib=1.0),
        dict(benchmark="alone", side="ours", peer=False, time_s=1.0, throughput=1.0, unit="x/s", tokens_per_s=1,
             peak_gib=1.0, growth_gib=0.1),
    ]  # fmt: skip
    lines = summary_table.table(rows)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert cells[0][-2:] == [f"{3.0 / 2.0:.2f}x", f"{1.5 / 3.0:.2f}x"]
    assert cells[1][-2:] == ["1.00x", "1.00x"]
    assert cells[2][-2:] == ["", ""]  # no peer row in that benchmark


def test_summary_table_names_a_bad_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"benchmark": "b"}\nnot json\n')
    with pytest.raises(SystemExit, match=r"s.jsonl:2: not a JSON line"):
        summary_table.read(path)
