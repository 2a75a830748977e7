"""Issue 17, round 2, around the pipeline and its pieces: the pipeline forwards SIGTERM / SIGINT to the
stage it runs and exits 128 + signal; SFT logs its real and its target tokens under their own names;
rejection sampling counts and prints every sample and prompt it drops; the quickstart stage configs
write outside the pipeline's folder."""

import json
from pathlib import Path

import pytest
from test_train import QUICK, in_process, read_metrics

from llama.chat import ChatFormat
from llama.tokenizer import load_tokenizer

ROOT = Path(__file__).parent.parent
CHAT = ChatFormat(load_tokenizer())


# ------------------------------------------------------------------ SFT: real tokens and target tokens


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_sft_logs_real_tokens_and_target_tokens_counted_from_the_dialogs(tmp_path, one_rank, mask_prompt):
    """One step = the whole (12-dialog) file, so the step's counts are the file's: every token of each
    encoded dialog, and its assistant tokens (with mask_prompt false, every token but the first)."""
    lines = (QUICK / "data" / "sft_train.jsonl").read_text().splitlines()[:12]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    encoded = [CHAT.encode_dialog(json.loads(line)["messages"]) for line in lines]
    tokens = sum(len(e.tokens) for e in encoded)
    targets = sum(map(sum, (e.is_target for e in encoded))) if mask_prompt else tokens - len(encoded)
    assert targets < tokens
    in_process("sft", [
        "--config", str(QUICK / "sft.yaml"), f"train.run_dir={tmp_path / 'run'}", "logging.progress=false",
        f"data.train={tmp_path / 'sft.jsonl'}", "data.eval=null", "data.batch_size=12",
        "data.tokens_per_microbatch=128", "train.steps=2", "train.save_every=0", f"sft.mask_prompt={mask_prompt}",
    ])  # fmt: skip
    logged = read_metrics(tmp_path / "run")
    assert [m["step"] for m in logged] == [1, 2]
    for m in logged:
        assert m["tokens"] == tokens  # every real token of the step (the loss's count once overwrote it)
        assert m["target_tokens"] == targets
        # the rates share the step time: their ratio is the counts'
        assert m["tokens_per_s"] / m["target_tokens_per_s"] == pytest.approx(tokens / targets, rel=1e-6)
        assert m["tokens_per_s_per_gpu"] == pytest.approx(m["tokens_per_s"], rel=1e-6)  # 1 rank
        assert m["target_tokens_per_s_per_gpu"] == pytest.approx(m["target_tokens_per_s"], rel=1e-6)


def test_a_loss_sum_named_like_the_loops_own_is_refused():
    import torch

    from train.loop import _add

    class MB:
        doc_ids = torch.tensor([[0, 0, -1]])

    acc = {}
    _add(acc, torch.tensor(1.0), {"target_tokens": torch.tensor(2)}, MB())
    assert acc["tokens"].item() == 2 and acc["target_tokens"].item() == 2
    with pytest.raises(ValueError, match=r"sums \['tokens'\] would overwrite the loop's own"):
        _add(acc, torch.tensor(1.0), {"tokens": torch.tensor(2)}, MB())
