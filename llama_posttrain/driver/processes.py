"""A job's process on one node: what the launchers (launch.py, launch_ray.py) start, log, signal and kill.
Below both, so that neither imports the other for it."""

from __future__ import annotations

import ctypes
import functools
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: experiments/ and the job scripts, llama_posttrain/...
ATTEMPT = "=== pipeline: "  # starts each attempt's part of a stage's log
ENDED = "=== job ended "  # ends it (a local job's): "<time>: exit code <rc> after <seconds> s"


@dataclass
class Job:
    name: str  # what the progress line and errors call it: "[round 1] sft variant 0"
    script: str  # a path under ROOT, e.g. "llama_posttrain/train/sft.py"
    args: list[str]
    log: Path  # stdout and stderr, appended, each attempt opened by its command line
    nproc: int = 1  # ranks per node; 0: one plain process on one node (no process group)
    env: dict = field(default_factory=dict)  # on top of the environment of the process that starts it
    run_dir: Path | None = None  # a training run's folder (its saved step is named when a signal stops it)
    cwd: str = field(default_factory=os.getcwd)  # where its processes run, on every node: the driver's directory

    def node_log(self, node: int) -> Path:
        """Node 0's output goes to `log`, node i's (ray) to `<log stem>.node<i>.log` beside it."""
        return self.log if node == 0 else self.log.with_name(f"{self.log.stem}.node{node}{self.log.suffix}")


class JobFailed(RuntimeError):
    """A job exited with an error: the message names it, its exit code, its log and the log's end."""


def rank_env(ranks: int, cores: int | None = None) -> dict:
    """The settings every rank of a job gets, whatever the launcher: its CPU threads (OMP_NUM_THREADS,
    MKL_NUM_THREADS) are this node's cores / the job's ranks over all its nodes (ranks: nproc x nnodes, 1 for a
    plain process). A CPU reduction's order follows its thread count, so ranks laid out 1 node x 2 or 2 nodes x 1
    compute alike only with the same threads; hence all its ranks, not one node's. cores: default this machine's."""
    threads = str(max(1, (cores or os.cpu_count() or 1) // max(1, ranks)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def single_rank_env(port: int) -> dict:
    """The environment torchrun (`--standalone --nproc_per_node=1`) gives its only worker, but for its agent's
    own settings (TORCHELASTIC_*): the launchers start a 1-rank job on one node as that worker alone,
    `python -u` as torchrun starts it, which saves torchrun's start (its Python, torch's import, the
    rendezvous: seconds per job on a CPU). port: the process group's, a free one (torchrun --standalone's too)."""
    ranks = dict.fromkeys(("RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK"), "0")
    sizes = dict.fromkeys(("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE"), "1")
    where = {"MASTER_ADDR": "localhost", "MASTER_PORT": str(port), "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    return {**ranks, **sizes, "ROLE_NAME": "default", **where}


def free_port() -> int:
    """A TCP port on this host that nothing listens on now (the OS's pick, as torchrun --standalone's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(cmd: list[str], env: dict, log: Path, run, cwd: str, **kw) -> int:
    """cmd through run (PipelineSignals.run, or the Ray agent's loop) in the folder cwd, its output appended to log
    after a line with the attempt's time, folder and command line."""
    with open(log, "a") as f:
        f.write(f"{ATTEMPT}{time.strftime('%Y-%m-%d %H:%M:%S')}: cd {shlex.quote(cwd)} && {shlex.join(cmd)}\n")
        f.flush()
        return run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, **kw)


def log_end(log: Path, rc: int, seconds: float) -> None:
    """The line that ends an attempt's part of a log: when the job ended, its exit code and wall time (the
    quickstart's breakdown, experiments/bench/quickstart_time.py, reads it)."""
    with open(log, "a") as f:
        f.write(f"{ENDED}{time.strftime('%Y-%m-%d %H:%M:%S')}: exit code {rc} after {seconds:.2f} s\n")


def start_job(cmd: list[str], death_signal: int = signal.SIGTERM, **popen_kw) -> subprocess.Popen:
    """cmd in a session of its own (a Ctrl-C in the terminal reaches the driver only, which forwards it once),
    getting death_signal when the calling thread is gone (die_with_parent)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    die = functools.partial(die_with_parent, os.getpid(), prctl, death_signal)
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=die, **popen_kw)


def die_with_parent(parent: int, prctl, death_signal: int) -> None:
    """In a job's process, before exec (Popen's preexec_fn): death_signal when the thread that started it is
    gone (Linux PR_SET_PDEATHSIG), even killed by kill -9. SIGTERM for torchrun: it forwards it to its workers,
    which save their step and exit, as when a live driver forwards a signal. prctl: libc's, looked up before
    the fork (None: not Linux, the job outlives its driver)."""
    if prctl is not None:
        prctl(1, death_signal)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the prctl
            os.kill(os.getpid(), death_signal)


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc; elsewhere pid alone). torchrun starts each worker in a session
    of its own, so a process group does not reach them: they are found by parent."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # it ended meanwhile
        pass


@dataclass
class LocalProcess:
    """A job's process on this node, as PipelineSignals sends to it."""

    popen: subprocess.Popen

    def forward(self, signum: int) -> None:
        _send(self.popen.pid, signum)

    def kill(self) -> None:
        for pid in reversed(_process_tree(self.popen.pid)):  # the workers, then torchrun
            _send(pid, signal.SIGKILL)
