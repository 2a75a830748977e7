"""Data as TRL users have it (issue 20): a text `prompt` column beside whole conversations
(ultrafeedback_binarized's shape) with a system turn or earlier turns, and null fields in Parquet /
datasets files. References: trl's own `maybe_extract_prompt` on the same records, and the records as
datasets / pyarrow read them (every row has every column: null where a record has no such key)."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trl import maybe_extract_prompt

from llama_posttrain.data.loader import load_examples
from llama_posttrain.data.records import read_records
from llama_posttrain.data.schema import ValidationError, parse_preference, parse_sft
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer

CHAT = ChatFormat(load_tokenizer())  # the byte tokenizer


def conv(*turns):
    """("user", "hi"), ("assistant", "a") ... -> messages"""
    return [{"role": r, "content": c} for r, c in turns]


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ultrafeedback(prompt: str, shared: list, good: str, bad: str, **extra) -> dict:
    return {
        "prompt": prompt,
        "chosen": conv(*shared, ("assistant", good)),
        "rejected": conv(*shared, ("assistant", bad)),
        "score_chosen": 8.0,
        "score_rejected": 3.0,
        **extra,
    }


SYSTEM = ("system", "You are terse.")
RECORDS = [  # the prompt column is the last user message; the shared messages are the prompt the model sees
    ultrafeedback("What is 2+2?", [("user", "What is 2+2?")], "4", "5"),
    ultrafeedback("What is 2+2?", [SYSTEM, ("user", "What is 2+2?")], "4", "22"),
    ultrafeedback("And 3+3?", [("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?")], "6", "7"),
    ultrafeedback("Why?\n", [SYSTEM, ("user", "Pick a color"), ("assistant", "Blue"), ("user", "Why?")], "Calm.", "."),
]


def test_a_text_prompt_beside_whole_conversations_is_their_last_user_message(tmp_path):
    """Accepted as TRL takes it: the prompt is the shared messages, system turn and earlier turns included
    (trl's maybe_extract_prompt on the same record gives the same prompt and responses)."""
    for i, record in enumerate(RECORDS):
        ours = parse_preference(record, f"r{i}")
        theirs = maybe_extract_prompt(record)
        assert ours.prompt == theirs["prompt"], i
        assert ours.responses == [theirs["chosen"], theirs["rejected"]], i
    examples, report = load_examples(jsonl(tmp_path / "uf.jsonl", RECORDS), "dpo", CHAT, max_len=512, verbose=False)
    assert len(examples) == len(RECORDS), report


def test_a_prompt_column_that_disagrees_is_a_file_line_error_saying_to_drop_it(tmp_path):
    """A text prompt that is not the last user message (here the first one), or messages that are not the
    shared prefix: `file:line: prompt: ...`, saying to drop the column or make it equal."""
    first_user = {**RECORDS[2], "prompt": "What is 2+2?"}
    messages = {**RECORDS[1], "prompt": conv(("user", "What is 2+2?"))}  # without the system turn
    cases = [
        (first_user, r"differs from the last user message of the prompt that chosen and rejected share "
                     r"\('And 3\+3\?'\)"),
        (messages, r"differs from the prompt messages that chosen and rejected share"),
    ]  # fmt: skip
    for record, problem in cases:
        path = jsonl(tmp_path / "uf.jsonl", [RECORDS[0], record])
        with pytest.raises(ValidationError, match=rf"uf\.jsonl:2: prompt: {problem}") as e:
            load_examples(path, "dpo", CHAT, max_len=512, verbose=False)
        assert "drop the 'prompt' column (the messages that chosen and rejected share are the prompt)" in str(e.value)
        _, report = load_examples(path, "dpo", CHAT, max_len=512, skip_invalid=True, verbose=False)
        assert report["skipped invalid: prompt"] == 1


# ----------------------------------------------------------------------------- null fields

MESSAGE = {"role": datasets.Value("string"), "content": datasets.Value("string")}
TOOL_CALLS = [{"type": datasets.Value("string"), "function": {"name": datasets.Value("string")}}]
SFT = [  # TRL's conversational SFT records beside plain text ones; messages with a (null) tool_calls field
    {"messages": conv(("user", "Hi"), ("assistant", "Hello."))},
    {"text": "Plain text to learn."},
    {"messages": conv(SYSTEM, ("user", "2+2?"), ("assistant", "4"))},
]
SFT_FEATURES = datasets.Features(
    {"messages": [{**MESSAGE, "tool_calls": TOOL_CALLS}], "text": datasets.Value("string")}
)
OURS = [  # our preference records: optional edited / strength, chosen/rejected or responses
    {"prompt": "p1", "chosen": "good", "rejected": "bad", "strength": "better"},
    {"prompt": "p2", "responses": ["best", "mid", "worst"]},
    {"prompt": "p3", "chosen": "ok", "rejected": "no", "edited": "great"},
]
TRL = [  # TRL's implicit prompt, UltraFeedback's prompt and scores in some rows only
    RECORDS[1],
    {"chosen": RECORDS[2]["chosen"], "rejected": RECORDS[2]["rejected"]},
    {**RECORDS[3], "score_chosen": 1, "score_rejected": 9},
]


def as_files(tmp_path, name: str, records: list, features=None) -> dict:
    """The records as JSONL (keys left out) and that file as datasets loads and writes it: Parquet and a
    save_to_disk folder."""
    path = jsonl(tmp_path / f"{name}.jsonl", records)
    ds = datasets.load_dataset(
        "json", data_files=str(path), features=features, split="train", cache_dir=str(tmp_path / "cache")
    )
    ds.to_parquet(str(tmp_path / f"{name}.parquet"))
    ds.save_to_disk(str(tmp_path / f"{name}_hf"))
    return {"jsonl": path, "parquet": tmp_path / f"{name}.parquet", "datasets": tmp_path / f"{name}_hf"}


@pytest.mark.parametrize("kind", ["sft", "ours", "trl"])
def test_null_fields_in_parquet_and_datasets_files_are_absent(tmp_path, kind):
    """Every optional field (SFT messages / text and a message's tool_calls; prompt, responses, chosen and
    rejected, edited, strength, the scores) null in some rows: read as absent, so each file gives the
    records and the examples of the JSONL file that leaves those keys out."""
    records, features = {"sft": (SFT, SFT_FEATURES), "ours": (OURS, None), "trl": (TRL, None)}[kind]
    files = as_files(tmp_path, kind, records, features)
    table = pq.read_table(files["parquet"])  # the reference: nulls where the JSON records have no key
    assert table.num_rows == len(records) and sum(table.column(c).null_count for c in table.column_names) >= 2
    if kind == "sft":
        assert table.column("messages").to_pylist()[0][0]["tool_calls"] is None
    parse = parse_sft if kind == "sft" else parse_preference
    loader_kind = "sft" if kind == "sft" else "dpo"
    expected = [parse(r, "ref") for r in records]
    reference, _ = load_examples(files["jsonl"], loader_kind, CHAT, max_len=512, verbose=False)
    for fmt in ("parquet", "datasets"):
        assert [parse(obj, where) for where, obj in read_records(files[fmt])] == expected, fmt
        examples, report = load_examples(files[fmt], loader_kind, CHAT, max_len=512, verbose=False)
        assert [(e.tokens, e.targets) for e in examples] == [(e.tokens, e.targets) for e in reference], (fmt, report)


def test_a_null_required_field_is_missing_naming_file_row_and_field(tmp_path):
    """A null where a value is required (rejected, an SFT record's messages and text, a message's content):
    `file:row: field: ...`, as for the JSON record without it."""
    cases = [
        ("dpo", [OURS[0], {"prompt": "p", "chosen": "a", "rejected": None}], r"pref\.parquet:2: rejected: missing"),
        ("sft", [SFT[0], {"messages": None, "text": None}], r"sft\.parquet:2: messages: missing"),
        (
            "sft",
            [SFT[0], {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]}],
            r"sft\.parquet:2: messages\[1\]\.content: must be a string",
        ),
    ]
    for kind, records, message in cases:
        path = tmp_path / ("pref.parquet" if kind == "dpo" else "sft.parquet")
        pq.write_table(pa.Table.from_pylist(records), path)
        with pytest.raises(ValidationError, match=message):
            load_examples(path, kind, CHAT, max_len=512, verbose=False)
