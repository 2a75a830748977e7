"""Sampling memory (issue 21 item 5): the KV cache a generate call holds (its estimate against the formula
and against the tensors generate allocates), --batch-size and --compile of llama_posttrain/jobs/sample.py and the
pipeline, and the vLLM engine's memory settings with a recording stand-in for the `vllm` module: its
max_model_len from the data, gpu_memory_utilization passed through, no per-request seed unless asked,
and the GPU freed before the reward models load."""

import dataclasses
import gc
import json
import sys
import types
import weakref

import pytest
import torch
from conftest import random_model

import llama_posttrain.llama.checkpoint as llama_checkpoint
import llama_posttrain.llama.generate as llama_generate
from llama_posttrain.jobs import sampling
from llama_posttrain.jobs.configs import EvalConfig, SampleConfig, parse
from llama_posttrain.jobs.sample import main as sample_main
from llama_posttrain.jobs.sampling import sample_and_write
from llama_posttrain.jobs.vllm_engine import MODEL_LEN_MULTIPLE, VLLMEngine, max_model_len, vllm_engine
from llama_posttrain.llama import get_preset, save_model
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.kv_budget import COMPILE_LEN_MULTIPLE, cache_len, kv_cache_bytes
from llama_posttrain.llama.tokenizer import load_tokenizer
from llama_posttrain.train.distributed import Dist

CHAT = ChatFormat(load_tokenizer())
DEBUG = get_preset("debug")  # n_layers 2, n_kv_heads 2, head_dim 8


def formula(config, prompts: int, longest: int, max_new: int, k: int, dtype_bytes: int) -> int:
    """The issue's: 2 (k and v) x layers x kv heads x head dim x dtype bytes x (prompt + new) x prompts x K."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype_bytes * (longest + max_new) * prompts * k


def test_kv_cache_bytes_is_the_formula_and_what_generate_allocates(monkeypatch):
    allocated = []

    class Recording(llama_generate.DecodeCache):
        def __init__(self, cache, n):
            super().__init__(cache, n)
            allocated.append(sum(t.nbytes for t in self.k + self.v))

    monkeypatch.setattr(llama_generate, "DecodeCache", Recording)
    model = random_model(DEBUG)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]  # longest 7: the others are left-padded to it
    llama_generate.generate(model, prompts, num_samples=3, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert allocated == [formula(DEBUG, 3, 7, 5, 3, 4)]
    assert kv_cache_bytes(DEBUG, 3, 7, 5, 3, torch.float32) == formula(DEBUG, 3, 7, 5, 3, 4)
    assert kv_cache_bytes(DEBUG, 64, 300, 256, 16, torch.bfloat16) == formula(DEBUG, 64, 300, 256, 16, 2)
    # compiled, the cache length is rounded up to a multiple of COMPILE_LEN_MULTIPLE, at most max_seq_len
    assert cache_len(DEBUG, 7, 5, compile=True) == COMPILE_LEN_MULTIPLE
    assert cache_len(DEBUG, DEBUG.max_seq_len - 5, 5, compile=True) == DEBUG.max_seq_len
    assert kv_cache_bytes(DEBUG, 3, 7, 5, 3, torch.float32, compile=True) == formula(DEBUG, 3, 7, 121, 3, 4)


def _cli_setup(tmp_path, n=5):
    save_model(random_model(DEBUG), tmp_path / "policy")
    save_model(random_model(DEBUG, head="reward", seed=1), tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    texts = [f"{'9' * (i * 3)}{i}+1=" for i in range(n)]  # lengths differ: each call's longest prompt differs
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    lens = [len(CHAT.encode_dialog([{"role": "user", "content": t}], add_generation_prompt=True)) for t in texts]
    argv = ["--policy", str(tmp_path / "policy"), "--rm", str(tmp_path / "rm"), "--prompts", str(prompts)]
    return argv, lens


def _clear_dist_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # restored afterwards: init_distributed sets them


def test_batch_size_and_compile_reach_generate_and_the_estimate_is_printed_first(tmp_path, monkeypatch, capsys):
    _clear_dist_env(monkeypatch)
    argv, lens = _cli_setup(tmp_path)
    calls, real = [], llama_generate.generate

    def recording(model, prompts, *a, compile=False, **kw):
        calls.append((len(prompts), compile))
        print("generate called", flush=True)
        return real(model, prompts, *a, **kw)  # eager: a compile would take a minute here

    monkeypatch.setattr(sampling, "generate", recording)  # the name the sampling job calls
    sample_main([*argv, "--k", "3", "--max-new-tokens", "4", "--batch-size", "2", "--compile"])
    assert calls == [(2, True), (2, True), (1, True)]
    out = capsys.readouterr().out
    # the largest call's cache: of the batches [0, 1], [2, 3], [4], compiled (the cache length rounded up)
    size = max(formula(DEBUG, len(b), max(b) + COMPILE_LEN_MULTIPLE - max(b) - 4, 4, 3, 4)
               for b in (lens[0:2], lens[2:4], lens[4:]))  # fmt: skip
    line = next(x for x in out.splitlines() if x.startswith("KV cache:"))
    assert f"({size:,} bytes)" in line and "2 prompts x 3 samples" in line
    assert out.index("KV cache:") < out.index("generate called")
    calls.clear()
    sample_main([*argv, "--k", "3", "--max-new-tokens", "4"])  # the defaults: one call of up to 64, eager
    assert calls == [(5, False)]
    size = formula(DEBUG, 5, max(lens), 4, 3, 4)
    assert f"({size:,} bytes) per generate call at most: 5 prompts x 3 samples" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["--vllm-gpu-memory-utilization", "1.5"], "argument --vllm-gpu-memory-utilization: must be in (0, 1]"),
        (["--vllm-gpu-memory-utilization", "0"], "argument --vllm-gpu-memory-utilization: must be in (0, 1]"),
        (["--vllm-max-model-len", "512"], "argument --vllm-max-model-len: not an option of --engine native"),
        (["--vllm-seed-per-request"], "argument --vllm-seed-per-request: not an option of --engine native"),
        (["--engine", "vllm", "--compile"], "argument --compile: not an option of --engine vllm"),
    ],
)
def test_bad_memory_options_are_refused_naming_the_option(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample_main(["--policy", "p", "--prompts", "x.jsonl", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ vLLM


def test_max_model_len_is_the_data_rounded_up_or_the_option():
    def rounded(n):  # up to a multiple of MODEL_LEN_MULTIPLE
        return (n + MODEL_LEN_MULTIPLE - 1) // MODEL_LEN_MULTIPLE * MODEL_LEN_MULTIPLE

    assert max_model_len(300, 256, 131072) == rounded(556) == 768
    assert max_model_len(200, 56, 131072) == 256  # a multiple already
    assert max_model_len(1000, 25, 1030) == 1030  # 1280 rounded, but at most the model's max_seq_len
    assert max_model_len(300, 256, 131072, given=600) == 600
    with pytest.raises(SystemExit, match=r"--vllm-max-model-len 500: must be at least the longest prompt .* = 556"):
        max_model_len(300, 256, 131072, given=500)
    with pytest.raises(SystemExit, match=r"--vllm-max-model-len 9000: .*at most the policy's max_seq_len 8192"):
        max_model_len(300, 256, 8192, given=9000)
    with pytest.raises(SystemExit, match=r"--max-new-tokens \(256\) = 8256 exceeds the policy's max_seq_len 8192"):
        max_model_len(8000, 256, 8192)


class StandInVLLM:
    """The `vllm` module: LLM and SamplingParams record their arguments; cleanup_dist_env_and_memory and
    LLM.generate log their calls in `events`."""

    def __init__(self, events):
        self.events, self.llm_kwargs = events, []
        owner = self

        class LLM:
            def __init__(self, **kwargs):
                owner.llm_kwargs.append(kwargs)
                if owner.stop_at_start:
                    raise RuntimeError("stand-in: stopped at start")

            def generate(self, prompts, params, use_tqdm=True):
                events.append("generate")
                out = types.SimpleNamespace
                eot = CHAT.tokenizer.eot_id
                return [
                    out(outputs=[out(token_ids=(65 + j, eot), finish_reason="stop") for j in range(params["n"])])
                    for _ in prompts
                ]

        self.stop_at_start = False
        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, lambda **kw: kw
        self.distributed = types.ModuleType("vllm.distributed")
        self.distributed.cleanup_dist_env_and_memory = lambda: events.append("free")
        self.module.distributed = self.distributed

    def install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "vllm", self.module)
        monkeypatch.setitem(sys.modules, "vllm.distributed", self.distributed)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # vllm_engine's check; nothing runs on it


def test_vllm_engine_passes_the_memory_settings_and_seeds_requests_only_when_asked(tmp_path, monkeypatch):
    vllm = StandInVLLM([])
    vllm.install(monkeypatch)
    save_model(random_model(DEBUG), tmp_path / "policy")
    sent = []  # the requests' SamplingParams
    for per_request in (False, True):
        engine = vllm_engine(str(tmp_path / "policy"), CHAT, 3, 2, str(tmp_path / f"export{per_request}"), 768, 0.5,
                             seed_per_request=per_request)  # fmt: skip
        folder = str(tmp_path / f"export{per_request}" / "policy_hf")
        assert vllm.llm_kwargs[-1] == dict(
            model=folder, dtype="bfloat16", seed=3, tensor_parallel_size=2, max_model_len=768,
            gpu_memory_utilization=0.5,
        )  # fmt: skip
        engine.llm.generate = lambda prompts, p, use_tqdm=True: sent.append(p) or []
        engine.sample_ids([], 4, 12, CHAT.tokenizer.stop_ids)
        assert ("seed" in sent[-1]) == per_request and sent[-1].get("seed", 3) == 3
        assert sent[-1]["n"] == 4 and sent[-1]["max_tokens"] == 12


def test_sample_cli_sets_max_model_len_from_the_prompts(tmp_path, monkeypatch, capsys):
    vllm = StandInVLLM([])
    vllm.install(monkeypatch)
    vllm.stop_at_start = True  # the CLI's arguments to vllm.LLM are what this test reads
    argv, lens = _cli_setup(tmp_path)
    argv += ["--engine", "vllm", "--max-new-tokens", "300"]
    with pytest.raises(RuntimeError, match="stand-in: stopped at start"):
        sample_main([*argv, "--vllm-gpu-memory-utilization", "0.4"])
    need = max(lens) + 300
    expected = -(-need // MODEL_LEN_MULTIPLE) * MODEL_LEN_MULTIPLE
    assert vllm.llm_kwargs[-1]["max_model_len"] == expected and expected < DEBUG.max_seq_len
    assert vllm.llm_kwargs[-1]["gpu_memory_utilization"] == 0.4
    assert f"vLLM: max_model_len {expected}, gpu_memory_utilization 0.4" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="stand-in"):
        sample_main([*argv, "--vllm-max-model-len", str(need)])
    assert vllm.llm_kwargs[-1]["max_model_len"] == need
    with pytest.raises(SystemExit, match=rf"--vllm-max-model-len {need - 1}: must be at least the longest prompt"):
        sample_main([*argv, "--vllm-max-model-len", str(need - 1)])
    assert len(vllm.llm_kwargs) == 2, "refused before vLLM started"


def _args(tmp_path, **kw):
    """llama_posttrain/jobs/sample.py's config (llama_posttrain/jobs/configs.py), as sample_and_write reads it."""
    defaults = dict(
        policy=str(tmp_path / "policy"), prompts=str(tmp_path / "prompts.jsonl"), rm=str(tmp_path / "rm"), k=2,
        max_new_tokens=4, out_sets=str(tmp_path / "sets.jsonl"),
    )  # fmt: skip
    return SampleConfig(**{**defaults, **kw})


def test_reward_models_load_after_vllm_has_freed_the_gpu(tmp_path, monkeypatch):
    events = []
    vllm = StandInVLLM(events)
    vllm.install(monkeypatch)
    save_model(random_model(DEBUG, head="reward", seed=1), tmp_path / "rm")
    engine = VLLMEngine(vllm.module.LLM(), vllm.module.SamplingParams)
    llm = weakref.ref(engine.llm)
    real = llama_checkpoint.load_model

    def load_model(path, head="lm", **kw):
        gc.collect()
        events.append(f"load {head}" + (" (the LLM object still alive)" if llm() is not None else ""))
        return real(path, head=head, **kw)

    monkeypatch.setattr(sampling, "load_model", load_model)  # the name the sampling job calls
    records = [{"id": i, "messages": [{"role": "user", "content": f"{i}+1="}]} for i in range(3)]
    cpu = Dist(0, 1, 0, torch.device("cpu"), None)
    sample_and_write(_args(tmp_path), cpu, CHAT, records, None, engine)
    assert events == ["generate", "free", "load reward"]
    sets = [json.loads(line) for line in (tmp_path / "sets.jsonl").read_text().splitlines()]
    assert [s["responses"] for s in sets] == [["A", "B"]] * 3 and all(len(s["rm_scores"]) == 2 for s in sets)


def test_native_policy_is_freed_before_the_reward_model_loads(tmp_path, monkeypatch):
    save_model(random_model(DEBUG), tmp_path / "policy")
    save_model(random_model(DEBUG, head="reward", seed=1), tmp_path / "rm")
    loaded, real = [], llama_checkpoint.load_model

    def load_model(path, head="lm", **kw):
        gc.collect()
        loaded.append((head, [ref() is None for ref in loaded_refs]))
        model = real(path, head=head, **kw)
        loaded_refs.append(weakref.ref(model))
        return model

    loaded_refs = []
    monkeypatch.setattr(sampling, "load_model", load_model)  # the name the sampling job calls
    records = [{"id": i, "messages": [{"role": "user", "content": f"{i}+1="}]} for i in range(3)]
    sample_and_write(_args(tmp_path), Dist(0, 1, 0, torch.device("cpu"), None), CHAT, records, None)
    assert loaded == [("lm", []), ("reward", [True])]  # the policy gone when the reward model loads


def test_pipeline_sampling_options_reach_the_sampling_job(tmp_path, monkeypatch):
    from llama_posttrain.driver.pipeline_config import PipelineError, load_pipeline_config
    from llama_posttrain.driver.recipe import Recipe

    class Recording:
        def __init__(self):
            self.jobs = []

        def run(self, job):
            self.jobs.append(job.args)
            open(parse(SampleConfig, job.args).out_report, "w").write(json.dumps({"dropped": {}}))

    launchers = []

    def sampling_args(*overrides):
        cfg = load_pipeline_config(None, [f"root={tmp_path}", *overrides])
        launcher = Recording()
        recipe = Recipe(cfg, _arithmetic(cfg), CHAT, tmp_path / "run", launcher, {})
        d = tmp_path / "run" / "round_1" / f"rs{len(launchers)}"  # a folder per call: its own report
        d.mkdir(parents=True)
        launchers.append(launcher)
        recipe.sample(d, 1, "rs", 4, tmp_path / "policy", tmp_path / "rm", ("sft",), annotate=None)
        (args,) = launcher.jobs
        return args

    def given(args):  # the keys the command line gives (key=value), the others at the job's defaults
        return {a.split("=", 1)[0] for a in args if "=" in a}

    def job(*overrides):  # the config the job reads from its command line (the job's own parser)
        return parse(SampleConfig, sampling_args(*overrides))

    default = sampling_args()  # today's command: 64 prompts per call, eager
    assert job().batch_size == 64 and not job().compile
    assert not [key for key in given(default) if key.startswith("vllm")]
    mine = job("sample_batch_size=8", "sample_compile=true")
    assert mine.batch_size == 8 and mine.compile and mine.compile_mode is None  # its default
    graphs = job("sample_compile=true", "sample_compile_mode=reduce-overhead")
    assert graphs.compile and graphs.compile_mode == "reduce-overhead"
    vllm = job("engine=vllm", "vllm_gpu_memory_utilization=0.5", "vllm_max_model_len=1024")
    assert vllm.vllm_gpu_memory_utilization == 0.5 and vllm.vllm_max_model_len == 1024
    assert "batch_size" not in given(sampling_args("engine=vllm"))
    assert job("engine=vllm", "rounds=2").vllm_max_model_len is None  # 0: from the data
    for override, message in [
        ("sample_batch_size=0", "sample_batch_size: must be >= 1"),
        ("vllm_gpu_memory_utilization=1.5", r"vllm_gpu_memory_utilization: must be in \(0, 1\], got 1.5"),
        ("vllm_max_model_len=-1", "vllm_max_model_len: must be >= 0"),
    ]:
        with pytest.raises(PipelineError, match=message):
            load_pipeline_config(None, [override])
    with pytest.raises(PipelineError, match=r"sample_compile: the native engine's option \(engine: vllm\)"):
        load_pipeline_config(None, ["engine=vllm", "sample_compile=true"])
    with pytest.raises(
        PipelineError, match="sample_compile_mode: reduce-overhead is the mode of sample_compile, which"
    ):
        load_pipeline_config(None, ["sample_compile_mode=reduce-overhead"])
    with pytest.raises(PipelineError, match="sample_compile_mode"):
        load_pipeline_config(None, ["sample_compile=true", "sample_compile_mode=graphs"])


def test_sample_compile_mode_may_change_in_a_run_folder_sample_compile_may_not(tmp_path, capsys):
    """The compile mode changes no draw (the same compiled kernels, replayed by a CUDA graph or not): a run
    folder goes on with another (said, the record kept); sample_compile itself is a sampling key (REDO_KEYS)."""
    from llama_posttrain.driver.pipeline import Pipeline
    from llama_posttrain.driver.pipeline_config import PipelineError, load_pipeline_config

    def start(*overrides):
        Pipeline(load_pipeline_config(None, [f"root={tmp_path}", *overrides])).check_run_folder()

    start("sample_compile=true")
    record = (tmp_path / "quickstart" / "pipeline.yaml").read_text()
    start("sample_compile=true", "sample_compile_mode=reduce-overhead")
    assert (
        "sample_compile_mode changed (no stage's result depends on them); the record is kept" in capsys.readouterr().out
    )
    assert (tmp_path / "quickstart" / "pipeline.yaml").read_text() == record
    with pytest.raises(PipelineError, match=r"differing:\n  sample_compile: True there, False now"):
        start()


def _arithmetic(cfg):
    from llama_posttrain.driver.pipeline_config import task_from_config

    return task_from_config(cfg.task, cfg.task_args)


def test_a_run_folder_recorded_before_the_new_keys_continues_with_their_defaults(tmp_path):
    """A key the pipeline gained after a run folder was recorded reads as its default there (the behaviour
    before it): the folder continues; another value of it is refused as any change is."""
    import yaml

    from llama_posttrain.driver.pipeline import Pipeline
    from llama_posttrain.driver.pipeline_config import PipelineConfig, PipelineError, load_pipeline_config

    Pipeline(load_pipeline_config(None, [f"root={tmp_path}"])).check_run_folder()
    record = tmp_path / "quickstart" / "pipeline.yaml"
    new = ("sample_batch_size", "sample_compile", "vllm_gpu_memory_utilization", "vllm_max_model_len")
    old = {k: v for k, v in yaml.safe_load(record.read_text()).items() if k not in new}
    record.write_text(yaml.safe_dump(old, sort_keys=False))
    defaults = {f.name: f.default for f in dataclasses.fields(PipelineConfig) if f.name in new}
    assert defaults == {"sample_batch_size": 64, "sample_compile": False, "vllm_gpu_memory_utilization": 0.9,
                        "vllm_max_model_len": 0}  # fmt: skip
    Pipeline(load_pipeline_config(None, [f"root={tmp_path}"])).check_run_folder()
    with pytest.raises(PipelineError, match=r"differing:\n  sample_batch_size: 64 there, 8 now"):
        Pipeline(load_pipeline_config(None, [f"root={tmp_path}", "sample_batch_size=8"])).check_run_folder()


def test_pipeline_eval_batch_size_reaches_the_evaluation_job(tmp_path):
    from llama_posttrain.driver.pipeline_config import load_pipeline_config
    from llama_posttrain.driver.recipe import Recipe

    class Recording:
        def __init__(self):
            self.jobs = []

        def run(self, job):
            self.jobs.append(job.args)
            open(parse(EvalConfig, job.args).out, "w").write("{}")

    def evaluation_args(*overrides):
        cfg = load_pipeline_config(None, [f"root={tmp_path}", *overrides])
        launcher = Recording()
        recipe = Recipe(cfg, _arithmetic(cfg), CHAT, tmp_path / "run", launcher, {})
        recipe.data.mkdir(parents=True, exist_ok=True)
        (tmp_path / "run" / "prompts.jsonl").write_text("")  # a marker's paths are the run folder's
        marker = {"round": 0, "stage": "data", "files": {"eval_prompts": "prompts.jsonl"}}
        (recipe.data / "DONE").write_text(json.dumps(marker))
        d = tmp_path / "run" / "round_1" / f"sft{len(overrides)}"
        d.mkdir(parents=True)
        recipe.eval_job(d, tmp_path / "policy", "sft", None)
        (args,) = launcher.jobs
        return args

    assert not [a for a in evaluation_args() if a.startswith("batch_size=")]  # 0: all of a rank's prompts in one call
    mine = parse(EvalConfig, evaluation_args("eval_batch_size=16"))  # as the job reads its command line
    assert mine.batch_size == 16 and mine.prompts
