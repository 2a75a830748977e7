"""The jobs' configs (llama_posttrain/jobs/configs.py): a flag, a key=value override and a --config file are
one setting, checked by the training configs' code; the driver's command line parses back to its config."""

from __future__ import annotations

import dataclasses

import pytest

from llama_posttrain.jobs.configs import AverageConfig, EvalConfig, SampleConfig, args_of, parse

BASE = ["--policy", "p", "--prompts", "x.jsonl"]
JOBS = {"sample.py": SampleConfig, "evaluate.py": EvalConfig, "average.py": AverageConfig}


def job_config(job):
    """The config a job the driver launches reads from its command line (driver/launch.py Job), by the job's own
    parser: what a stand-in launcher in the tests reads its inputs and outputs from."""
    (cls,) = [cls for script, cls in JOBS.items() if job.script.endswith("/" + script)]
    return parse(cls, job.args)


def test_a_flag_an_override_and_a_config_file_give_one_config(tmp_path):
    (tmp_path / "s.yaml").write_text("k: 4\nban_phrase: [As an AI]\ntask_args: {max_digits: 1}\n")
    from_file = parse(SampleConfig, [*BASE, "--config", str(tmp_path / "s.yaml"), "annotate=verifier:arithmetic"])
    from_flags = parse(SampleConfig, [*BASE, "--k", "4", "--ban-phrase", "As an AI", "--annotate",
                                      "verifier:arithmetic", "--task-args", '{"max_digits": 1}'])  # fmt: skip
    from_overrides = parse(SampleConfig, ["policy=p", "prompts=x.jsonl", "k=4", "ban_phrase=[As an AI]",
                                          "annotate=verifier:arithmetic", "task_args={max_digits: 1}"])  # fmt: skip
    expected = SampleConfig(policy="p", prompts="x.jsonl", k=4, ban_phrase=["As an AI"],
                            annotate="verifier:arithmetic", task_args={"max_digits": 1})  # fmt: skip
    assert from_file == from_flags == from_overrides == expected
    assert parse(SampleConfig, [*BASE, "k=3", "--k", "5"]).k == 5  # a flag after an override: the flag wins


@pytest.mark.parametrize(
    "argv, message",
    [
        (["k=0"], "override 'k=0': k: must be >= 1, got 0"),
        (["--k", "0"], "argument --k: must be >= 1, got 0"),
        (["top_p=1.5"], "override 'top_p=1.5': top_p: must be in (0, 1], got 1.5"),
        (["nope=1"], "unrecognized argument 'nope=1'"),
        (["engine=vllm", "compile=true"], "override 'compile=true': not an option of --engine vllm"),
    ],
)
def test_a_bad_value_names_where_it_came_from(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(SampleConfig, [*BASE, *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_config_file_value_names_the_file(tmp_path, capsys):
    (tmp_path / "e.yaml").write_text("model: m\nout: o.json\nnll: s.jsonl\nmax_len: 1\n")
    with pytest.raises(SystemExit):
        parse(EvalConfig, ["--config", str(tmp_path / "e.yaml")])
    assert f"{tmp_path / 'e.yaml'}: max_len: must be >= 2, got 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config",
    [
        SampleConfig(
            policy="/a b/p",
            prompts="x.jsonl",
            k=3,
            compile=True,
            compile_mode="reduce-overhead",
            ban_phrase=["x", "y z"],
            max_repeat=0.3,
            task_args={"n": [1, 2]},
            annotate="verifier:t",
        ),
        SampleConfig(policy="p", prompts="x", engine="vllm", vllm_max_model_len=1024, temperature=0.0),
        EvalConfig(model="m", out="o", prompts="p", rm="r", keep_samples=True, batch_size=16),
        EvalConfig(model="m", out="o", prompts="p", score_samples=["a.json", "b.json"]),
        AverageConfig(checkpoints=["a", "b"], out="o", weights=[0.25, 0.75], dtype="bfloat16"),
        # strings YAML would read as another value, a float YAML 1.1 reads as a string when written 1e-05
        SampleConfig(
            policy="null",
            prompts="3",
            tokenizer="yes",
            ban_phrase=["c, d", "#x", "k=v", " y"],
            temperature=1e-05,
            max_repeat=0.0,
            annotate="file:a: b.jsonl",
        ),
        EvalConfig(model="m=1", out="[o]", nll="{s}", task_args={"a": None}, verifier="t", prompts="p"),
    ],  # fmt: skip
)
def test_the_command_line_of_a_config_parses_back_to_it(config):
    """The driver passes a job's config as args_of(config), key=value overrides as the training jobs get theirs:
    the job reads the same config, and a field at its default is not written."""
    args = args_of(config)
    assert parse(type(config), args) == config
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(config)}  # fmt: skip
    changed = {name for name, default in defaults.items() if getattr(config, name) != default} - {"checkpoints"}
    assert sorted(a.split("=", 1)[0] for a in args if "=" in a) == sorted(changed)  # (checkpoints: positional)
    assert not [a for a in args if a.startswith("-")]  # a --flag each: the old spelling
