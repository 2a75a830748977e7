"""The one rule of a recorded config against a new start's (llama_posttrain/train/config.py config_changes): the
training run folder (run_folder.py, CHANGEABLE_ON_RESUME) and the pipeline's run folder (driver/pipeline.py,
HARMLESS, the stage configs' STAGE_SETS, the sampling keys of a redo) pass it their own changeable keys. Checked
against each caller's rule as it was written before there was one (written out here), on real configs."""

import dataclasses
import itertools

import yaml

from llama_posttrain.driver.pipeline_config import HARMLESS, SET_BY_PIPELINE, PipelineConfig
from llama_posttrain.driver.stages import REDO_KEYS, STAGE_SETS
from llama_posttrain.train.config import Config, changeable, config_changes, differences, to_dict
from llama_posttrain.train.run_folder import CHANGEABLE_ON_RESUME

QUICK = "experiments/quickstart"


def test_a_pattern_names_a_key_or_a_section_above_it():
    assert changeable("configs.rm", ["configs"]) and changeable("logging.progress", ["logging.*"])
    assert changeable("stage_configs.sft.train.run_dir", SET_BY_PIPELINE)
    assert not changeable("data.cache_dir", ["data.cache"]) and not changeable("sample_compile_mode", REDO_KEYS)
    assert not changeable("stage_configs.sft.train.steps", SET_BY_PIPELINE)


def pipeline_rule_before(saved, now, redo: bool):
    """driver/pipeline.py check_run_folder before config_changes: the stage configs without their STAGE_SETS keys
    (a section left empty dropped), a key refused unless its first part is HARMLESS (or a sampling key, for a
    redo); -> (the keys said to have changed, None when refused; {refused key: (saved, now)})."""

    def strip(config):
        stages = {}
        for kind, stage in config["stage_configs"].items():
            stage = {section: dict(keys) if isinstance(keys, dict) else keys for section, keys in stage.items()}
            for key in STAGE_SETS:
                section, _, name = key.partition(".")
                if isinstance(stage.get(section), dict):
                    stage[section].pop(name, None)
                    if not stage[section]:
                        del stage[section]
            stages[kind] = stage
        return {**config, "stage_configs": stages}

    strict = differences(strip(saved), strip(now))
    refused = [k for k in strict if k.split(".")[0] not in HARMLESS]
    if redo:
        refused = [k for k in refused if k.split(".")[0] not in REDO_KEYS]
    if refused:  # refused, listing these; nothing said of the rest
        return None, {k: strict[k] for k in refused}
    return list(differences(saved, now)), {}  # said to have changed, the record kept


def test_the_pipeline_record_rule_is_the_one_it_had():
    stage_configs = {kind: yaml.safe_load(open(f"{QUICK}/{kind}.yaml")) for kind in ("rm", "sft", "dpo")}
    saved = {**dataclasses.asdict(PipelineConfig()), "stage_configs": stage_configs}
    edits = {
        "harmless": lambda c: c.update(name="other", nnodes=3, configs={"rm": "x.yaml"}),
        "sampling": lambda c: c.update(k=3, cleaning={"dedup": False}),
        "result": lambda c: c.update(seed=1, rm={"train.steps": 5}),
        "run_dir": lambda c: c["stage_configs"]["sft"]["train"].update(run_dir="elsewhere"),
        "progress": lambda c: c["stage_configs"]["rm"].setdefault("logging", {}).update(progress=True),
        "lr": lambda c: c["stage_configs"]["dpo"]["optim"].update(lr=1.0),
        "no train": lambda c: c["stage_configs"]["sft"].pop("train"),
        "only run_dir": lambda c: c["stage_configs"]["sft"].update(train={"run_dir": "x"}),
    }
    for n in (1, 2):
        for names in itertools.combinations(edits, n):
            now = yaml.safe_load(yaml.safe_dump(saved))  # a deep copy
            for name in names:
                edits[name](now)
            for redo in (False, True):
                ok, refused = config_changes(saved, now, (*HARMLESS, *SET_BY_PIPELINE, *(REDO_KEYS if redo else ())))
                said, refused_before = pipeline_rule_before(saved, now, redo)
                assert (None if refused else list(ok)) == said, (names, redo)
                # the same keys refused; where a stage config's section was left with only STAGE_SETS keys, its keys
                # one by one (the rule before named the section)
                assert all(any(k == r or k.startswith(r + ".") for r in refused_before) for k in refused)
                assert all(any(k == r or k.startswith(r + ".") for k in refused) for r in refused_before)
                assert {k: v for k, v in refused.items() if k in refused_before} == {
                    k: v for k, v in refused_before.items() if k in refused
                }


def test_the_training_record_rule_is_the_one_it_had():
    """train/run_folder.py before config_changes: a key refused unless it fnmatches CHANGEABLE_ON_RESUME; a key the
    record lacks reads as its default; without a checkpoint, train.steps refused too."""
    import fnmatch

    defaults = to_dict(Config())
    saved = to_dict(Config())
    del saved["logging"], saved["train"]["keep_last"]  # a record of an older version, without keys added since
    now = to_dict(Config())
    now["train"].update(steps=9, keep_last=4, seed=3)
    now["logging"]["log_every"] = 2
    now["data"].update(cache_dir="c", max_len=7)
    filled = {**saved, "logging": defaults["logging"], "train": {**saved["train"], "keep_last": 2}}
    assert filled["train"]["keep_last"] == defaults["train"]["keep_last"] == 2
    changed = differences(filled, now)
    for resumable in (True, False):
        keys = CHANGEABLE_ON_RESUME if resumable else tuple(k for k in CHANGEABLE_ON_RESUME if k != "train.steps")
        ok, refused = config_changes(saved, now, keys, defaults)
        before = {k for k in changed if any(fnmatch.fnmatch(k, p) for p in CHANGEABLE_ON_RESUME)}
        if not resumable:
            before.discard("train.steps")
        assert set(ok) == before and set(refused) == set(changed) - before
        assert {**ok, **refused} == changed
        assert "train.seed" in refused and "data.max_len" in refused and "logging.log_every" in ok
