"""The tokenized data cache and the loaders' inputs: the cache never serves stale or damaged data, the loaders
expose the content fingerprints of the files they read, and bad inputs (a damaged manifest, a full
disk, a truncated .arrow, a file name with '[', a state.json pointing outside its folder, an empty
assistant turn, a bad `python -m llama_posttrain.train.prepare_data` run) are one clear error; the tokenizer processes
never outlive a killed parent."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_data_cache import HANG_AFTER_FIRST_WRITE

from llama_posttrain.data import cache as cache_module
from llama_posttrain.data import prepare as prepare_module
from llama_posttrain.data.cache import TokenizedData
from llama_posttrain.data.loader import build_loaders, load_examples
from llama_posttrain.data.prepare import prepare
from llama_posttrain.data.records import data_files
from llama_posttrain.data.rows import EncodeOptions
from llama_posttrain.data.schema import ValidationError
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer
from llama_posttrain.train.config import Config, load_config
from llama_posttrain.train.prepare_data import main as prepare_main

ROOT = Path(__file__).parent.parent
QUICK = ROOT / "experiments" / "quickstart"
CHAT = ChatFormat(load_tokenizer())  # byte-level: one token per byte
SFT = EncodeOptions("sft", 64)


def dialog(i, answer=None):
    answer = answer if answer is not None else "a" * (i % 11 + 1)
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}]}


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def examples_of(folder):
    data = TokenizedData(folder)
    return [data[i] for i in range(len(data))]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_folders(root):
    return sorted(p for p in Path(root).iterdir() if p.is_dir())  # temporaries (.tmp-*) included


# ----------------------------------------------------------------------------- A: stale or damaged caches


def test_an_edit_keeping_size_and_mtime_is_a_new_cache(tmp_path):
    """The file said "4", now "9": same size, modification time put back. The cache must hold 9."""
    data = write(tmp_path / "d.jsonl", [dialog(i, "4") for i in range(8)])
    first = prepare(data, SFT, CHAT, tmp_path / "c", 1, verbose=False)
    stat = data.stat()
    write(data, [dialog(i, "9") for i in range(8)])
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = prepare(data, SFT, CHAT, tmp_path / "c", 1, verbose=False)
    assert second != first
    got = examples_of(second)
    assert got == load_examples(data, "sft", CHAT, 64, verbose=False)[0]
    answers = {bytes(t.token for t in ex.targets if not t.is_format).decode() for ex in got}
    assert answers == {"9"}  # the byte tokenizer: the target text is the answer


def _appending_chunks(original, path, extra):
    """data.prepare's `chunks`, appending `extra` lines to `path` once the first chunk was read."""

    def wrapper(*args, **kw):
        for n, chunk in enumerate(original(*args, **kw)):
            yield chunk
            if n == 0:
                with open(path, "a") as f:
                    f.write("".join(json.dumps(x) + "\n" for x in extra))

    return wrapper


def test_a_file_appended_while_tokenized_fails_the_build_and_writes_nothing(tmp_path, monkeypatch):
    data = write(tmp_path / "d.jsonl", [dialog(i) for i in range(40)])
    monkeypatch.setattr(prepare_module, "CHUNK_RECORDS", 8)
    monkeypatch.setattr(prepare_module, "chunks", _appending_chunks(prepare_module.chunks, data, [dialog(99)] * 5))
    with pytest.raises(ValueError, match=rf"{re.escape(str(data))}: the file changed while it was read"):
        prepare(data, SFT, CHAT, tmp_path / "c", 1, verbose=False)
    assert cache_folders(tmp_path / "c") == []  # no cache, no temporary folder
    monkeypatch.undo()  # the file is complete now: built from its 45 records
    assert len(examples_of(prepare(data, SFT, CHAT, tmp_path / "c", 1, verbose=False))) == 45


def test_a_parquet_file_replaced_while_tokenized_fails_the_build(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([dialog(i) for i in range(40)]), data)
    pq.write_table(pa.Table.from_pylist([dialog(i, "z") for i in range(40)]), tmp_path / "new.parquet")
    original = prepare_module.chunks

    def replacing(*args, **kw):
        for n, chunk in enumerate(original(*args, **kw)):
            yield chunk
            if n == 0:
                os.replace(tmp_path / "new.parquet", data)  # pyarrow keeps reading the old one

    monkeypatch.setattr(prepare_module, "CHUNK_RECORDS", 8)
    monkeypatch.setattr(prepare_module, "chunks", replacing)
    with pytest.raises(ValueError, match=rf"{re.escape(str(data))}: the file changed while it was read"):
        prepare(data, EncodeOptions("sft", 64), CHAT, tmp_path / "c", 1, verbose=False)
    assert cache_folders(tmp_path / "c") == []


def _flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_same_size_corruption_is_refused_when_read(tmp_path):
    """One bit flipped in tokens.bin (size unchanged): the example holding it is refused, naming the
    folder, file and bytes; an undamaged copy reads as the in-memory path."""
    data = write(tmp_path / "d.jsonl", [dialog(i, "x" * 200) for i in range(400)])  # ~90k tokens: 6 blocks
    folder = prepare(data, EncodeOptions("sft", 256), CHAT, tmp_path / "c", 1, verbose=False)
    assert examples_of(folder) == load_examples(data, "sft", CHAT, 256, verbose=False)[0]
    good = tmp_path / "good"
    shutil.copytree(folder, good)
    cache = TokenizedData(good)
    tokens = good / "tokens.bin"
    target = len(cache) // 2  # flip a byte inside this example's tokens
    size = cache.dtypes["tokens"].itemsize  # 2: the byte tokenizer's ids as uint16
    offset = int(cache.offsets["token_end"][target]) * size + size
    _flip(tokens, offset)
    damaged = TokenizedData(good)  # opening checks sizes and the per-example arrays only
    block = offset // (1 << 16)
    assert block > int(cache.offsets["token_end"][1]) * size // (1 << 16)  # not example 0's block
    with pytest.raises(ValueError, match=rf"{re.escape(str(good))} is damaged: tokens\.bin bytes {block * 65536}\.\."):
        damaged[target]
    assert damaged[0] == examples_of(folder)[0]  # another block: read (checked) as usual
    with pytest.raises(ValueError, match=r"tokens\.bin bytes"):
        TokenizedData(good).verify()
    # the per-example arrays are checked whole at open
    shutil.rmtree(good)
    shutil.copytree(folder, good)
    _flip(good / "token_end.bin", 9)
    with pytest.raises(ValueError, match=rf"{re.escape(str(good))} is damaged: token_end\.bin bytes 0\.\."):
        TokenizedData(good)
    # the manifest and the checksums are checked at open
    shutil.rmtree(good)
    shutil.copytree(folder, good)
    manifest = json.loads((good / "manifest.json").read_text())
    manifest["report"]["examples"] += 1
    (good / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json does not match its own checksum"):
        TokenizedData(good)
    shutil.rmtree(good)
    shutil.copytree(folder, good)
    _flip(good / "checksums.bin", 0)
    with pytest.raises(ValueError, match=r"checksums\.bin does not match the sha256 in manifest\.json"):
        TokenizedData(good)


# ----------------------------------------------------------------------------- B: fingerprints


@pytest.mark.parametrize("cached", [True, False])
def test_loaders_expose_the_content_fingerprints_hashed_once(tmp_path, monkeypatch, cached):
    a, b = write(tmp_path / "a.jsonl", [dialog(i) for i in range(10)]), write(tmp_path / "b.jsonl", [dialog(3)] * 6)
    ev = write(tmp_path / "e.jsonl", [dialog(i) for i in range(5)])
    cfg = Config()
    cfg.data.train = [{"path": str(tmp_path / "a.jsonl")}, {"path": str(tmp_path / "[ab].jsonl")}]  # a glob
    cfg.data.eval, cfg.data.cache, cfg.data.cache_dir, cfg.data.num_workers = str(ev), cached, str(tmp_path / "c"), 1
    cfg.data.max_len, cfg.data.batch_size, cfg.data.tokens_per_microbatch = 64, 4, 128
    hashed = []
    from llama_posttrain.data import cache, records

    for module in (cache, records):  # count the files read whole for their hash
        if original := getattr(module, "sha256_file", None):
            monkeypatch.setattr(module, "sha256_file", lambda p, f=original: hashed.append(Path(p).name) or f(p))
    for start in ("first", "second"):
        hashed.clear()
        train, evaluation = build_loaders(cfg.data, "sft", CHAT, verbose=False)
        want = {str(p.resolve()): sha256(p) for p in (a, b)}
        assert train.fingerprints == want
        assert evaluation.fingerprints == {str(ev.resolve()): sha256(ev)}
        # each data file read once for its hash (a.jsonl twice: it is in the train list twice, via the glob)
        data_hashes = sorted(n for n in hashed if n.endswith(".jsonl"))
        assert data_hashes == (["a.jsonl", "a.jsonl", "b.jsonl", "e.jsonl"] if cached else []), start


# ----------------------------------------------------------------------------- C: clear errors


def test_a_manifest_missing_a_key_is_named(tmp_path):
    data = write(tmp_path / "d.jsonl", [dialog(i) for i in range(8)])
    folder = prepare(data, SFT, CHAT, tmp_path / "c", 1, verbose=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["arrays"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(folder))} is damaged or stale: manifest\.json lacks 'arrays'"
    ):
        TokenizedData(folder)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))} is damaged \(manifest\.json lacks 'arrays'\)"):
        prepare(data, SFT, CHAT, tmp_path / "c", 1, verbose=False)


def test_a_version_3_cache_is_refused_not_misread(tmp_path):
    """Version 3 stored token ids as int32; this code reads uint16 / uint32. A version 3 manifest
    (its own sha256 made to match) is refused, naming the version; the key hashes the version, so a
    real version 3 cache sits under another folder name, never found: the data is tokenized anew."""
    data = write(tmp_path / "d.jsonl", [dialog(i) for i in range(8)])
    folder = prepare(data, SFT, CHAT, tmp_path / "c", 1, verbose=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = 3
    manifest["manifest_sha256"] = cache_module.manifest_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(folder))} is damaged or stale: manifest\.json: version 3, this code reads version 4",
    ):
        TokenizedData(folder)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder))} is damaged \(manifest\.json: version 3, this"):
        prepare(data, SFT, CHAT, tmp_path / "c", 1, verbose=False)
    # a version 3 key names another folder
    assert cache_module.cache_key(data_files(data), SFT, CHAT)[1]["version"] == 4


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_names_the_cache_file_and_leaves_nothing(tmp_path, monkeypatch):
    """tokens.bin written to /dev/full: the kernel's own ENOSPC (Errno 28, no path)."""
    data = write(tmp_path / "d.jsonl", [dialog(i) for i in range(40)])
    init = prepare_module.Writer.__init__

    def onto_a_full_disk(self, *args):
        init(self, *args)
        self.files["tokens"].close()
        self.files["tokens"] = open("/dev/full", "wb")

    monkeypatch.setattr(prepare_module.Writer, "__init__", onto_a_full_disk)
    with pytest.raises(
        OSError, match=r"writing the tokenized cache .*/\.tmp-d\.jsonl-[^ ]*/tokens\.bin: the disk is full"
    ) as e:
        prepare(data, SFT, CHAT, tmp_path / "c", 1, verbose=False)
    assert e.value.errno == 28
    assert cache_folders(tmp_path / "c") == []


def test_a_truncated_arrow_file_is_named(tmp_path):
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    records = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(30)]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"), num_shards=2)
    second = sorted((tmp_path / "hf").glob("*.arrow"))[1]
    second.write_bytes(second.read_bytes()[:-100])
    message = rf"{re.escape(str(second))}: truncated or damaged Arrow file, unreadable after row \d+"
    with pytest.raises(ValueError, match=message):
        load_examples(tmp_path / "hf", "rm", CHAT, 128, verbose=False)
    with pytest.raises(ValueError, match=message):
        prepare(tmp_path / "hf", EncodeOptions("rm", 128), CHAT, tmp_path / "c", 1, verbose=False)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    (tmp_path / "d.parquet").write_bytes((tmp_path / "d.parquet").read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"d\.parquet: truncated or damaged Parquet file"):
        load_examples(tmp_path / "d.parquet", "rm", CHAT, 128, verbose=False)


def test_a_file_name_with_glob_characters_is_read_as_itself(tmp_path):
    data = write(tmp_path / "d[1].jsonl", [dialog(i) for i in range(6)])
    write(tmp_path / "d1.jsonl", [dialog(i) for i in range(3)])  # what the name matches as a glob
    want = load_examples(tmp_path / "d[1].jsonl", "sft", CHAT, 64, verbose=False)[0]
    assert len(want) == 6
    assert examples_of(prepare(data, SFT, CHAT, tmp_path / "c", 1, verbose=False)) == want
    assert len(load_examples(tmp_path / "d[0-9].jsonl", "sft", CHAT, 64, verbose=False)[0]) == 3  # still a glob


def test_a_state_json_naming_files_outside_its_folder_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(10)]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    state_path = tmp_path / "hf" / "state.json"
    state = json.loads(state_path.read_text())
    (arrow,) = (tmp_path / "hf").glob("*.arrow")
    shutil.copy(arrow, tmp_path / "outside.arrow")
    for name in ("../outside.arrow", str(tmp_path / "outside.arrow")):
        state["_data_files"] = [{"filename": name}]
        state_path.write_text(json.dumps(state))
        with pytest.raises(
            ValueError, match=rf"{re.escape(str(state_path))}: _data_files: names files outside its folder"
        ):
            load_examples(tmp_path / "hf", "rm", CHAT, 128, verbose=False)
    state_path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{re.escape(str(state_path))}: not a readable datasets state\.json"):
        load_examples(tmp_path / "hf", "rm", CHAT, 128, verbose=False)
    state_path.write_text(json.dumps({"_fingerprint": "x"}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(state_path))}: _data_files: missing"):
        load_examples(tmp_path / "hf", "rm", CHAT, 128, verbose=False)


def test_prepare_cli_prints_error_lines_and_the_load_report(tmp_path, capsys):
    base = ["--kind", "sft", "--config", str(QUICK / "sft.yaml"), f"data.cache_dir={tmp_path / 'c'}", "data.eval=null"]
    base.append("data.num_workers=1")
    bad = write(tmp_path / "bad.jsonl", [dialog(0), {"messages": "hi"}])
    for data, message in [
        (tmp_path / "missing.jsonl", f"error: data file not found: {tmp_path / 'missing.jsonl'}"),
        (bad, f"error: {bad}:2: messages: must be a non-empty list of messages"),
    ]:
        with pytest.raises(SystemExit) as e:
            prepare_main([*base, f"data.train={data}"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and "Traceback" not in err and len(err.strip().splitlines()) == 1
    good = write(tmp_path / "good.jsonl", [dialog(i) for i in range(7)])
    prepare_main([*base, f"data.train={good}"])
    printed = capsys.readouterr().out
    cfg = load_config(Config, str(QUICK / "sft.yaml"), [*base[4:], f"data.train={good}", "data.batch_size=2"])
    build_loaders(cfg.data, "sft", CHAT)  # the line training prints for the same cache
    report = capsys.readouterr().out.strip()
    assert report.startswith(f"{good}: records 7, examples 7 [") and report in printed.splitlines()
    folder = Path(report.rsplit(" [", 1)[1][:-1])
    prepare_main([*base, f"data.train={good}", "--verify"])  # every block checked, then the report
    verified, last = capsys.readouterr().out.splitlines()[-2:]
    assert re.fullmatch(rf"{re.escape(str(folder))}: every block verified in \d+\.\d s", verified) and last == report
    _flip(folder / "target_token.bin", 5)  # opening the cache does not read this one; --verify does
    with pytest.raises(SystemExit):
        prepare_main([*base, f"data.train={good}", "--verify"])
    assert capsys.readouterr().err.startswith(f"error: tokenized cache {folder} is damaged: target_token.bin bytes 0..")


def test_an_empty_assistant_turn_is_refused_or_counted(tmp_path, capsys):
    empty = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}
    empty["messages"] += [{"role": "user", "content": "b"}, {"role": "assistant", "content": "ok"}]
    p = write(tmp_path / "d.jsonl", [dialog(0), empty, dialog(2)])
    with pytest.raises(ValidationError, match=r"d\.jsonl:2: messages\[1\]\.content: empty assistant message"):
        load_examples(p, "sft", CHAT, 64, verbose=False)
    examples, report = load_examples(p, "sft", CHAT, 64, skip_invalid=True)
    assert len(examples) == 2 and report["skipped invalid: messages[1].content"] == 1
    assert "skipped invalid: messages[1].content 1" in capsys.readouterr().out
    response = [{"role": "assistant", "content": ""}, {"role": "user", "content": "more"}]
    response.append({"role": "assistant", "content": "fine"})
    p = write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": response, "rejected": "no"}])
    with pytest.raises(ValidationError, match=r"p\.jsonl:1: chosen\[0\]\.content: empty assistant message"):
        load_examples(p, "dpo", CHAT, 64, verbose=False)


def _descendants(pid):
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out = [pid]
    for p in out:
        out += [c for c, pp in parent.items() if pp == p]
    return out[1:]


def _running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tokenizer_workers_exit_when_the_building_process_is_killed(tmp_path):
    """kill -9 of a process building a cache with 2 workers: its workers, forkserver and resource
    tracker are gone within 5 s (they stayed for good: blocked on the pool's queues)."""
    data, flag = write(tmp_path / "d.jsonl", [dialog(i) for i in range(400)]), tmp_path / "written"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", HANG_AFTER_FIRST_WRITE, str(data), str(tmp_path / "c"), str(flag), "2", "16"]
    proc = subprocess.Popen(cmd, env=env)
    children = []
    try:
        deadline = time.time() + 60
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "the first chunk was never written"
        children = _descendants(proc.pid)
        assert len(children) >= 3  # a forkserver and its 2 workers (and a resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while any(map(_running, children)) and time.time() < deadline:
            time.sleep(0.1)
        assert [p for p in children if _running(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in children:  # left running by a failure: ours to end
            if _running(p):
                os.kill(p, signal.SIGKILL)
