"""The tokenized cache (llama_posttrain/data/prepare.py, llama_posttrain/data/cache.py) against the in-memory path: the same examples
and micro-batches step for step, its key, a cache killed mid-write, mixtures, Parquet / Arrow inputs."""

import base64
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_posttrain.data.cache import TokenizedData
from llama_posttrain.data.loader import DataLoader, build_loaders, epoch_examples, load_examples
from llama_posttrain.data.prepare import prepare
from llama_posttrain.data.records import sha256_file, train_sources
from llama_posttrain.data.rows import EncodeOptions, collate
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
from llama_posttrain.train.config import Config, load_config
from llama_posttrain.train.dpo import DPOConfig
from llama_posttrain.train.prepare_data import main as prepare_main
from llama_posttrain.train.rm import RMConfig
from llama_posttrain.train.sft import SFTConfig

ROOT = Path(__file__).parent.parent
QUICK = ROOT / "experiments" / "quickstart"
CHAT = ChatFormat(load_tokenizer())  # byte-level: one token per byte


def sft_lines(n, start=0):
    return [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i % 11 + 1)}]}
        for i in range(start, start + n)
    ]


def write(path, lines):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# ----------------------------------------------------------------------------- today's in-memory path


def reference_pack(examples, max_len, tokens_per_microbatch, pad_id):
    """The loader's packing before the cache (first-fit over Example objects), kept here verbatim."""
    rows_per_batch = max(1, tokens_per_microbatch // max_len)
    batches, rows = [], []
    for ex in examples:
        row = next((r for r in rows if sum(map(len, r)) + len(ex) <= max_len), None)
        if row is None:
            if len(rows) == rows_per_batch:
                batches.append(collate(rows, pad_id))
                rows = []
            row = []
            rows.append(row)
        row.append(ex)
    if rows:
        batches.append(collate(rows, pad_id))
    return batches


def reference_step(examples, dc, epoch, step, rank, world, pad_id, shuffle=True):
    """The loader's step before the cache: its order, rank split, packing and counts."""
    idx = list(range(len(examples)))
    if shuffle:
        random.Random(dc.seed * 1_000_003 + epoch).shuffle(idx)
    ids = idx[step * dc.batch_size : (step + 1) * dc.batch_size]
    packed = [
        reference_pack([examples[i] for i in ids[r::world]], dc.max_len, dc.tokens_per_microbatch, pad_id)
        for r in range(world)
    ]
    mine = packed[rank] + [collate([[]], pad_id)] * (max(map(len, packed)) - len(packed[rank]))
    exs = [examples[i] for i in ids]
    counts = (
        sum(len(e.targets) for e in exs),
        sum(len(e.seqs) * (len(e.seqs) - 1) // 2 for e in exs),
        sum(t.seq == 0 for e in exs for t in e.targets),
    )
    return mine, counts


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for f in dataclasses.fields(x):
            assert torch.equal(getattr(x, f.name), getattr(y, f.name)), f.name


QUICKSTART = [  # (entry point, config, encoding options its main() passes, tokenizer processes)
    ("sft", "sft.yaml", {}, 1),
    ("sft", "sft.yaml", {"train_on_prompt": True}, 1),
    ("rm", "rm.yaml", {}, 2),  # 2 chunks in 2 processes: the RM shuffle is seeded by the record's index
    ("rm", "rm.yaml", {"one_row": False}, 1),
    ("dpo", "dpo.yaml", {}, 1),
]


@pytest.mark.parametrize("kind,config,encode_kw,workers", QUICKSTART)
def test_cached_micro_batches_equal_in_memory_path(tmp_path_factory, kind, config, encode_kw, workers, world=2):
    """Quickstart data: the cached loaders yield the micro-batches of the in-memory path, step for step
    over an epoch boundary (62 or 53 steps per epoch), on both ranks of 2, and the same eval steps.
    (One rank is what every 1-rank training test runs.)"""
    cache_dir = tmp_path_factory.getbasetemp() / "quickstart_cache"
    config_class = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig}[kind]
    cfg = load_config(config_class, str(QUICK / config), [f"data.cache_dir={cache_dir}", f"data.num_workers={workers}"])
    dc, pad = cfg.data, CHAT.tokenizer.pad_id
    kw = dict(max_len=dc.max_len, keep_strengths=dc.keep_strengths, verbose=False, **encode_kw)
    train = load_examples(ROOT / dc.train, kind, CHAT, seed=dc.seed, **kw)[0]
    evaluation = load_examples(ROOT / dc.eval, kind, CHAT, seed=dc.seed + 1, **kw)[0]
    dc.train, dc.eval = str(ROOT / dc.train), str(ROOT / dc.eval)
    for rank in range(world):
        loader, ev = build_loaders(dc, kind, CHAT, rank, world, verbose=False, **encode_kw)
        assert [loader.data[i] for i in range(len(train))] == train  # the same Example objects' fields
        it = iter(loader)
        for n in range(70):
            step = next(it)
            per_epoch = len(train) // dc.batch_size
            want, counts = reference_step(train, dc, n // per_epoch, n % per_epoch, rank, world, pad)
            assert_same_batches(step.micro_batches, want)
            assert (step.num_targets, step.num_pairs, step.num_chosen_targets) == counts
        for n, step in enumerate(ev.eval_steps()):
            want, _ = reference_step(evaluation, dc, 0, n, rank, world, pad, shuffle=False)
            assert_same_batches(step.micro_batches, want)


# ----------------------------------------------------------------------------- the key


def swapped_tokenizer(path):
    """The byte tokenizer with the ids of 'a' and 'b' swapped: same size, different encoding."""
    lines = DEFAULT_TOKENIZER.read_text().splitlines()
    a, b = (next(i for i, line in enumerate(lines) if line.split()[0] == t) for t in ("YQ==", "Yg=="))
    lines[a], lines[b] = f"YQ== {lines[b].split()[1]}", f"Yg== {lines[a].split()[1]}"
    path.write_text("\n".join(lines) + "\n")
    return load_tokenizer(path)


def test_changed_tokenizer_max_len_template_or_data_is_a_new_cache(tmp_path, capsys):
    data = write(tmp_path / "d.jsonl", sft_lines(20))
    opts = EncodeOptions("sft", max_len=64)
    first = prepare(data, opts, CHAT, tmp_path / "c", 1)
    assert "tokenizing" in capsys.readouterr().out
    assert prepare(data, opts, CHAT, tmp_path / "c", 1) == first
    assert "tokenizing" not in capsys.readouterr().out  # found: nothing re-tokenized

    def check(folder, chat, max_len):
        assert folder != first and "tokenizing" in capsys.readouterr().out
        want = load_examples(data, "sft", chat, max_len, verbose=False)[0]
        got = TokenizedData(folder)
        assert [got[i] for i in range(len(got))] == want

    short = EncodeOptions("sft", max_len=12)  # truncates every dialog
    check(prepare(data, short, CHAT, tmp_path / "c", 1), CHAT, 12)
    swapped = ChatFormat(swapped_tokenizer(tmp_path / "swapped.tiktoken"))
    assert (
        swapped.encode_dialog(sft_lines(1)[0]["messages"]).tokens
        != CHAT.encode_dialog(sft_lines(1)[0]["messages"]).tokens
    )
    check(prepare(data, opts, swapped, tmp_path / "c", 1), swapped, 64)
    dated = ChatFormat(CHAT.tokenizer, "llama3.1")
    check(prepare(data, opts, dated, tmp_path / "c", 1), dated, 64)
    write(data, sft_lines(20, start=1))  # new content
    check(prepare(data, opts, CHAT, tmp_path / "c", 1), CHAT, 64)


# argv: data, cache root, a flag file touched after the first write, tokenizer processes, records per chunk
# (0: prepare's own); the process then hangs, to be killed mid-build
HANG_AFTER_FIRST_WRITE = """
import sys, time
from llama_posttrain.data import prepare
from llama_posttrain.data.rows import EncodeOptions
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer

add = prepare.Writer.add
def add_then_hang(self, arrays):
    add(self, arrays)
    open(sys.argv[3], "w").close()
    time.sleep(120)
prepare.Writer.add = add_then_hang
prepare.CHUNK_RECORDS = int(sys.argv[5]) or prepare.CHUNK_RECORDS
prepare.prepare(sys.argv[1], EncodeOptions("sft", 64), ChatFormat(load_tokenizer()), sys.argv[2], int(sys.argv[4]))
"""


@pytest.mark.slow
def test_cache_killed_mid_write_is_never_read_and_is_rebuilt(tmp_path, capsys):
    data, root, flag = write(tmp_path / "d.jsonl", sft_lines(1500)), tmp_path / "c", tmp_path / "written"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", HANG_AFTER_FIRST_WRITE, str(data), str(root), str(flag), "1", "0"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 120
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert flag.exists(), "the writer never wrote its first chunk"
    (tmp,) = root.glob(".tmp-*")  # a first chunk on disk, no manifest, not under the cache's name
    assert (tmp / "tokens.bin").stat().st_size > 0 and not (tmp / "manifest.json").exists()
    assert not [p for p in root.iterdir() if not p.name.startswith(".")]
    folder = prepare(data, EncodeOptions("sft", 64), CHAT, root, 1)
    assert f"removed {tmp}" in capsys.readouterr().out and not tmp.exists()
    got = TokenizedData(folder)
    assert [got[i] for i in range(len(got))] == load_examples(data, "sft", CHAT, 64, verbose=False)[0]


def test_damaged_cache_is_refused_naming_the_folder(tmp_path):
    data, opts = write(tmp_path / "d.jsonl", sft_lines(20)), EncodeOptions("sft", 64)
    folder = prepare(data, opts, CHAT, tmp_path / "c", 1, verbose=False)
    tokens = folder / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-4])  # e.g. an interrupted copy of the cache folder
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))} is damaged or stale: tokens\.bin has"):
        TokenizedData(folder)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))} is damaged .*delete the folder"):
        prepare(data, opts, CHAT, tmp_path / "c", 1)


def test_prepare_cli_then_training_maps_the_same_cache(tmp_path, capsys):
    overrides = [f"data.cache_dir={tmp_path}", "data.num_workers=1", f"data.train={QUICK / 'data/sft_eval.jsonl'}"]
    overrides += [f"data.eval={QUICK / 'data/sft_eval.jsonl'}"]
    prepare_main(["--kind", "sft", "--config", str(QUICK / "sft.yaml"), *overrides])
    assert "tokenizing" in capsys.readouterr().out
    cfg = load_config(Config, str(QUICK / "sft.yaml"), overrides)
    build_loaders(cfg.data, "sft", CHAT)
    out = capsys.readouterr().out
    assert "tokenizing" not in out and str(tmp_path) in out


# ----------------------------------------------------------------------------- mixtures


def test_mixture_weights_are_examples_per_epoch(tmp_path):
    """Weight 2: every example of a twice per epoch; weight 0.5: half of b, a different half each
    epoch, the same for the same seed; resuming mid-epoch continues the same order."""
    cfg = Config()
    a, b = write(tmp_path / "a.jsonl", sft_lines(10)), write(tmp_path / "b.jsonl", sft_lines(20, start=10))
    cfg.data.train = [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}]
    cfg.data.max_len, cfg.data.batch_size, cfg.data.tokens_per_microbatch = 64, 10, 128
    cfg.data.cache_dir, cfg.data.num_workers = str(tmp_path / "c"), 1
    loader, _ = build_loaders(cfg.data, "sft", CHAT, verbose=False)
    assert loader.steps_per_epoch == 3  # (20 + 10) / 10

    def epochs(loader, n_steps):
        it = iter(loader)
        return [u for _ in range(n_steps) for mb in next(it).micro_batches for u in mb.group_uid.tolist()]

    seen = epochs(loader, 6)
    halves = []
    for e in range(2):
        count = {u: seen[e * 30 : (e + 1) * 30].count(u) for u in range(30)}
        assert all(count[u] == 2 for u in range(10))  # uids 0..9: a.jsonl
        halves.append({u for u in range(10, 30) if count[u]})
        assert len(halves[-1]) == 10 and all(count[u] == 1 for u in halves[-1])
    assert halves[0] != halves[1]
    again, _ = build_loaders(cfg.data, "sft", CHAT, verbose=False)
    first = epochs(again, 4)
    resumed, _ = build_loaders(cfg.data, "sft", CHAT, verbose=False)
    resumed.load_state_dict(again.state_dict())
    assert first + epochs(resumed, 2) == seen
    # weight 1 everywhere: the files end to end, each example once per epoch; uids over both files
    assert sorted(epoch_examples([(10, 1.0), (20, 1.0)], 0, 0)) == list(range(30))
    assert loader.data[12] == replace(load_examples(b, "sft", CHAT, 64, verbose=False)[0][2], uid=12)


@pytest.mark.parametrize(
    "value,message",
    [
        ([{"path": "a.jsonl", "weight": 0}], r"data\.train\[0\]\.weight: must be a positive number"),
        ([{"path": "a.jsonl", "weight": "2"}], r"data\.train\[0\]\.weight: must be a positive number"),
        ([{"path": "a.jsonl"}, {"file": "b.jsonl"}], r"data\.train\[1\]: unknown key\(s\) file"),
        ([], r"data\.train must be a data path or a non-empty list"),
        ("", r"data\.train is not set"),
    ],
)
def test_bad_mixture_names_the_entry(value, message):
    with pytest.raises(ValueError, match=message):
        train_sources(value)


def test_mixture_in_yaml_is_checked_by_the_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train:\n    - {path: a.jsonl, weight: 3}\n    - b.jsonl\n")
    assert load_config(Config, str(p)).data.train == [{"path": "a.jsonl", "weight": 3}, "b.jsonl"]
    assert train_sources(load_config(Config, str(p)).data.train) == [("a.jsonl", 3.0), ("b.jsonl", 1.0)]


# ----------------------------------------------------------------------------- Parquet and Arrow inputs


def test_parquet_shards_arrow_folders_and_globs_read_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": f"p{i}", "chosen": "yes" * (i % 5 + 1), "rejected": "no"} for i in range(30)]
    want = load_examples(write(tmp_path / "d.jsonl", records), "rm", CHAT, 128, verbose=False)[0]
    (tmp_path / "shards").mkdir()
    for k in range(3):  # the hub's layout: train-0000k-of-00003.parquet
        part = pa.Table.from_pylist(records[k * 10 : (k + 1) * 10])
        pq.write_table(part, tmp_path / "shards" / f"train-{k:05d}-of-00003.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"), num_shards=3)
    assert len(list((tmp_path / "hf").glob("*.arrow"))) > 1
    for path in (tmp_path / "shards", tmp_path / "shards" / "train-*.parquet", tmp_path / "hf"):
        assert load_examples(path, "rm", CHAT, 128, verbose=False)[0] == want, path
        got = TokenizedData(prepare(path, EncodeOptions("rm", 128), CHAT, tmp_path / "c", 1, verbose=False))
        assert [got[i] for i in range(len(got))] == want, path
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(IsADirectoryError, match=r"DatasetDict folder; give one split's folder: .*dd/train"):
        load_examples(tmp_path / "dd", "rm", CHAT, 128, verbose=False)


def test_loader_reads_only_its_own_examples(tmp_path):
    """Packing reads lengths; a rank materializes only its share of the step."""
    data = TokenizedData(
        prepare(write(tmp_path / "d.jsonl", sft_lines(64)), EncodeOptions("sft", 64), CHAT, tmp_path, 1)
    )
    read = []

    class Counting:
        lengths, num_targets, num_pairs = data.lengths, data.num_targets, data.num_pairs
        num_chosen_targets = data.num_chosen_targets

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            read.append(i)
            return data[i]

    loader = DataLoader(Counting(), 16, 64, 128, rank=1, world_size=4)
    step = next(iter(loader))
    assert sorted(read) == sorted(loader.order(0)[:16][1::4].tolist())
    assert sorted(u for mb in step.micro_batches for u in mb.group_uid.tolist()) == sorted(read)


def wide_tokenizer(path):
    """A tiktoken file of the 256 bytes and every byte pair: 65792 ranks, the special tokens (bos,
    headers, eot: in every example) after them, ids above 65535 as Llama 3's are."""
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)]
    lines = [f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate([bytes([b]) for b in range(256)] + pairs)]
    path.write_text("\n".join(lines) + "\n")
    return load_tokenizer(path)


def test_token_ids_are_stored_in_the_vocabulary_s_narrowest_dtype(tmp_path):
    """uint16 for the byte tokenizer's 512 ids (2 bytes per token on disk, not 4), uint32 for a
    vocabulary over 65536 ids; either way the examples are the in-memory path's, ids above 65535 intact."""
    data, opts = write(tmp_path / "d.jsonl", sft_lines(40)), EncodeOptions("sft", 64)
    for chat, dtype in ((CHAT, "uint16"), (ChatFormat(wide_tokenizer(tmp_path / "wide.tiktoken")), "uint32")):
        folder = prepare(data, opts, chat, tmp_path / "c", 1, verbose=False)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["arrays"]["tokens"][0] == manifest["arrays"]["target_token"][0] == dtype
        tokens = manifest["arrays"]["tokens"][1]
        assert (folder / "tokens.bin").stat().st_size == tokens * {"uint16": 2, "uint32": 4}[dtype]
        want = load_examples(data, "sft", chat, 64, verbose=False)[0]
        assert tokens == sum(len(e.tokens) for e in want)
        got = TokenizedData(folder)
        assert [got[i] for i in range(len(got))] == want
        top = max(t for e in want for t in e.tokens)
        assert top > 65535 if dtype == "uint32" else top < 512


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux /proc")
def test_a_pass_over_the_cache_maps_none_of_its_files(tmp_path):
    """The cache is read with pread: after every example was read, no page of its files is mapped
    into the process (a mapped page stays resident once touched: a pass would end with the whole
    cache in the process's resident set)."""
    data = write(tmp_path / "d.jsonl", sft_lines(200))
    folder = prepare(data, EncodeOptions("sft", 64), CHAT, tmp_path / "c", 1, verbose=False)
    got = TokenizedData(folder)
    assert [got[i] for i in range(len(got))] == load_examples(data, "sft", CHAT, 64, verbose=False)[0]
    got.verify()
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]
    assert mapped == []


def test_hashing_a_data_file_holds_one_small_buffer(tmp_path):
    """sha256_file reads into one 256 KiB buffer: the digest is hashlib's of the whole content, and the
    Python heap's peak while hashing a 3 MiB file stays under 1 MiB (reading 8 MiB blocks, it was
    over 8 MiB: each read a fresh block, the next allocated before the last was freed)."""
    path = tmp_path / "d.bin"
    path.write_bytes(random.Random(0).randbytes(3 << 20))
    tracemalloc.start()
    try:
        digest, peak = sha256_file(path), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert peak < 1 << 20


def test_building_a_cache_holds_a_piece_of_a_chunk(tmp_path):
    """A chunk of 1024 records (~160k tokens) is encoded and written FLUSH_TOKENS tokens at a time:
    the Python heap's peak during the whole build is about one piece's lists (~100 bytes a token:
    1.6 MiB for 16384 tokens), not the chunk's (its lists and arrays held to the end: over 8 MiB),
    and the cache holds the in-memory path's examples."""
    rng = random.Random(0)
    lines = [
        {"messages": [{"role": "user", "content": "q" * rng.randint(10, 60)}, {"role": "assistant", "content": "a" * rng.randint(40, 160)}]}
        for _ in range(1024)
    ]  # fmt: skip
    data, opts = write(tmp_path / "d.jsonl", lines), EncodeOptions("sft", 512)
    tracemalloc.start()
    try:
        folder, peak = prepare(data, opts, CHAT, tmp_path / "c", 1, verbose=False), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    want = load_examples(data, "sft", CHAT, 512, verbose=False)[0]
    tokens = sum(len(e.tokens) for e in want)
    assert tokens > 150_000  # one chunk, many pieces
    got = TokenizedData(folder)
    assert [got[i] for i in range(len(got))] == want
    assert peak < 5 << 19  # 2.5 MiB


def test_an_epoch_order_holds_8_bytes_per_example():
    """The loader's epoch order is random.Random(seed * 1_000_003 + epoch).shuffle of the example
    indices, written out here on a list, and its making holds under 10 bytes per example on the
    Python heap (an int64 array shuffled in place; the list it was made from held ~48)."""

    class Counts:  # what DataLoader reads of a dataset besides data[i]
        def __init__(self, n):
            self.lengths = self.num_targets = self.num_pairs = self.num_chosen_targets = np.ones(n, dtype=np.int32)

        def __len__(self):
            return len(self.lengths)

    n = 100_000
    loader = DataLoader(Counts(n), 32, 64, 64, seed=5)
    tracemalloc.start()
    try:
        order, peak = loader.order(1), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    want = list(range(n))
    random.Random(5 * 1_000_003 + 1).shuffle(want)
    assert order.dtype == np.int64 and order.tolist() == want
    assert peak < 10 * n


def test_collate_builds_the_tensors_torch_built(tmp_path):
    """collate (numpy arrays handed to torch) against the tensors written out with torch as it built
    them before: RM examples with several documents per row (one_row=false), SFT at a static shape;
    dtypes, shapes and values equal."""
    rm = [
        {"prompt": f"p{i}" * (i + 1), "chosen": "yes" * (i % 3 + 1), "rejected": "no" * (i % 2 + 1)} for i in range(6)
    ]
    rm_ex = load_examples(write(tmp_path / "r.jsonl", rm), "rm", CHAT, 128, verbose=False, one_row=False)[0]
    sft_ex = load_examples(write(tmp_path / "s.jsonl", sft_lines(5)), "sft", CHAT, 128, verbose=False)[0]
    for rows, pad_id, shape in (([rm_ex[:3], rm_ex[3:5], rm_ex[5:]], 7, None), ([sft_ex[:2], sft_ex[2:]], 0, (4, 96))):
        B, T = shape or (len(rows), -(-max(sum(map(len, r)) for r in rows) // 8) * 8)
        grids = {
            k: torch.full((B, T), v, dtype=torch.long) for k, v in (("tok", pad_id), ("pos", 0), ("doc", -1), ("br", 0))
        }
        flat = {k: [] for k in ("th", "tt", "ts", "tf", "ss", "sg", "sr", "gs", "gu")}
        for b, row in enumerate(rows):
            start, next_doc = 0, 0
            for ex in row:
                n, base, seq0 = len(ex), b * T + start, len(flat["ss"])
                grids["tok"][b, start : start + n] = torch.tensor(ex.tokens)
                grids["pos"][b, start : start + n] = torch.tensor(ex.positions)
                grids["br"][b, start : start + n] = torch.tensor(ex.branch)
                local = torch.tensor(ex.docs) if ex.docs is not None else torch.zeros(n, dtype=torch.long)
                grids["doc"][b, start : start + n] = next_doc + local
                next_doc += int(local.max()) + 1
                for t in ex.targets:
                    for k, v in zip(
                        ("th", "tt", "ts", "tf"), (base + t.hidden_index, t.token, seq0 + t.seq, t.is_format)
                    ):
                        flat[k].append(v)
                for q in ex.seqs:
                    for k, v in zip(("ss", "sg", "sr"), (base + q.score_index, len(flat["gs"]), q.rank)):
                        flat[k].append(v)
                flat["gs"].append(ex.strength)
                flat["gu"].append(ex.uid)
                start += n
        got = collate(rows, pad_id, shape=shape)
        want = [grids[k] for k in ("tok", "pos", "doc", "br")]
        want += [torch.tensor(flat[k], dtype=torch.bool if k == "tf" else torch.long) for k in flat]
        assert any(ex.docs is not None and max(ex.docs) > 0 for r in rows for ex in r) or shape
        assert len(dataclasses.fields(got)) == len(want)
        for f, w in zip(dataclasses.fields(got), want):
            a = getattr(got, f.name)
            assert a.dtype == w.dtype and a.shape == w.shape and torch.equal(a, w), f.name


def _rank_fails(rank, world, port, out):
    import torch.distributed as dist

    from llama_posttrain.data.prepare import on_rank0

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def fn():
        if rank == 0:
            raise ValueError("d.jsonl:3: messages: missing")
        return "never"

    try:
        on_rank0(fn, rank, world)
    except ValueError as e:
        Path(out, f"rank{rank}").write_text(str(e))
    dist.destroy_process_group()


@pytest.mark.slow
def test_rank0_error_reaches_every_rank(tmp_path):
    """Other ranks wait for rank 0 and fail with its error, instead of waiting forever."""
    port = 29500 + os.getpid() % 1000 + 7
    torch.multiprocessing.spawn(_rank_fails, args=(2, port, str(tmp_path)), nprocs=2)
    assert (tmp_path / "rank0").read_text() == "d.jsonl:3: messages: missing"
    assert (
        tmp_path / "rank1"
    ).read_text() == "rank 0 could not prepare the data: ValueError: d.jsonl:3: messages: missing"
