"""`launcher: ray` (llama_posttrain/driver/launch.py): the jobs of the driver on a running Ray cluster.

    ray start --head                                   # on the first node
    ray start --address <first node>:6379              # on each other node
    python llama_posttrain/driver/pipeline.py --config CFG launcher=ray nnodes=2    # anywhere in the cluster

A distributed job is a placement group of `nnodes` bundles on distinct nodes (STRICT_SPREAD); each bundle runs
that node's `torchrun --nnodes N --node_rank i` agent (a static rendezvous on the first bundle's node, whose
address and a free port a first task finds), so node i holds ranks i * nproc ... (i + 1) * nproc - 1. A
single-process job (averaging) is one task on any node. Each node's output goes to its log, opened by its
command line (node 0: the job's log, node i: `<log>.node<i>.log`). Every node sees the repository, the Python
environment, the run folder and the driver's working directory (where each job runs) at the same paths (a shared
file system), as under Slurm.

Stopping: a signal to the driver cancels the tasks (PipelineSignals -> RayJobs.forward): each agent task gets a
KeyboardInterrupt and sends SIGTERM to its torchrun, which its workers save on; a second signal kills them.
A node that fails (an exit code, or Ray loses the task with its node) fails the job at once: the other nodes'
agents are stopped and the error shows the failed node's log's end. The driver's death ends its tasks
(Ray's ownership), and each torchrun dies with its task's worker (die_with_parent).

Ray is an optional extra (pip install -e '.[ray]'), imported by this module only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from llama_posttrain.driver.processes import Job, JobFailed, LocalProcess, run_logged, start_job

STOP_GRACE_S = 5.0  # after a node fails, how long the other nodes' agents get to stop before they are killed


def import_ray():
    """Ray, an optional extra: imported by this launcher only."""
    try:
        import ray
    except ImportError:
        raise JobFailed("launcher: ray needs Ray, which is not installed: pip install -e '.[ray]'") from None
    return ray


def ray_node_address() -> tuple[str, int]:
    """On a job's first node (a Ray task): its IP address and a free port for the rendezvous."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def ray_agent(cmd: list[str], env: dict, log: str, cwd: str) -> int:
    """A job's process on one Ray node (a Ray task, run in its worker's main thread): cmd, logged like a local
    job, its exit code returned. The driver cancels the task to stop it: the first cancel (a KeyboardInterrupt
    here) sends SIGTERM, the next SIGKILL to the whole tree. cmd runs under a shim (below), which dies with
    the task's worker."""
    cancels = 0

    def run(cmd, **popen_kw):
        nonlocal cancels
        shim = [sys.executable, "-m", "llama_posttrain.driver.launch_ray", *cmd]
        child = LocalProcess(start_job(shim, death_signal=signal.SIGKILL, **popen_kw))
        while True:
            try:
                return child.popen.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            except KeyboardInterrupt:  # ray.cancel from the driver
                cancels += 1
                child.forward(signal.SIGTERM) if cancels == 1 else child.kill()

    return run_logged(cmd, {**os.environ, **env}, Path(log), run, cwd)


def exit_status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class RayJobs:
    """One job on the Ray cluster: its tasks, started and awaited from the driver's main thread. A signal
    (PipelineSignals.handler -> forward/kill) is acted on here, at the next poll: the tasks are cancelled."""

    def __init__(self, launcher):  # the launch.Launcher running the job (its signals, command lines)
        self.launcher, self.ray = launcher, import_ray()
        self.pending_cancels = 0  # cancels asked for by signals, not yet sent

    def forward(self, signum: int) -> None:
        self.pending_cancels = max(self.pending_cancels, 1)

    def kill(self) -> None:
        self.pending_cancels = 2

    def connect(self) -> None:
        ray, address = self.ray, self.launcher.address
        if not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False, logging_level="WARNING")
            except ConnectionError as e:
                raise JobFailed(
                    f"launcher: ray: no Ray cluster at ray_address={address!r} ({e}); start one with "
                    "`ray start --head` on the first node and `ray start --address <head>:6379` on the others"
                ) from None
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) < self.launcher.nnodes:
            raise JobFailed(
                f"launcher: ray: nnodes={self.launcher.nnodes} but the Ray cluster has {len(alive)} node(s) alive "
                "(`ray status` lists them); start more with `ray start --address <head>:6379`, or lower nnodes"
            )

    def run(self, job: Job, env: dict, watch) -> tuple[int, tuple[str, Path, str] | None]:
        """-> (exit code, None), or on a failure (1, (which node failed first and how each ended, its log, the
        other logs))."""
        self.connect()
        ray, n = self.ray, self.launcher.nnodes
        agent = ray.remote(max_retries=0, num_cpus=1)(ray_agent)  # never retried: a rerun of the driver resumes
        if job.nproc == 0:
            return self.wait(job, [agent.remote(self.launcher.command(job), env, str(job.log), job.cwd)], watch)
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = {"GPU": job.nproc} if ray.cluster_resources().get("GPU", 0) > 0 else {}  # a node's ranks' GPUs
        bundle = {"CPU": 1, **gpus}
        group = placement_group([bundle] * n, strategy="STRICT_SPREAD")
        try:
            if not self.ready(group.ready(), watch):
                raise JobFailed(
                    f"launcher: ray: {job.name} needs {n} distinct nodes with {bundle} free on each, and the Ray "
                    "cluster has not given them in 60 s (`ray status` shows what is used)"
                )
            on = [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i) for i in range(n)]
            probe = ray.remote(ray_node_address).options(num_cpus=0, max_retries=0, scheduling_strategy=on[0])
            host, port = ray.get(probe.remote(), timeout=60)
            with self.launcher.signals.deferred():  # every node's task is started, or none (a signal then is
                refs = []  # forwarded to them all by wait)
                for i in range(n):
                    cmd = self.launcher.command(job, node=i, master=f"{host}:{port}")
                    task = agent.options(scheduling_strategy=on[i], num_gpus=gpus.get("GPU", 0))
                    refs.append(task.remote(cmd, env, str(job.node_log(i)), job.cwd))
            return self.wait(job, refs, watch)
        finally:
            remove_placement_group(group)

    def ready(self, ref, watch=None, timeout_s: float = 60.0) -> bool:
        """Wait for ref, a signal stopping the wait (PipelineInterrupted); watch(): the progress line, which says the wait."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.ray.wait([ref], timeout=0.2)[0]:
                return True
            self.launcher.signals.check("waiting for the Ray cluster's nodes")
            if watch is not None:
                watch()
        return False

    def wait(self, job: Job, refs: list, watch) -> tuple[int, tuple[str, Path, str] | None]:
        """Until every node's task ends -> (node 0's exit code, None), or as run() says on a failure (an exit
        code, or a task Ray lost with its node): the other nodes' tasks are cancelled at once (SIGTERM to their
        agents), again STOP_GRACE_S later (SIGKILL), and left to Ray (their node is gone too) after three times
        as long again."""
        ray, signals, n = self.ray, self.launcher.signals, len(refs)
        outcome: dict[int, str] = {}  # node -> "exit code 0", "lost by Ray (NodeDiedError)"
        codes: dict[int, int] = {}
        first_failed, stop_at, sent = None, 0.0, 0
        with signals.forwarding(lambda: self):
            pending = list(refs)
            while pending:
                if first_failed is not None and time.time() > stop_at:
                    if time.time() > stop_at + 3 * STOP_GRACE_S:  # a SIGKILLed task ends at once, unless Ray or
                        break  # the machine is swamped: then it is Ray's
                    self.pending_cancels = 2
                for _ in range(sent, self.pending_cancels):
                    for ref in pending:
                        ray.cancel(ref)
                sent = max(sent, self.pending_cancels)
                done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
                for ref in done:
                    node = refs.index(ref)
                    try:
                        codes[node] = ray.get(ref)
                        outcome[node] = exit_status(codes[node])
                    except ray.exceptions.TaskCancelledError:  # stopped by this driver before it returned
                        codes[node], outcome[node] = -1, "stopped"
                    except ray.exceptions.RayError as e:  # its worker or its node is gone
                        codes[node], outcome[node] = -1, f"lost by Ray ({type(e).__name__})"
                    if codes[node] != 0 and first_failed is None and signals.signum is None:
                        first_failed, stop_at = node, time.time() + STOP_GRACE_S
                        self.pending_cancels = max(self.pending_cancels, 1)
                watch()
        if first_failed is None:
            return codes.get(0, 1), None
        nodes = "; ".join(f"node {i}: {outcome.get(i, 'still running, left to Ray')}" for i in range(n))
        logs = "".join(f"\n  node {i}: {job.node_log(i)}" for i in range(n) if i != first_failed)
        return 1, (f"on node {first_failed} of {n} ({nodes})", job.node_log(first_failed), f"The other logs:{logs}\n")


def shim(cmd: list[str]) -> int:
    """Between a Ray task's worker and a job's torchrun: Ray SIGKILLs the children of a worker it ends (its
    driver died), and a SIGKILLed torchrun leaves its workers running. So the worker's child is this shim
    (SIGKILL when the worker dies, start_job's death_signal); torchrun, its child, gets SIGTERM when the shim
    dies, or the SIGTERM the agent sends here, once, and stops its workers as a forwarded signal would."""
    child = start_job(cmd)
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
    return child.wait()


if __name__ == "__main__":
    sys.exit(shim(sys.argv[1:]))
