"""A training process's life, in one place: the phase it is in, the signals that stop it, how it ends.

    main_guard(main)         an entry point's `__main__`: errors before training as one line, a clean end
    with training(): ...     llama_posttrain/train/loop.py `run`: from here on errors keep their tracebacks, and SIGTERM /
                             SIGINT ask for a stop instead of killing the process
    stop_requested(device)   whether any rank was signalled (a collective, at the same point on every rank):
                             at the end of an eval step
    StopRequested            raised where a stop was found; the loop saves the last finished step and exits

    StopPoll                 the same between micro-batches, off the device: `poll()` starts a 1-number
                             all-reduce on a gloo (CPU) group and reads the one started at the previous
                             poll, so no poll waits on a peer or syncs the GPU

SIGTERM (a scheduler, torchrun forwarding it) or SIGINT (Ctrl-C): the loop finishes the micro-batch
in progress (and the next one: the poll's lag), drops the step, saves the last finished step, exits
with 128 + the signal. torchrun kills workers `--shutdown-timeout` seconds (default 30) after
forwarding the signal, so the flag is polled between micro-batches, not only between steps.
A second Ctrl-C stops without saving. `die_with_parent`: a torchrun worker gets SIGTERM when
torchrun itself dies (kill -9 included), instead of training on as an orphan.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from llama_posttrain.data.io import write_json
from llama_posttrain.train import run_lock

# torch is imported in the functions that run collectives (stop_requested, StopPoll), not here: every training
# entry point imports main_guard from this module, and its `--help` and config errors answer before torch loads.


class Phase:
    """Whether `training()` was entered: main_guard reports a ValueError or OSError raised before that
    (a config, data or checkpoint problem) once, without tracebacks."""

    training = False


class StopSignal:
    """The signal this training process received (None: none), set by `handler` while training. (The
    pipeline's own handling of signals: llama_posttrain/driver/launch.py PipelineSignals.)"""

    received: int | None = None

    @classmethod
    def handler(cls, signum, frame):
        if cls.received is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop without saving
            raise KeyboardInterrupt
        cls.received = signum


class StopRequested(Exception):
    """Some rank was signalled: whatever was in progress (a step's gradients, an evaluation) is dropped and
    the loop saves its last finished step. An Exception, caught by the loop (the pipeline's, a BaseException
    that stops the pipeline: llama_posttrain/driver/launch.py PipelineInterrupted)."""


def stop_requested(device) -> bool:
    """Whether any rank was signalled (a collective: every rank must call it at the same point)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([float(StopSignal.received is not None)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    return bool(flag[0] > 0)


class StopPoll:
    """Whether any rank was signalled, polled between micro-batches without a device sync.

    Each `poll()` starts an all-reduce of this rank's flag on a gloo (CPU) group of its own and
    returns what the previous poll's all-reduce found (waiting for it: by then every peer has long
    reached it, since the step's collectives keep them together). Every rank polls the same number
    of times in the same order, so all see the same answer at the same poll. One rank: no comms."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.pending = dist, None
        self.several = dist.is_initialized() and dist.get_world_size() > 1
        self.group = dist.new_group(backend="gloo") if self.several else None  # a collective: every rank

    def poll(self) -> bool:
        import torch

        if not self.several:
            return StopSignal.received is not None
        found = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            found = bool(flag[0] > 0)  # a CPU tensor: no device sync
        flag = torch.tensor([float(StopSignal.received is not None)])
        self.pending = (self.dist.all_reduce(flag, group=self.group, async_op=True), flag)
        return found

    def close(self) -> None:
        """Finish the poll in flight (before the group or the process goes)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


def die_with_parent() -> None:
    """Linux: SIGTERM to this process when its parent dies (prctl PR_SET_PDEATHSIG). torchrun starts
    its workers in sessions of their own, so a worker outlived a kill -9 of torchrun and trained on
    as an orphan; now it gets SIGTERM (saves and exits like any signalled run). Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return  # not available (a sandbox): the orphan case stays as before
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def training():
    """The training phase: SIGTERM / SIGINT set StopSignal.received (the handlers before are restored after)."""
    Phase.training = True
    previous = {s: signal.signal(s, StopSignal.handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main_guard(fn):
    """Run an entry point and end it cleanly on every rank.

    On success (or a signal-stop, which every rank agreed on) all ranks meet at a barrier before
    the process group is destroyed, so no rank tears down its gloo/NCCL connections while a peer
    still has work in flight on them; then stdio is flushed. On an exception the group is left
    alone: destroying it while other ranks wait in a collective can hang, and torchrun stops them.

    The run folder's lock (llama_posttrain/train/run_lock.py) is released on the way out, however it ends.

    A ValueError or OSError raised before training starts (`training()` not entered: a bad key, data
    file, batch size, checkpoint; every rank reads the same and fails alike) is printed once, as
    `error: ...`, by local rank 0 (once per node: a file missing on one node is still reported; see
    `_report_once`), and every rank exits with status 2, without tracebacks. A full disk at any time
    is reported the same way (status 1), and so is a run folder lock lost while training (run_lock.LockLost:
    the lock file deleted or replaced under the run). Other errors raised later keep their tracebacks.
    """
    Phase.training = False
    try:
        result = fn()
    except run_lock.LockLost as e:  # another run may have the folder now: no traceback, nothing more written
        _report_once(e)
        raise SystemExit(1) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _report_once(e)
            raise SystemExit(1) from None
        if Phase.training:
            raise
        _report_once(e)
        raise SystemExit(2) from None
    except ValueError as e:
        if Phase.training:
            raise
        _report_once(e)
        raise SystemExit(2) from None
    except SystemExit as e:
        if e.code not in (None, 0) and StopSignal.received is None:
            raise
        _teardown()
        raise
    finally:
        run_lock.release_all()
    _teardown()
    return result


# How long a rank other than local rank 0 waits before printing the error it failed with.
OTHER_RANKS_WAIT_S = 3.0


def _report_once(e: Exception) -> None:
    """Local rank 0 prints the error at once. Another rank waits first: when every rank failed alike
    (the usual case), torchrun stops it within ~0.1 s of rank 0's exit, so the error is printed once;
    if it is still running, rank 0 did not fail this way, and it prints its own error."""
    rank = os.environ.get("LOCAL_RANK", "0")
    if rank != "0":
        time.sleep(OTHER_RANKS_WAIT_S)
    who = "" if rank == "0" else f" (rank {os.environ.get('RANK', '?')})"
    print(f"error{who}: {e}", file=sys.stderr, flush=True)


def _teardown() -> None:
    dist = sys.modules.get("torch.distributed")  # not imported (`--help`, a config error): no process group
    if dist is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


# A training run's result file in its run folder, written by rank 0 when the run ends (finished, or stopped by a
# signal after saving): {"saved_step": the last step saved, "stopped_by": the signal's name, or null when it
# finished}. The launcher (llama_posttrain/driver/launch.py) reads it to say what a stopped job left.
RESULT = "result.json"


def write_result(run_dir, saved_step: int, signum: int | None) -> None:
    stopped_by = None if signum is None else signal.Signals(signum).name
    write_json(Path(run_dir) / RESULT, {"saved_step": saved_step, "stopped_by": stopped_by})


def read_result(run_dir) -> dict | None:
    """The result a training run wrote in run_dir; None when there is none (it ended before writing one)."""
    path = Path(run_dir) / RESULT
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        return {"saved_step": int(result["saved_step"]), "stopped_by": result["stopped_by"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a training run's result ({type(e).__name__}: {e})") from None
