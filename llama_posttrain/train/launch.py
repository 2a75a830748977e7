"""How the driver (llama_posttrain/train/pipeline.py) starts the jobs that touch a model, waits for them and shows
their progress: training runs, sampling, evaluation, averaging. The driver itself holds no model.

    launcher: local      one node: `torchrun --standalone --nproc_per_node N` (the default)
    launcher: torchrun   several nodes: a torchrun agent per node, c10d rendezvous at `rdzv_endpoint`
                         (host:port, or MASTER_ADDR:MASTER_PORT). Start the same pipeline command on
                         every node with its `node_rank` (or NODE_RANK / GROUP_RANK in the environment):
                         node 0 leads (plans, writes the data, reports); the others follow, starting
                         their agent of each distributed job the leader queues in <run>/jobs/.
    launcher: slurm      inside an allocation (sbatch): the driver runs once; each distributed job is
                         `srun --nodes N --ntasks-per-node 1 torchrun ...` (one agent per node, c10d
                         rendezvous on the driver's host), each single-process job `srun -N1 -n1 python ...`.

A Job is a script, its arguments and its ranks per node (`nproc`, 0 = one plain process: averaging);
`Launcher.command(job)` is the command line a launcher runs, logged into the job's log first so it can
be rerun by hand. While a job runs, a line shows its name, done/total (llama_posttrain/train/progress.py) and an ETA.
SIGTERM / Ctrl-C / SIGHUP go to the job (`Signals`): the job saves and stops, then the driver stops.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
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

from llama_posttrain.data.io import write_json
from llama_posttrain.train import progress

ROOT = Path(__file__).resolve().parents[2]  # the repository: experiments/ and the job scripts, llama_posttrain/...
RDZV_PORT = 29400


@dataclass
class Job:
    name: str  # what the progress line and errors call it: "[round 1] sft variant 0"
    script: str  # a path under ROOT, e.g. "llama_posttrain/train/sft.py"
    args: list[str]
    log: Path  # stdout and stderr, appended, each attempt opened by its command line
    nproc: int = 1  # ranks per node; 0: one plain process on the driver's node (no process group)
    env: dict = field(default_factory=dict)  # on top of os.environ
    run_dir: Path | None = None  # a training run's folder (its saved step is named when a signal stops it)


class JobFailed(RuntimeError):
    """A job exited with an error: the message names it, its exit code, its log and the log's end."""


@dataclass
class Launcher:
    kind: str = "local"  # local | torchrun | slurm
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of the c10d rendezvous (multi-node)
    queue: Path | None = None  # torchrun across nodes: where the leader queues the distributed jobs
    signals: Signals = field(default_factory=lambda: Signals())
    _count: itertools.count = field(default_factory=itertools.count)
    _session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def leader(self) -> bool:
        return self.node_rank == 0

    def endpoint(self) -> str:
        if self.rdzv_endpoint:
            return self.rdzv_endpoint
        if "MASTER_ADDR" in os.environ:
            return f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', RDZV_PORT)}"
        if self.kind == "slurm":  # the batch script, and so the driver, runs on the allocation's first node
            return f"{socket.gethostname()}:{RDZV_PORT}"
        raise ValueError("launcher torchrun across nodes needs rdzv_endpoint (host:port) or MASTER_ADDR")

    def command(self, job: Job, rdzv_id: str | None = None) -> list[str]:
        """The command line that runs `job` with this launcher."""
        script = str(ROOT / job.script)
        if job.nproc == 0:
            cmd = [sys.executable, script, *job.args]
            return ["srun", "--nodes=1", "--ntasks=1", *cmd] if self.kind == "slurm" else cmd
        run = [sys.executable, "-m", "torch.distributed.run"]
        if self.kind == "local" or self.nnodes == 1 and self.kind == "torchrun":
            return [*run, "--standalone", f"--nproc_per_node={job.nproc}", script, *job.args]
        rdzv = [
            f"--nnodes={self.nnodes}", f"--nproc_per_node={job.nproc}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={self.endpoint()}", f"--rdzv_id={rdzv_id or self._session}",
        ]  # fmt: skip
        agent = [*run, *rdzv, script, *job.args]
        if self.kind == "slurm":
            return ["srun", f"--nodes={self.nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *agent]
        return agent

    def run(self, job: Job) -> None:
        """Run the job to its end (all nodes), its output appended to its log, its progress shown. Raises
        JobFailed with the log's end, or Interrupted if a signal stopped it (forwarded to it first)."""
        rdzv_id = f"{self._session}-{next(self._count)}"
        if self.kind == "torchrun" and self.nnodes > 1 and job.nproc > 0:
            self._publish(job, rdzv_id)
        rc = self._execute(job, self.command(job, rdzv_id), show=True)
        if self.signals.signum is not None:  # forwarded to it: it saved (or not) and stopped
            raise Interrupted(self.signals.signum, _saved(job, rc, self.signals.killed))
        if rc != 0:
            raise JobFailed(
                f"{job.script} failed (exit code {rc}) for {job.name}; the end of its log {job.log}\n{_tail(job.log)}\n"
                "Rerunning the pipeline resumes from the last finished stage."
            )

    def _execute(self, job: Job, cmd: list[str], show: bool) -> int:
        env = {**os.environ, **job.env}
        progress_file = job.log.with_suffix(".progress.json")
        progress_file.unlink(missing_ok=True)
        env[progress.ENV] = str(progress_file)
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "a") as log:
            log.write(f"{ATTEMPT}{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
            log.flush()
            watch = ProgressLine(job.name, progress_file) if show else None
            try:
                return self.signals.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, tick=watch)
            finally:
                if watch:
                    watch()  # the job's last report
                    watch.close()

    # -------------------------------------------------------------------------- several nodes, torchrun

    def start_session(self) -> None:
        """The leader, at its start: a new queue (a follower of an earlier leader switches to this one)."""
        if self.kind != "torchrun" or self.nnodes == 1:
            return
        self.queue.mkdir(parents=True, exist_ok=True)
        for old in self.queue.glob("*.json"):
            old.unlink()
        write_json(self.queue / "session.json", {"id": self._session, "host": socket.gethostname()})

    def end_session(self, status: int) -> None:
        if self.kind == "torchrun" and self.nnodes > 1 and self.leader:
            write_json(self.queue / "end.json", {"id": self._session, "status": status})

    def _publish(self, job: Job, rdzv_id: str) -> None:
        spec = {"name": job.name, "script": job.script, "args": job.args, "nproc": job.nproc, "env": job.env}
        n = int(rdzv_id.rsplit("-", 1)[1])
        write_json(self.queue / f"job_{n:05d}.json", {**spec, "rdzv_id": rdzv_id, "log": str(job.log)})

    def follow(self, poll_s: float = 0.5) -> int:
        """A follower node: start this node's agent of every distributed job the leader queues, in order,
        until the leader ends (-> its exit status). A leader that starts over (a new session) is followed
        from its first job; an agent waiting for a job of the old session is stopped."""
        session, n = None, 0
        while True:
            current = _read_json(self.queue / "session.json") if self.queue else None
            if current is None:
                time.sleep(poll_s)
                continue
            if current["id"] != session:
                session, n = current["id"], 0
                print(f"following the leader on {current['host']} (session {session})", flush=True)
            end = _read_json(self.queue / "end.json")
            if end and end["id"] == session:
                return int(end["status"])
            spec = _read_json(self.queue / f"job_{n:05d}.json")
            if spec is None or not spec["rdzv_id"].startswith(session):
                time.sleep(poll_s)
                continue
            log = Path(spec["log"]).with_name(Path(spec["log"]).stem + f".node{self.node_rank}.log")
            job = Job(spec["name"], spec["script"], spec["args"], log, spec["nproc"], spec["env"])
            print(f"[node {self.node_rank}] {job.name}: starting this node's agent (log {log})", flush=True)
            stop = threading.Event()
            threading.Thread(target=self._watch_session, args=(session, stop), daemon=True).start()
            rc = self._execute(job, self.command(job, spec["rdzv_id"]), show=False)
            stop.set()
            if self.signals.signum is not None:
                return 128 + self.signals.signum
            if rc != 0:
                print(f"[node {self.node_rank}] {job.name}: exit code {rc} (log {log})", file=sys.stderr, flush=True)
            n += 1

    def _watch_session(self, session: str, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            current = _read_json(self.queue / "session.json")
            if current and current["id"] != session and self.signals.child is not None:
                for pid in reversed(_process_tree(self.signals.child.pid)):
                    _send(pid, signal.SIGKILL)
                return


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def clock(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour: the progress lines' elapsed time and ETA (llama_posttrain/train/logger.py too)."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLine:
    """While a job runs: `name: 37/150 steps, 0:42, ETA 2:08`, redrawn in place on a terminal, else a
    line every 10% or 60 s (a log file stays readable)."""

    def __init__(self, name: str, path: Path, stream=None):
        self.name, self.path, self.stream = name, path, stream or sys.stderr
        self.t0, self.shown, self.last_print, self.tty = time.time(), None, 0.0, self.stream.isatty()

    def line(self, p: dict) -> str:
        elapsed = time.time() - self.t0
        done, total = p["done"], max(p["total"], 1)
        eta = f", ETA {clock(elapsed / done * (total - done))}" if 0 < done < total else ""
        return f"{self.name}: {done}/{p['total']} {p['unit']}, {clock(elapsed)}{eta}"

    def __call__(self) -> None:
        p = progress.read(self.path)
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


class Interrupted(BaseException):
    """A signal stopped the pipeline: `main` prints one line and exits 128 + the signal. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` on the way holds it up."""

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


class Signals:
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
        self.child: subprocess.Popen | None = None
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
                _send(self.child.pid, signal.SIGTERM if signum == signal.SIGHUP else signum)
            else:
                self.killed = True
                for pid in reversed(_process_tree(self.child.pid)):  # the workers, then torchrun
                    _send(pid, signal.SIGKILL)
            return
        if not self.deferring:
            raise Interrupted(self.signum)

    def check(self, where: str = "") -> None:
        """Stop here if a signal came while it could not stop the pipeline at once."""
        if self.signum is not None:
            e = Interrupted(self.signum)
            e.where = where
            raise e

    @contextmanager
    def deferred(self):
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1

    def run(self, cmd: list[str], tick=None, **popen_kw) -> int:
        """Run cmd in a session of its own, signals forwarded to it -> its exit code. tick(): called while
        it runs (the progress line)."""
        with self.deferred():  # a signal now is forwarded once the child exists
            self.child = subprocess.Popen(cmd, start_new_session=True, **popen_kw)
        try:
            if self.signum is not None:
                _send(self.child.pid, signal.SIGTERM if self.signum == signal.SIGHUP else self.signum)
            while True:  # polled: the handlers run promptly whichever thread the signal interrupted
                try:
                    return self.child.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    if tick is not None:
                        tick()
        finally:
            self.child = None


ATTEMPT = "=== pipeline: "  # starts each attempt's part of a stage's log


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
    """What a job stopped by a signal left, from its log's latest attempt (a training run's "SIGTERM: saved
    step N", llama_posttrain/train/loop.py)."""
    if killed:
        return f"{job.script} killed by a second signal, without saving; its log: {job.log}"
    where = job.run_dir or job.name
    if rc == 0:
        return f"{job.script} finished {where}"
    text = job.log.read_text(errors="replace") if job.log.is_file() else ""
    saved = re.findall(r"^SIG[A-Z]+: saved step (\d+)", text.rpartition(ATTEMPT)[2], re.MULTILINE)
    if saved:
        return f"{job.script} saved step {saved[-1]} in {where}"
    return f"{job.script} stopped before it saved a step (exit code {rc}); its log: {job.log}"
