"""Who ranks a prompt's samples in rejection sampling (llama_posttrain/train/sample.py), and the preference pair the
ranking gives.

An annotator is a function (prompt record, its samples' texts) -> one score per sample, higher better:
`verifier_annotator` (a task's verifier, data/tasks: 1 right, 0 wrong) or `file_annotator` (labels
imported from a file, e.g. people's, joined on the prompt record's "id"); without one, the reward
model's scores rank the samples. `preference_pair` turns the scores into best vs worst.
"""

from __future__ import annotations

from collections.abc import Callable

from llama_posttrain.data.records import read_records
from llama_posttrain.data.schema import ValidationError


def verifier_annotator(verify: Callable[[str, str], float]):
    """Scores from a verifier of (the prompt's last message's text, response): 1 / 0 for right / wrong."""
    return lambda record, texts: [float(verify(record["messages"][-1]["content"], t)) for t in texts]


def file_annotator(path):
    """Labels imported from a JSONL file of {"id": ..., "scores": [...]} or {"id": ..., "ranking": [best, ...]}."""
    labels, lines = {}, {}
    for where, obj in read_records(path):
        if isinstance(obj, ValidationError):
            raise obj
        if "id" not in obj or not ("scores" in obj or "ranking" in obj):
            raise ValidationError(f"{where}: id/scores: a label needs an 'id' and 'scores' or 'ranking'")
        if "ranking" in obj:
            n = len(obj["ranking"])
            scores = [0.0] * n
            for rank, j in enumerate(obj["ranking"]):
                scores[j] = float(n - rank)
            obj = {**obj, "scores": scores}
        if obj["id"] in labels:  # the later one would replace the earlier, unseen
            raise ValidationError(
                f"{where}: id: a second label for id {obj['id']!r} (the first is at line {lines[obj['id']]})"
            )
        labels[obj["id"]], lines[obj["id"]] = obj["scores"], where.rpartition(":")[2]

    def annotate(record, texts):
        if record.get("id") not in labels:
            raise KeyError(f"{path}: no label for prompt id {record.get('id')!r}")
        if len(labels[record["id"]]) != len(texts):
            raise ValueError(
                f"{path}: the label of prompt id {record['id']!r} scores {len(labels[record['id']])} samples, "
                f"there are {len(texts)}"
            )
        return labels[record["id"]]

    return annotate


def preference_pair(record: dict, texts: list[str], scores: list[float]) -> dict | None:
    """Best vs worst distinct sample by score; None if there is no strict preference."""
    order = sorted(range(len(texts)), key=lambda j: -scores[j])
    best, worst = order[0], order[-1]
    if scores[best] <= scores[worst] or texts[best].strip() == texts[worst].strip():
        return None
    out = {"prompt": record["messages"], "chosen": texts[best], "rejected": texts[worst]}
    out["scores"] = [scores[best], scores[worst]]
    return out
