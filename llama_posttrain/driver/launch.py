"""How the driver (llama_posttrain/driver/pipeline.py) starts the jobs that touch a model, waits for them and shows
their progress: training runs, sampling, evaluation, averaging. The driver itself holds no model.

    launcher: local      one node: `torchrun --standalone --nproc_per_node N` (the default; `torchrun` is the same);
                         a 1-rank job is torchrun's worker alone, `python -u` with the environment torchrun
                         gives it (processes.py single_rank_env: RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...), in
                         the command line, without torchrun's own start (seconds per job on a CPU)
    launcher: ray        a running Ray cluster (`ray start --head`, `ray start --address HEAD:6379` on the others;
                         `ray_address: auto` finds it): each distributed job is a placement group of `nnodes`
                         bundles on distinct nodes (STRICT_SPREAD), each running that node's `torchrun --nnodes N
                         --node_rank i` agent, the rendezvous on the first bundle's node; a single-process job
                         (averaging) is one task. Every node sees the repository, the Python environment, the
                         run folder and the driver's working directory at the same paths (a shared file system),
                         as under Slurm.
    launcher: slurm      inside an allocation (sbatch): the driver runs once; each distributed job is
                         `srun --nodes N --ntasks-per-node 1 torchrun ...` (one agent per node, c10d
                         rendezvous on the driver's host), each single-process job `srun -N1 -n1 python ...`.

A Job is a script, its arguments and its ranks per node (`nproc`, 0 = one plain process: averaging);
`Launcher.command(job)` is the command line a launcher runs, logged into the job's log first (after `cd`
to the folder it runs in, the driver's working directory, on every node) so it can be rerun by hand. Every
launcher gives its ranks the same settings (driver/processes.py `rank_env`: CPU threads from the job's ranks
over all its nodes), so a job on 1 node x 2 ranks and on 2 nodes x 1 rank computes alike. While a job runs, a line shows its name, done/total (llama_posttrain/train/progress.py) and an ETA.
SIGTERM / Ctrl-C / SIGHUP go to the job (`PipelineSignals`): the job saves and stops, then the driver stops.
A job dies with the driver: its process gets SIGTERM when the driver is gone, even by kill -9 (Linux
PR_SET_PDEATHSIG), so a training run saves and exits instead of going on as an orphan.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llama_posttrain.driver.processes import (  # noqa: F401 (Job, JobFailed, ATTEMPT, _process_tree: this module's face too)
    ATTEMPT,
    ROOT,
    Job,
    JobFailed,
    LocalProcess,
    _process_tree,
    _send,
    free_port,
    log_end,
    run_logged,
    single_rank_env,
    start_job,
)
from llama_posttrain.train import progress
from llama_posttrain.train.lifecycle import RESULT, read_result
from llama_posttrain.train.progress import clock

if TYPE_CHECKING:
    from llama_posttrain.driver.launch_ray import RayJobs

RDZV_PORT = 29400
KINDS = ("local", "torchrun", "ray", "slurm")


@dataclass
class Launcher:
    kind: str = "local"  # KINDS
    nnodes: int = 1  # nodes of each distributed job (ray, slurm)
    rdzv_endpoint: str | None = None  # slurm: host:port of the c10d rendezvous (default MASTER_ADDR, this host)
    address: str = "auto"  # ray: the cluster's address (ray.init), "auto": RAY_ADDRESS or the one started here
    signals: PipelineSignals = field(default_factory=lambda: PipelineSignals())
    _count: itertools.count = field(default_factory=itertools.count)
    _session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"launcher must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind in ("local", "torchrun") and self.nnodes > 1:
            raise ValueError(
                f"launcher: {self.kind} runs on one node; for nnodes > 1 use launcher: ray (a Ray cluster) or "
                "launcher: slurm (the torchrun leader/follower queue across nodes is retired)"
            )

    def endpoint(self) -> str:
        if self.rdzv_endpoint:
            return self.rdzv_endpoint
        if "MASTER_ADDR" in os.environ:
            return f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', RDZV_PORT)}"
        return f"{socket.gethostname()}:{RDZV_PORT}"  # slurm: the batch script, so the driver, is on the first node

    def command(self, job: Job, rdzv_id: str | None = None, node: int = 0, master: str | None = None) -> list[str]:
        """The command line that runs `job` with this launcher (ray: node `node`'s, `master` host:port the
        rendezvous on node 0)."""
        script = str(ROOT / job.script)
        if job.nproc == 0:
            cmd = [sys.executable, script, *job.args]
            return ["srun", "--nodes=1", "--ntasks=1", *cmd] if self.kind == "slurm" else cmd
        run = [sys.executable, "-m", "torch.distributed.run"]
        if self.kind in ("local", "torchrun") and job.nproc == 1:  # the worker alone: no agent to start
            env = [f"{k}={v}" for k, v in {**single_rank_env(free_port()), **job.env}.items()]  # its threads too
            return ["env", *env, sys.executable, "-u", script, *job.args]
        if self.kind in ("local", "torchrun"):
            return [*run, "--standalone", f"--nproc_per_node={job.nproc}", script, *job.args]
        if self.kind == "ray":  # static rendezvous: node i's ranks are i * nproc ... (i + 1) * nproc - 1
            host, _, port = (master or "MASTER:PORT").rpartition(":")
            static = [
                f"--nnodes={self.nnodes}",
                f"--node_rank={node}",
                f"--master_addr={host}",
                f"--master_port={port}",
                f"--nproc_per_node={job.nproc}",
            ]
            return [*run, *static, script, *job.args]
        rdzv = [
            f"--nnodes={self.nnodes}",
            f"--nproc_per_node={job.nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={self.endpoint()}",
            f"--rdzv_id={rdzv_id or self._session}",
        ]
        srun = ["srun", f"--nodes={self.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
        return [*srun, *run, *rdzv, script, *job.args]

    def waiting(self, job: Job) -> str | None:
        """What a job on several nodes waits for before its first progress report (ProgressLine says it at once
        and every WAIT_EVERY_S): its nodes meeting; None on one node."""
        if self.nnodes == 1 or job.nproc == 0:
            return None
        logs = f"{job.log}" if self.kind == "slurm" else f"{job.log} and {job.node_log(1).name} ... beside it"
        if self.kind == "slurm":
            meet = f"each node's torchrun agent (srun) to join the rendezvous at {self.endpoint()}"
        else:
            meet = f"Ray to place {self.nnodes} distinct nodes, then each node's torchrun agent to join node 0's"
        return f"{self.nnodes} nodes x {job.nproc} ranks: {meet}, then the model and data to load (output: {logs})"

    def run(self, job: Job) -> None:
        """Run the job to its end (all nodes), its output appended to its log, its progress shown. Raises
        JobFailed with the log's end, or PipelineInterrupted if a signal stopped it (forwarded to it first)."""
        rdzv_id = f"{self._session}-{next(self._count)}"
        progress_file = job.log.with_suffix(".progress.json")
        progress_file.unlink(missing_ok=True)
        if job.run_dir is not None:  # a training run's result is this attempt's, not a previous one's
            (Path(job.run_dir) / RESULT).unlink(missing_ok=True)
        env = {**job.env, progress.ENV: str(progress_file)}
        job.log.parent.mkdir(parents=True, exist_ok=True)
        watch = ProgressLine(job.name, progress_file, waiting=self.waiting(job))
        try:
            if self.kind == "ray":
                from llama_posttrain.driver.launch_ray import RayJobs  # Ray, an optional extra: only here

                rc, failure = RayJobs(self).run(job, env, watch)
            else:
                cmd = self.command(job, rdzv_id)
                env, t0 = {**os.environ, **env}, time.time()
                rc, failure = run_logged(cmd, env, job.log, self.signals.run, job.cwd, tick=watch), None
                log_end(job.log, rc, time.time() - t0)
        finally:
            watch()  # the job's last report
            watch.close()
        if self.signals.signum is not None:  # forwarded to it: it saved (or not) and stopped
            raise PipelineInterrupted(self.signals.signum, _saved(job, rc, self.signals.killed))
        if rc != 0:
            what, log, more = failure or (f"(exit code {rc})", job.log, "")
            raise JobFailed(
                f"{job.script} failed {what} for {job.name}; the end of its log {log}\n{_tail(log)}\n{more}"
                "Rerunning the pipeline resumes from the last finished stage."
            )


WAIT_EVERY_S = 30.0  # while a job on several nodes has reported no progress: how often that is said


class ProgressLine:
    """While a job runs: `name: 37/150 steps, 0:42, ETA 2:08`, redrawn in place on a terminal, else a
    line every 10% or 60 s (a log file stays readable). Before its first report, a job on several nodes
    (`waiting`: what it waits for) is said to wait, at once and every WAIT_EVERY_S."""

    def __init__(self, name: str, path: Path, stream=None, waiting: str | None = None):
        self.name, self.path, self.stream, self.waiting = name, path, stream or sys.stderr, waiting
        self.t0, self.shown, self.last_print, self.tty = time.time(), None, 0.0, self.stream.isatty()
        self.last_wait: float | None = None

    def line(self, p: dict) -> str:
        elapsed = time.time() - self.t0
        done, total = p["done"], max(p["total"], 1)
        eta = f", ETA {clock(elapsed / done * (total - done))}" if 0 < done < total else ""
        return f"{self.name}: {done}/{p['total']} {p['unit']}, {clock(elapsed)}{eta}"

    def __call__(self) -> None:
        p = progress.read(self.path)
        if p is None and self.waiting and (self.last_wait is None or time.time() - self.last_wait >= WAIT_EVERY_S):
            still = "still " if self.last_wait is not None else ""
            self.stream.write(f"{self.name}: {clock(time.time() - self.t0)}, {still}waiting for {self.waiting}\n")
            self.stream.flush()
            self.last_wait = time.time()
        if p is None or (self.shown and p["done"] == self.shown["done"]):
            return
        now, step = time.time(), max(1, p["total"] // 10)
        if self.tty:
            self.stream.write("\r\033[K" + self.line(p))
        elif self.shown is None or p["done"] // step > self.shown["done"] // step or now - self.last_print > 60:
            self.stream.write(self.line(p) + "\n")
            self.last_print = now
        else:
            return
        self.stream.flush()
        self.shown = p

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


class PipelineInterrupted(BaseException):
    """A signal stopped the pipeline: `main` prints one line and exits 128 + the signal. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` on the way holds it up. (A training process's own
    stop: llama_posttrain/train/lifecycle.py StopRequested.)"""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum, detail)
        self.signum, self.detail, self.where = signum, detail, ""

    def __str__(self) -> str:
        where = f" {self.where}" if self.where else ""  # "in [round 1] sft", "before the report"
        detail = f" ({self.detail})" if self.detail else ""
        return (
            f"{signal.Signals(self.signum).name}: stopped{where}{detail}; rerun the same command to resume "
            "(finished stages are skipped, an interrupted training run resumes from its checkpoints)"
        )


class PipelineSignals:
    """SIGTERM, SIGINT (Ctrl-C) and SIGHUP while the pipeline runs (`with` installs the handlers, in the
    main thread only; a SIGHUP ignored as under nohup stays ignored):
    - while a stage's torchrun runs (`run`), the signal is forwarded to it, once (SIGHUP as SIGTERM, which
      the training loop saves on); torchrun forwards it to its workers, which save their last finished step
      and exit. The pipeline waits for torchrun, then stops. A second signal kills torchrun and its workers
      at once, without waiting for the save (as a second Ctrl-C stops a training run without saving).
    - during the pipeline's own work (data, sampling, evaluation, averaging), it stops at once: the stage
      is left without its DONE marker, so a rerun does it again. Inside `deferred()` (a DONE marker being
      written) the signal waits for the next `check`.
    torchrun runs in a session of its own, so a Ctrl-C in the terminal reaches only the pipeline, and
    torchrun gets each signal once, from the pipeline."""

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.signum: int | None = None
        self.child: LocalProcess | RayJobs | None = None  # the running job
        self.killed = False  # a second signal killed the child
        self.deferring = 0
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.HANDLED:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self.previous[s] = signal.signal(s, self.handler)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def handler(self, signum, frame):
        first = self.signum is None
        self.signum = self.signum or signum
        if self.child is not None:
            if first:
                self.child.forward(signal.SIGTERM if signum == signal.SIGHUP else signum)
            else:
                self.killed = True
                self.child.kill()
            return
        if not self.deferring:
            raise PipelineInterrupted(self.signum)

    def check(self, where: str = "") -> None:
        """Stop here if a signal came while it could not stop the pipeline at once."""
        if self.signum is not None:
            e = PipelineInterrupted(self.signum)
            e.where = where
            raise e

    @contextmanager
    def deferred(self):
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1

    @contextmanager
    def forwarding(self, start):
        """While a job runs: signals go to start()'s result (LocalProcess, RayJobs), a signal that came while
        it started too."""
        with self.deferred():  # a signal now is forwarded once the child exists
            self.child = start()
        try:
            if self.signum is not None:
                self.child.forward(signal.SIGTERM if self.signum == signal.SIGHUP else self.signum)
            yield self.child
        finally:
            self.child = None

    def run(self, cmd: list[str], tick=None, **popen_kw) -> int:
        """Run cmd in a session of its own, signals forwarded to it -> its exit code. tick(): called while
        it runs (the progress line). It dies with this process (die_with_parent)."""
        with self.forwarding(lambda: LocalProcess(start_job(cmd, **popen_kw))) as child:
            while True:  # polled: the handlers run promptly whichever thread the signal interrupted
                try:
                    return child.popen.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    if tick is not None:
                        tick()


def _tail(path: Path, n: int = 30) -> str:
    """The last n lines of the latest attempt in a log, without torchrun's own traceback (ChildFailedError)
    that ends a failed run: the worker's error before it is what tells what went wrong."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    starts = [i for i, line in enumerate(lines) if line.startswith(ATTEMPT)]
    lines = lines[starts[-1] + 1 :] if starts else lines
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if tracebacks and any("ChildFailedError" in line for line in lines[tracebacks[-1] :]):
        lines = lines[: tracebacks[-1]]
    return "\n".join("  | " + line for line in lines[-n:]) or "  | (empty)"


def _saved(job: Job, rc: int, killed: bool) -> str:
    """What a job stopped by a signal left, from a training run's result file (its saved step,
    llama_posttrain/train/lifecycle.py write_result), removed before the job started."""
    if killed:
        return f"{job.script} killed by a second signal, without saving; its log: {job.log}"
    where = job.run_dir or job.name
    if rc == 0:
        return f"{job.script} finished {where}"
    try:
        result = read_result(job.run_dir) if job.run_dir is not None else None
    except ValueError as e:  # the stop is still reported: the file's problem named, not raised
        return f"{job.script} stopped (exit code {rc}), its saved step unknown: {e}; its log: {job.log}"
    if result is not None:
        return f"{job.script} saved step {result['saved_step']} in {where}"
    return f"{job.script} stopped before it saved a step (exit code {rc}); its log: {job.log}"
