"""How a signal reaches every rank (llama_posttrain/train/lifecycle.py): `StopPoll` between micro-batches, on a CPU
group, one poll late, the same answer on every rank at the same poll; and `die_with_parent`: a
torchrun worker is signalled when torchrun dies, instead of running on as an orphan."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch.multiprocessing as mp

from llama_posttrain.train import lifecycle

POLLS = 8


def _polls(rank: int, port: int, signalled_at: int, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    poll, answers = lifecycle.StopPoll(), []
    for i in range(POLLS):
        if rank == 1 and i == signalled_at:
            lifecycle.StopSignal.received = signal.SIGTERM  # rank 1 alone gets the signal, before its poll i
        answers.append(poll.poll())
    poll.close()
    out.put((rank, answers))
    dist.barrier()
    dist.destroy_process_group()


def test_every_rank_sees_a_signal_at_the_same_poll_one_poll_late():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29700 + os.getpid() % 200
    procs = [ctx.Process(target=_polls, args=(r, port, 3, out)) for r in range(2)]
    for p in procs:
        p.start()
    answers = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # poll 3 starts the all-reduce that carries rank 1's flag; poll 4 reads it, on both ranks
    expected = [False] * 4 + [True] * (POLLS - 4)
    assert answers == {0: expected, 1: expected}


def test_one_rank_polls_its_own_flag_at_once(monkeypatch):
    monkeypatch.setattr(lifecycle.StopSignal, "received", None)
    poll = lifecycle.StopPoll()
    assert poll.poll() is False
    monkeypatch.setattr(lifecycle.StopSignal, "received", signal.SIGTERM)
    assert poll.poll() is True


def test_a_worker_whose_parent_dies_gets_sigterm(tmp_path):
    """A parent starts a child that asked for die_with_parent, then is killed with -9: the child
    (in a session of its own, as torchrun's workers are) receives SIGTERM and exits by it."""
    child = textwrap.dedent(f"""
        import signal, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from llama_posttrain.train.lifecycle import die_with_parent
        def on_term(signum, frame):
            open({str(tmp_path / "got")!r}, "w").write(signal.Signals(signum).name)
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        die_with_parent()
        open({str(tmp_path / "ready")!r}, "w").write("1")
        time.sleep(60)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {child!r}], start_new_session=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.time() + 30
    while time.time() < deadline and not (tmp_path / "ready").exists():
        time.sleep(0.05)
    assert (tmp_path / "ready").exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    while time.time() < deadline and not (tmp_path / "got").exists():
        time.sleep(0.05)
    assert (tmp_path / "got").read_text() == "SIGTERM"
