"""The project lives beside the packages its users have (issue 25): one importable name, `llama_posttrain`,
so that Hugging Face's `kernels` (which transformers >= 5.25 installs and imports on every `from_pretrained`)
and other projects' `llama` / `data` / `train` / `losses` are never shadowed, and an entry point runs from
any working directory with nothing but the editable install (no PYTHONPATH, as a user has it)."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "experiments" / "quickstart"
# what a user's shell has: no PYTHONPATH pointing at the checkout, no USE_HUB_KERNELS to keep transformers off `kernels`
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "USE_HUB_KERNELS")} | {
    "OMP_NUM_THREADS": "1"
}


def setup_packages() -> list[str]:
    """The `include` patterns setup.py hands find_packages, read from its source (running it would install)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "find_packages":
            (kw,) = [k for k in node.keywords if k.arg == "include"]
            return ast.literal_eval(kw.value)
    raise AssertionError("setup.py: no find_packages(include=...)")


def test_one_importable_name():
    """setup.py installs llama_posttrain and its subpackages only; the repository root holds no other
    package (a folder with __init__.py there shadows an installed one whenever the root is on sys.path:
    `python -c`, `python -m`, a notebook started there)."""
    assert setup_packages() == ["llama_posttrain", "llama_posttrain.*"]
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["llama_posttrain"], packages
    for name in ("kernels", "llama", "data", "train", "losses"):
        assert not (ROOT / f"{name}.py").exists()


def test_hugging_face_kernels_is_the_one_imported_from_the_root():
    """From the repository root (on sys.path as '' for `python -c`), `import kernels` is whatever the
    environment installed, never a folder of ours; ours is llama_posttrain.kernels."""
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's `kernels` is not installed (transformers < 5.25)")
    code = "import kernels, llama_posttrain.kernels as k; print(kernels.__file__); print(k.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=USER_ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    theirs, ours = map(Path, r.stdout.split())
    assert ROOT not in theirs.parents, theirs
    assert ours == ROOT / "llama_posttrain" / "kernels" / "__init__.py"


CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
from llama_posttrain.kernels import target_logprobs
from llama_posttrain.llama import ModelConfig, load_model, save_model
from llama_posttrain.llama.model import Transformer

folder = sys.argv[1]
torch.manual_seed(0)
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=300, max_seq_len=64,
                  rope_scaling=None, tie_embeddings=False)
model = Transformer(cfg)
for p in model.parameters():
    torch.nn.init.normal_(p, std=0.5)  # random norms too: a mapping bug cannot hide behind ones
save_model(model, folder, format="hf")
hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)  # imports Hugging Face's `kernels`
import kernels
assert "llama_posttrain" not in kernels.__file__, kernels.__file__
ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    out = hf(ids, output_hidden_states=True)
ref = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].flatten()
hidden = out.hidden_states[-1][:, :-1].flatten(0, 1)  # after the final norm
ours = target_logprobs(hidden.float(), hf.lm_head.weight.float(), ids[:, 1:].flatten(), backend="torch")
ours_model = load_model(folder, dtype=torch.float64)
with torch.no_grad():
    logits = ours_model(ids)
print(float((ours.double() - ref).abs().max()), float((logits - out.logits).abs().max()))
"""


@pytest.mark.slow
def test_transformers_from_pretrained_then_our_kernel_in_one_process(tmp_path):
    """From the repository root, as a user's notebook would: transformers loads a hub folder (with
    its `kernels` import), then our log-prob kernel scores that model's hidden states and our model
    loads the same folder. Checked against the float64 log-softmax of transformers' own logits."""
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "hub")], cwd=ROOT, env=USER_ENV, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    kernel_err, logits_err = map(float, r.stdout.split())
    assert kernel_err < 1e-4, kernel_err  # fp32 kernel against the float64 reference
    assert logits_err < 1e-4, logits_err  # both float64 weights (our RoPE tables are fp32: ~1e-6 here)


def sft_overrides(run_dir: Path) -> list[str]:
    """The quickstart SFT config, 2 steps, its data named by absolute path (relative paths are the
    working directory's, as for every command-line tool)."""
    return [
        "--config", str(QUICK / "sft.yaml"), f"train.run_dir={run_dir}", "logging.progress=false",
        f"data.train={QUICK / 'data' / 'sft_train.jsonl'}", f"data.eval={QUICK / 'data' / 'sft_eval.jsonl'}",
        "train.steps=2", "train.eval_every=2", "train.save_every=2", "data.batch_size=8",
    ]  # fmt: skip


def trained_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row["step"] for row in map(json.loads, lines) if "loss" in row]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["python", pytest.param("torchrun", marks=pytest.mark.long)])  # torchrun: -m long
def test_an_entry_point_runs_from_another_folder(tmp_path, how):
    """`python /path/to/repo/llama_posttrain/train/sft.py` and `torchrun ... sft.py` started in an
    unrelated folder: the script's own folder (first on sys.path) holds evaluate.py, config.py, ...; the
    editable install alone finds the package; the first log-prob goes through our kernels, not Hugging
    Face's package of that name."""
    script = ROOT / "llama_posttrain" / "train" / "sft.py"
    run_dir = tmp_path / "run"
    if how == "python":
        cmd = [sys.executable, str(script), *sft_overrides(run_dir)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)]
        cmd += sft_overrides(run_dir)
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run(cmd, cwd=work, env=USER_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert trained_steps(run_dir) == [1, 2]
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_a_script_started_by_path_does_not_keep_its_folder_on_sys_path(tmp_path):
    """llama_posttrain/__init__.py takes the script's own folder off sys.path: `import evaluate` in a run of
    llama_posttrain/train/*.py must not be our jobs/evaluate.py."""
    probe = ROOT / "llama_posttrain" / "train" / "_probe_sys_path.py"
    probe.write_text(
        "import sys\nfolder = sys.path[0]\nimport llama_posttrain\n"
        "import importlib.util as u\nspec = u.find_spec('evaluate')\n"
        "print(folder in sys.path, spec is None or 'llama_posttrain' not in (spec.origin or ''))\n"
    )
    try:
        r = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, env=USER_ENV, capture_output=True, text=True)
    finally:
        probe.unlink()
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]
