"""One process per folder: a lock file that names its holder.

    lock = hold(folder, "llama_posttrain/train/sft.py")    # raises FolderInUse naming the holder if another process has it
    ...                                     # released at exit (also on an exception, kill -9, a crash)

`<folder>/run.lock` is taken with flock(2), which the kernel drops when the holding process dies,
however it dies; the file's content says who holds it (pid, host, start time, command) so that a
second run can name the holder. On a clean exit the content is emptied. A lock whose holder died
without emptying it (kill -9, a crash, a lost node) is taken over with a message that names it:
- on this host, flock says whether the holder still runs (and the pid's start time tells a dead
  holder from a new process that reuses its pid);
- on another host (a shared filesystem), flock is not trusted (NFS and Lustre may not carry it),
  so the holder refreshes the file's modification time every HEARTBEAT_S seconds, and a lock not
  refreshed for STALE_AFTER_S seconds is taken as abandoned.
A process that asks again for a folder it already holds gets the same lock (in-process tests).

Deleting the lock file of a live run lets a second run in (it creates and locks a new file), so the
holder checks before each write into the folder (`check`: a checkpoint, the export) that the file
is still the one it locked and still names it, and stops with LockLost if not.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
HOST = socket.gethostname()


class FolderInUse(ValueError):
    """Another live process holds the folder."""


class LockLost(RuntimeError):
    """The lock this process held was deleted, replaced or overwritten while it ran: another run may
    have taken the folder, so this one must not write there any more."""


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux /proc), None if unknown or not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the parenthesized name


def _running(holder: dict) -> bool:
    """Whether the process a lock file names (on this host) still runs: its pid exists with the same start."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    return holder.get("pid_start") in (None, _start_ticks(pid))


def describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {since} ({holder.get('command', '?')})"


class FolderLock:
    def __init__(self, folder: Path, fd: int):
        self.folder, self.path, self.fd = folder, folder / LOCK_NAME, fd
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock {folder}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)
            except OSError:
                pass  # the folder is gone (deleted under us); nothing to keep alive

    def check(self, what: str) -> None:
        """Raise LockLost unless `self.path` is still the file this process locked and still names it.
        A deleted lock file lets a second run in (it creates and locks a new one), so a holder checks
        before each write into the folder (train_state.save, export) and stops instead of mixing runs."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            problem = "was deleted"
        else:
            mine = os.fstat(self.fd)
            if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                problem = "was replaced by another file"
            elif _read(self.fd).get("pid") != os.getpid():
                problem = "was overwritten"
            else:
                return
        try:
            holder = json.loads(self.path.read_text() or "{}")
            holder_now = f" (it now names {describe(holder)})" if isinstance(holder, dict) and holder else ""
        except (OSError, ValueError):
            holder_now = ""
        raise LockLost(
            f"{self.path} {problem} while this run (pid {os.getpid()}) held it{holder_now}: another run may be "
            f"writing into {self.folder}, so this one stops before writing {what} rather than mix two runs' "
            "checkpoints and metrics. Check which processes use the folder (`ps -o pid,lstart,args -p PID` for the "
            "pid a lock names); once no other run does, rerun the same command to resume from the last checkpoint."
        )

    def release(self) -> None:
        """Empty the file (a free lock) and drop the flock; the file stays: unlinking it would let a
        process that opened it a moment earlier lock a file no one else sees."""
        if self.fd < 0:
            return
        self._stop.set()
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        _HELD.pop(self.folder, None)


_HELD: dict[Path, FolderLock] = {}


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except ValueError:
        holder = {"pid": None, "host": "?", "command": f"unreadable lock content {raw[:80]!r}"}
    return holder if isinstance(holder, dict) else {}


def hold(folder, what: str | None = None) -> FolderLock:
    """Lock `folder` (created if missing) for this process, or raise FolderInUse naming the holder."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return _HELD[folder]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise FolderInUse(
                f"{folder} is in use by {describe(holder) if holder else 'another process'}: two runs in one folder "
                "would mix their checkpoints and metrics. Wait for it to end, or stop it, then rerun."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was replaced between open and flock: lock the one now there
    holder = _read(fd)
    if holder:
        age = time.time() - os.fstat(fd).st_mtime
        if holder.get("host") == HOST and _running(holder) and holder.get("pid") != os.getpid():
            problem = "its process still runs but does not hold the lock"
        elif holder.get("host") != HOST and age < STALE_AFTER_S:
            problem = f"it was refreshed {age:.0f} s ago from another host, which this host cannot check"
        else:
            problem = None
        if problem:
            os.close(fd)
            stale = f"If it has ended there, the lock is taken over {STALE_AFTER_S:.0f} s after its last refresh. "
            raise FolderInUse(
                f"{folder} is in use by {describe(holder)}: {problem}. Check on host {holder.get('host')} whether it "
                f"still runs (`ps -o pid,lstart,args -p {holder.get('pid')}`): wait for it to end or stop it, then "
                f"rerun. {stale if holder.get('host') != HOST else ''}Do not delete {path} while it runs: "
                "that lets a second run into the folder beside it."
            )
        why = "not running" if holder.get("host") == HOST else f"not refreshed for {age:.0f} s"
        print(f"{path}: taking over the lock of {describe(holder)}: {why}", file=sys.stderr, flush=True)
    record = {
        "pid": os.getpid(),
        "host": HOST,
        "since": time.time(),
        "pid_start": _start_ticks(os.getpid()),
        "command": what or " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)
    lock = _HELD[folder] = FolderLock(folder, fd)
    return lock


def check(folder, what: str) -> None:
    """Before writing `what` into `folder`: LockLost if the lock this process took there is gone or
    another's (FolderLock.check). Nothing if this process holds no lock there (a rank other than 0)."""
    lock = _HELD.get(Path(folder).resolve())
    if lock is not None:
        lock.check(what)


def release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


atexit.register(release_all)
