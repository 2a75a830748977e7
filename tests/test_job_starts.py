"""What the driver saves of its jobs' starts (the quickstart's wall time, experiments/bench/quickstart_time.py):
the average of one model is a copy of it, no job; a 1-rank job on one node runs without torchrun, with the
environment torchrun gives its worker; each job's log starts with a command that reruns it and ends with its time."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import random_model
from test_recipe import files, recipe  # noqa: F401 (files: a fixture)

from llama_posttrain.driver import preflight
from llama_posttrain.driver.launch import ATTEMPT, Job, Launcher
from llama_posttrain.driver.processes import ENDED
from llama_posttrain.llama import Transformer, get_preset, load_model, save_model
from llama_posttrain.llama.tokenizer import load_tokenizer

# The variables torchrun --standalone --nproc_per_node=1 sets for its worker (torch 2.x, local_elastic_agent.py),
# but for its agent's own (TORCHELASTIC_*), with the values it gives them.
TORCHRUN_WORKER = {
    "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "ROLE_RANK": "0", "ROLE_NAME": "default",
    "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": "1",
    "MASTER_ADDR": "localhost", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}  # fmt: skip
KEYS = [*TORCHRUN_WORKER, "MASTER_PORT", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS"]
DUMP = "import json, os, sys\njson.dump({k: os.environ.get(k) for k in sys.argv[2:]}, open(sys.argv[1], 'w'))\n"


def test_an_average_of_one_model_is_a_copy_of_it_said_in_its_log_and_counted(tmp_path, files, capsys):  # noqa: F811
    r, launcher = recipe(tmp_path, files)
    assert preflight.check(r)[0] == []  # it plans the training runs without copying: the pipeline goes on to copy
    r.stage(0, "data", r.make_data)
    d = tmp_path / "run" / "round_1" / "rm"
    trained = d / "variant_0" / "model"  # a finished training run's export: the stage trains nothing more
    save_model(random_model(get_preset("debug")), trained, tokenizer=load_tokenizer(), chat_template="llama3")
    assert r.train("rm", d, {"model.checkpoint": str(tmp_path / "base")}, {}, None) == d / "model"
    assert launcher.jobs == []  # no training job, no averaging job
    from llama_posttrain.jobs.averaging import average_checkpoints  # the averaging job's own code: the peer

    peer = average_checkpoints([trained], tmp_path / "peer")
    ours, theirs, given = (load_model(p).state_dict() for p in (d / "model", peer, trained))
    assert ours.keys() == theirs.keys() == given.keys()
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], given[k]) for k in ours)
    assert sorted(p.name for p in (d / "model").iterdir()) == sorted(p.name for p in peer.iterdir())
    assert (d / "model" / "tokenizer.json").read_bytes() == (peer / "tokenizer.json").read_bytes()
    first, said, last = (d / "average.log").read_text().splitlines()
    assert first.startswith(ATTEMPT) and first.endswith(f" && cp -a -T {trained} {d / 'model'}")
    assert re.fullmatch(re.escape(ENDED) + r"[-\d :]+: exit code 0 after \d+\.\d\d s", last)
    assert "average.py not run" in said and f"averaging: {said}" in capsys.readouterr().out
    assert r.averages_copied == 1
    (d / "model" / "config.json").unlink()  # an interrupted copy's leftovers are replaced whole
    r.train("rm", d, {}, {}, None)
    assert r.averages_copied == 2 and load_model(d / "model").state_dict().keys() == ours.keys()


def _env_job(tmp_path, name: str) -> Job:
    script = tmp_path / "dump_env.py"
    script.write_text(DUMP)
    return Job(name, str(script), [str(tmp_path / f"{name}.json"), *KEYS], tmp_path / f"{name}.log", 1,
               {"OMP_NUM_THREADS": "2"})  # fmt: skip


def test_a_one_rank_job_runs_without_torchrun_with_the_environment_torchrun_gives_its_worker(tmp_path):
    job = _env_job(tmp_path, "one")
    Launcher("local").run(job)
    env = json.loads((tmp_path / "one.json").read_text())
    assert {k: env[k] for k in TORCHRUN_WORKER} == TORCHRUN_WORKER
    assert env["TORCHELASTIC_RUN_ID"] is None and env["OMP_NUM_THREADS"] == "2"  # the driver's rank_env
    assert 0 < int(env["MASTER_PORT"]) < 65536
    first, *_, last = job.log.read_text().splitlines()
    assert first.startswith(ATTEMPT) and "torch.distributed.run" not in first and f"{sys.executable} -u " in first
    assert re.fullmatch(re.escape(ENDED) + r"[-\d :]+: exit code 0 after \d+\.\d\d s", last)
    command = first.split(": ", 2)[2]  # "=== pipeline: <date> <time>: cd ... && env ... python -u ..."
    (tmp_path / "one.json").unlink()
    subprocess.run(command, shell=True, check=True)  # the log's first line reruns it by hand
    assert json.loads((tmp_path / "one.json").read_text()) == env


@pytest.mark.slow
@pytest.mark.long  # a torchrun start (seconds); in CI: the test above, against the variables written out
def test_a_one_rank_job_sees_what_a_torchrun_worker_sees(tmp_path):
    Launcher("local").run(_env_job(tmp_path, "plain"))
    script, out = tmp_path / "dump_env.py", tmp_path / "torchrun.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script), str(out)]
    subprocess.run([*cmd, *KEYS], check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    plain, torchrun = (json.loads(p.read_text()) for p in (tmp_path / "plain.json", out))
    assert torchrun["TORCHELASTIC_RUN_ID"] and plain["TORCHELASTIC_RUN_ID"] is None
    same = set(KEYS) - {"MASTER_PORT", "TORCHELASTIC_RUN_ID"}
    assert {k: plain[k] for k in same} == {k: torchrun[k] for k in same}


# What a sampling or evaluation process imports and builds before its first token: none of these (each costs a
# fresh process 0.5-1 s here). torch._dynamo came with nn.Embedding's normal_ on the meta device (a Python meta
# kernel that imports it), where load_model builds the model it loads weights into; the rest with the training
# modules' FSDP and torch.distributed.checkpoint imports, which the jobs import for the process group and the loop.
NOT_AT_A_JOB_START = ("torch._dynamo", "sympy", "torch.distributed.tensor", "torch.distributed.fsdp",
                      "torch.distributed.checkpoint")  # fmt: skip


def test_a_sampling_or_evaluation_process_loads_a_model_without_dynamo_fsdp_or_dcp(tmp_path):
    save_model(random_model(get_preset("debug")), tmp_path / "m", tokenizer=load_tokenizer(), chat_template="llama3")
    code = (
        "import json, sys\n"
        "import llama_posttrain.jobs.evaluation, llama_posttrain.jobs.sampling\n"
        "from llama_posttrain.llama import load_model\n"
        f"load_model({str(tmp_path / 'm')!r})\n"
        f"print(json.dumps([m for m in {NOT_AT_A_JOB_START!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == []


def test_a_model_built_on_the_meta_device_draws_nothing_and_has_every_parameter(config):
    """The meta model (load_model's, build_model's) skips the init's draws: the same names, shapes and dtypes as
    one built on the CPU, and the CPU generator where it was; a model built on the CPU draws as before (the
    quickstart's init: tests/test_model.py)."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with torch.device("meta"):
        meta = Transformer(config)
    assert torch.equal(torch.get_rng_state(), before)
    cpu = Transformer(config)
    assert not torch.equal(torch.get_rng_state(), before)
    shapes = {k: (v.shape, v.dtype) for k, v in cpu.state_dict().items()}
    assert {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()} == shapes
    assert all(p.is_meta for p in meta.parameters())
