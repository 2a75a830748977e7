"""Each config key's `--help` text lives in its field's metadata (llama_posttrain/train/config.py `opt`), so a
field the formatter wraps keeps it (issue 31 item 3: four pipeline keys' help was lost to a regex over comments)."""

import dataclasses

import pytest

from llama_posttrain.driver.pipeline_config import Cleaning, PipelineConfig
from llama_posttrain.train.config import describe
from llama_posttrain.train.dpo import DPOConfig
from llama_posttrain.train.rm import RMConfig
from llama_posttrain.train.sft import SFTConfig


def _sections(cls):
    return {f.name: f.default_factory() for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls", [RMConfig, SFTConfig, DPOConfig])
def test_every_training_key_has_its_help_in_the_field_and_help_prints_it(cls):
    shown = describe(cls).splitlines()
    for name, section in _sections(cls).items():
        for f in dataclasses.fields(section):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help"
            line = next(line for line in shown if line.startswith(f"  {name}.{f.name} = "))
            assert line.endswith(f"  # {f.metadata['help']}"), line


@pytest.mark.parametrize("cls", [PipelineConfig, Cleaning])
def test_every_pipeline_key_has_its_help_in_the_field_and_help_prints_it(cls):
    shown = describe(cls).splitlines()
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{f.name} has no help"
        assert f"  {f.name} = {_default(f)!r}  # {f.metadata['help']}" in shown, f.name


def test_the_keys_whose_help_the_formatter_wrapped_keep_it():
    pipeline, dpo = describe(PipelineConfig), describe(DPOConfig).splitlines()
    assert "  engine = 'native'  # sampling engine of llama_posttrain/jobs/sample.py" in pipeline
    assert "  annotator = 'auto'  # labels of new pairs; auto: verifier if the task has one, else rm" in pipeline
    assert "  sft_weights = {}  # {rejection_sampled: 1.0, human: 1.0}: SFT mixture weights" in pipeline
    assert any(line.startswith("  dpo.loss = ") and "  # " in line for line in dpo)  # wrapped before, too


def test_list_and_dict_defaults_are_not_shared_between_instances():
    a, b = PipelineConfig(), PipelineConfig()
    a.configs["rm"] = "mine.yaml"
    a.task_args["x"] = 1
    assert b.configs["rm"] == "experiments/quickstart/rm.yaml" and b.task_args == {}
    c = Cleaning()
    c.ban_phrase.append("x")
    assert Cleaning().ban_phrase == []


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_the_cleaning_mapping_is_read_once_into_the_rules():
    """`cleaning` (the pipeline's) -> Cleaning: its defaults written once, the human annotator's rules and the
    sampling job's flags both from it. A rule set to 0 (drop any emoji) is passed on, not read as false."""
    from llama_posttrain.data.clean import CleanRules

    c = Cleaning.of({"max_emoji": 0, "max_repeat": 0.3, "ban_phrase": ["a b", "c"], "dedup": True})
    assert c.rules() == CleanRules(max_repeat=0.3, repeat_ngram=3, ban_phrases=("a b", "c"), max_emoji=0)
    assert Cleaning.of({}).rules() == CleanRules()  # the sampling job gets the same values: SampleConfig fields
    with pytest.raises(ValueError, match=r"my.yaml: unknown key\(s\) max_emojis \(known: dedup, "):
        Cleaning.of({"max_emojis": 1}, "my.yaml")
