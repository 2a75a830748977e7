"""generate's prefill in chunks (no (prompts, 1, L, L) mask), and the compiled decode step past its recompile
limit (issue 30 item 7: the prefill's dense repeated mask; the sampler's compile modes)."""

import pytest
import torch
from conftest import CONFIGS, random_model

import llama_posttrain.llama.generate as llama_generate
import llama_posttrain.llama.model as llama_model
from llama_posttrain.llama.generate import generate

PROMPTS = [list(range(5, 25)), [30, 31, 32], list(range(40, 47))]


def record_masks(monkeypatch):
    """Every dense mask the attention gets, by its shape (B, 1, queries, keys)."""
    shapes, real = [], llama_model.attend

    def attend(q, k, v, mask):
        shapes.append(tuple(mask.shape) if isinstance(mask, torch.Tensor) else None)
        return real(q, k, v, mask)

    monkeypatch.setattr(llama_model, "attend", attend)
    return shapes


def test_prefill_runs_in_chunks_whose_masks_stay_under_the_budget(monkeypatch):
    """A budget of 3 prompts x 6 positions x 20 slots: the 20-token prefill runs in 4 chunks (6, 6, 6, 2
    positions) against the slots filled so far, and samples what each prompt alone does (float64, greedy)."""
    model = random_model(CONFIGS["gqa-tied-scaled"]).double()
    config = model.config
    alone = [generate(model, [p], 1, 6, temperature=0)[0] for p in PROMPTS]
    monkeypatch.setattr(llama_generate, "PREFILL_MASK_ENTRIES", 3 * 6 * 20 + 5)
    assert llama_generate.prefill_chunk(3, 20) == 6
    shapes = record_masks(monkeypatch)
    out = generate(model, PROMPTS, 1, 6, temperature=0)
    assert out == alone
    prefill = shapes[: 4 * config.n_layers]  # then the decode steps' (rows, 1, 1, slots)
    chunks = [(3, 1, 6, 6), (3, 1, 6, 12), (3, 1, 6, 18), (3, 1, 2, 20)]
    assert prefill == [s for s in chunks for _ in range(config.n_layers)]
    assert all(s[2] == 1 for s in shapes[len(prefill) :])
    assert max(b * q * k for b, _, q, k in shapes) <= llama_generate.PREFILL_MASK_ENTRIES


def test_a_prefill_that_fits_is_one_chunk_and_never_below_one_position():
    assert llama_generate.prefill_chunk(64, 100) == 100  # the quickstart's sampling: one forward
    assert llama_generate.prefill_chunk(64, 2048) == 2**23 // (64 * 2048)  # 64 positions
    assert llama_generate.prefill_chunk(2**12, 2**12) == 1


def _count_compiles(monkeypatch):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(llama_generate.decode_step, backend=counter, dynamic=False, fullgraph=True)
    monkeypatch.setattr(llama_generate, "_compiled_decode_step", step)
    return counter


def test_compiled_decode_past_the_recompile_limit_decodes_eagerly_with_a_warning(monkeypatch, capsys):
    """A fullgraph compile past torch._dynamo's recompile_limit raises (FailOnRecompileLimitHit): generate
    decodes that call eagerly instead, the same tokens as eager, counted and printed."""
    model = random_model(CONFIGS["gqa-tied-scaled"])
    counter = _count_compiles(monkeypatch)
    before = llama_generate.EAGER_FALLBACKS
    try:
        with torch._dynamo.config.patch(recompile_limit=2):
            for n in (1, 2, 3, 4):  # four batch sizes: four shapes, two graphs allowed
                prompts = [[1, 2, 3], [4, 5]] * n
                eager = generate(model, prompts, 1, 5, stop_ids=[7], temperature=0)
                assert generate(model, prompts, 1, 5, stop_ids=[7], temperature=0, compile=True) == eager
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 2
    assert llama_generate.EAGER_FALLBACKS - before == 2
    err = capsys.readouterr().err
    assert err.count("decodes eagerly") == 2 and "recompile_limit (2)" in err and "(6 rows x 128 slots)" in err


def test_reduce_overhead_is_refused_off_cuda_and_marks_the_kv_cache_static():
    model = random_model(CONFIGS["gqa-tied-scaled"])
    with pytest.raises(ValueError, match="CUDA graphs: the model must be on a CUDA device, it is on cpu"):
        generate(model, [[1, 2]], 1, 2, compile="reduce-overhead")
    with pytest.raises(ValueError, match="compile must be False, True, 'default' or 'reduce-overhead'"):
        generate(model, [[1, 2]], 1, 2, compile="max-autotune")
    cache = llama_model.KVCache(model.config, 1, 8)
    static = llama_generate.DecodeCache(cache, 2)
    static.mark_static()
    # torch's mark for CUDA graphs: the address is fixed across replays, mutated in place, no recompile
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in static.k + static.v)
    plain = llama_generate.DecodeCache(cache, 2)
    assert not any(hasattr(t, "_dynamo_static_input_type") for t in plain.k + plain.v)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compile-mode", "default"], "argument --compile-mode: the mode of --compile; give that too"),
        (["--engine", "vllm", "--compile-mode", "default"], "argument --compile-mode: not an option of --engine vllm"),
        (["--compile", "--compile-mode", "max-autotune"], "argument --compile-mode: invalid choice"),
    ],
)
def test_sample_cli_refuses_a_compile_mode_it_cannot_use(args, message, capsys):
    from llama_posttrain.jobs.sample import main as sample_main

    with pytest.raises(SystemExit) as e:
        sample_main(["--policy", "p", "--prompts", "x.jsonl", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_sample_cli_passes_the_compile_mode_and_counts_eager_calls(tmp_path, monkeypatch, capsys):
    """--compile-mode reaches generate; reduce-overhead on a CPU rank is refused before the policy loads;
    the generate calls that decoded eagerly (past the recompile limit) are counted at the end."""
    from test_sampling_memory import _clear_dist_env, _cli_setup

    import llama_posttrain.jobs.sampling as sampling
    from llama_posttrain.jobs.sample import main as sample_main

    _clear_dist_env(monkeypatch)
    argv, _ = _cli_setup(tmp_path)
    calls, real = [], llama_generate.generate

    def recording(model, prompts, *a, compile=False, **kw):
        calls.append(compile)
        if len(calls) == 2:  # as generate does when it falls back
            llama_generate.EAGER_FALLBACKS += 1
        return real(model, prompts, *a, **kw)  # eager: a compile would take a minute here

    monkeypatch.setattr(sampling, "generate", recording)  # the name the sampling job calls
    monkeypatch.setattr(llama_generate, "EAGER_FALLBACKS", 0)
    sample_main(
        [*argv, "--k", "2", "--max-new-tokens", "3", "--batch-size", "2", "--compile", "--compile-mode", "default"]
    )
    assert calls == ["default"] * 3
    assert "warning: --compile: 1 of 3 generate calls decoded eagerly" in capsys.readouterr().err
    calls.clear()
    with pytest.raises(SystemExit, match="--compile-mode reduce-overhead captures CUDA graphs: this rank runs on cpu"):
        sample_main([*argv, "--k", "2", "--max-new-tokens", "3", "--compile", "--compile-mode", "reduce-overhead"])
    assert calls == []
