"""Who ranks a prompt's samples in rejection sampling (llama_posttrain/jobs/sample.py), and the preference pair the
ranking gives.

An annotator is a function (prompt record, its samples' texts) -> one score per sample, higher better:
`verifier_annotator` (a task's verifier, data/tasks: 1 right, 0 wrong) or `file_annotator` (labels
imported from a file, e.g. people's, joined on the prompt record's "id"); without one, the reward
model's scores rank the samples. An annotator may return None for a prompt it has no label for (a file
that labels only some sets): the caller counts it as unlabelled. `preference_pair` turns the scores into
best vs worst.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from llama_posttrain.data.records import read_records
from llama_posttrain.data.schema import ValidationError

MAX_NAMED = 10  # bad labels (file:line: field: problem) and unlabelled ids named in one message


def verifier_annotator(verify: Callable[[str, str], float]):
    """Scores from a verifier of (the prompt's last message's text, response): 1 / 0 for right / wrong."""
    return lambda record, texts: [float(verify(record["messages"][-1]["content"], t)) for t in texts]


def file_annotator(path, responses: int | None = None, sets=None):
    """Labels imported from a JSONL file of {"id": ..., "scores": [...]} (one finite number per response,
    higher better) or {"id": ..., "ranking": [best, ..., worst]} (a permutation of the response indices), one
    per line. Every bad label is named by its file:line and field, all in one ValidationError (the count and
    the first MAX_NAMED). `responses`: the number of responses every set has (rejection sampling's K),
    checked as the file is read; else when a set is annotated. `sets`: the JSONL file of the sets to label
    (the pipeline's to_label.jsonl, {"id", "responses"}): a label whose id names no set there (a typo, or
    another round's) is a bad label, and so is one for another number of responses. -> annotate(record,
    texts): the scores, or None where the file holds no label for the record's id (labelling may be partial:
    the caller counts the unlabelled sets); annotate.ids: the ids labelled; with `sets`, annotate.unlabelled:
    the ids of the sets without a label, in the file's order."""
    counts = None  # id -> number of responses, of the sets to label
    if sets is not None:
        counts = {}
        for _where, obj in read_records(sets):
            if isinstance(obj, ValidationError):
                raise obj
            counts[obj["id"]] = len(obj["responses"])
    labels, bad = {}, []  # id -> (scores, where); the messages of the bad labels
    for where, obj in read_records(path):
        try:
            if isinstance(obj, ValidationError):
                raise obj
            scores = _label_scores(obj, where)
            if obj["id"] in labels:  # the later one would replace the earlier, unseen
                first = labels[obj["id"]][1].rpartition(":")[2]
                raise ValidationError(
                    f"{where}: id: a second label for id {obj['id']!r} (the first is at line {first})"
                )
            if counts is not None and obj["id"] not in counts:
                raise ValidationError(f"{where}: id: {obj['id']!r} names no set of {sets} (a typo? another round's?)")
            if counts is not None or responses is not None:
                _check_count(scores, counts[obj["id"]] if counts is not None else responses, obj, where)
            labels[obj["id"]] = (scores, where)
        except ValidationError as e:
            bad.append(str(e))
    if len(bad) == 1:
        raise ValidationError(bad[0])
    if bad:
        more = f" (the first {MAX_NAMED})" if len(bad) > MAX_NAMED else ""
        raise ValidationError(f"{path}: {len(bad)} bad labels{more}:\n  " + "\n  ".join(bad[:MAX_NAMED]))

    def annotate(record, texts):
        if record.get("id") not in labels:
            return None
        scores, where = labels[record["id"]]
        _check_count(scores, len(texts), record, where)
        return scores

    annotate.ids = set(labels)  # the ids labelled: a caller names those that no prompt has
    if counts is not None:
        annotate.unlabelled = [i for i in counts if i not in labels]
    return annotate


def name_ids(ids: list) -> str:
    """ "(ids 'a', 'b', ... and 3 more)" for a message; "" for none."""
    if not ids:
        return ""
    more = f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else ""
    return f" (id{'s' * (len(ids) > 1)} {', '.join(map(repr, ids[:MAX_NAMED]))}{more})"


def _check_count(scores: list[float], n: int, record: dict, where: str) -> None:
    if len(scores) != n:
        raise ValidationError(
            f"{where}: scores: the label of prompt id {record['id']!r} scores {len(scores)} samples, there are {n}"
        )


def _label_scores(obj, where: str) -> list[float]:
    """One label's scores, higher better: its `scores`, or n - rank for each response of its `ranking`."""
    if not isinstance(obj, dict):
        raise ValidationError(f"{where}: record: a label is a JSON object, got {type(obj).__name__}")
    key = obj.get("id")
    if key is None or isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ValidationError(f"{where}: id: missing, or not a string or an integer (got {key!r})")
    if ("scores" in obj) == ("ranking" in obj):
        said = "both given (they could disagree)" if "scores" in obj else "missing"
        raise ValidationError(
            f"{where}: scores/ranking: {said}: give one, 'scores' (a number per response, higher better) or "
            "'ranking' (every response index once, best first)"
        )
    if "scores" in obj:
        scores = obj["scores"]
        if not isinstance(scores, list) or not scores:
            raise ValidationError(f"{where}: scores: must be a non-empty list of numbers, got {scores!r}")
        for i, v in enumerate(scores):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValidationError(f"{where}: scores[{i}]: must be a finite number, got {v!r}")
        return [float(v) for v in scores]
    ranking = obj["ranking"]
    if not isinstance(ranking, list) or not ranking:
        raise ValidationError(f"{where}: ranking: must be a non-empty list of response indices, got {ranking!r}")
    n, seen = len(ranking), {}
    for rank, j in enumerate(ranking):
        if isinstance(j, bool) or not isinstance(j, int):
            raise ValidationError(f"{where}: ranking[{rank}]: must be a response index (an integer), got {j!r}")
        if not 0 <= j < n:
            raise ValidationError(
                f"{where}: ranking[{rank}]: {j} is not a response index 0..{n - 1} (a ranking of {n} responses "
                "lists each index once, best first)"
            )
        if j in seen:
            raise ValidationError(
                f"{where}: ranking[{rank}]: response {j} is ranked twice (also at ranking[{seen[j]}]); a ranking "
                "lists each response once, best first"
            )
        seen[j] = rank
    scores = [0.0] * n
    for rank, j in enumerate(ranking):
        scores[j] = float(n - rank)
    return scores


def preference_pair(record: dict, texts: list[str], scores: list[float]) -> dict | None:
    """Best vs worst distinct sample by score; None if there is no strict preference."""
    order = sorted(range(len(texts)), key=lambda j: -scores[j])
    best, worst = order[0], order[-1]
    if scores[best] <= scores[worst] or texts[best].strip() == texts[worst].strip():
        return None
    out = {"prompt": record["messages"], "chosen": texts[best], "rejected": texts[worst]}
    out["scores"] = [scores[best], scores[worst]]
    return out
