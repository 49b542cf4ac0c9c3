"""One writer per output: an advisory lock next to every artifact a command writes.

A requeued array task, or a second shell running the same command, must never interleave its
saves with a running writer's. Before a command starts work on ``OUT`` it takes the lock of ``OUT``:
the file ``.OUT.lock`` in the same folder, holding ``{"host", "pid", "started", "command"}`` (JSON)
of the holder, locked with ``flock`` while the holder runs and removed when it is done.

* Held by a live process (on this host, or another host on a file system where ``flock`` works
  across hosts): the lock is busy. ``output_lock`` raises ``OutputLocked`` (one line naming the
  holder), or with ``wait=True`` polls until the holder is done.
* Left by a dead process on this host (SIGKILL, OOM killer, power loss): the kernel dropped its
  ``flock``; the file is taken over.
* Naming another host, on a file system whose ``flock`` is local to each host: respected while the
  holder refreshes the file's modification time (every ``HEARTBEAT_SECONDS``); one not refreshed
  for ``timeout`` seconds (``NFM_LOCK_TIMEOUT``, default ``LOCK_TIMEOUT_SECONDS``) is a crashed
  holder's and is taken over.

A folder where the lock cannot be created (read-only, missing, full) is written without one: the
command then fails on its own write with its usual one-line message (or, for a finished output it
only reads, succeeds). Under ``torchrun`` only rank 0 (the writer) takes the lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfm_cli.errors import NfmError
from nfm_cli.runtime.progress import ProgressFn, note

LOCK_TIMEOUT_SECONDS = 600.0       # another host's lock not refreshed for this long is stale
HEARTBEAT_SECONDS = 60.0           # how often the holder refreshes its lock file
POLL_SECONDS = 0.5                 # how often --wait retries
TIMEOUT_ENV = "NFM_LOCK_TIMEOUT"
EXIT_LOCKED = 75                   # EX_TEMPFAIL: the output is busy, try again later


class OutputLocked(NfmError):
    """The output is being written by another process; ``exit_code`` is ``EXIT_LOCKED``."""

    exit_code = EXIT_LOCKED


@dataclass
class Holder:
    host: str
    pid: int | None
    started: float | None
    command: str

    def describe(self) -> str:
        when = (time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
                if self.started else "")
        what = f" ({self.command})" if self.command else ""
        return f"host {self.host or '?'}, pid {self.pid if self.pid is not None else '?'}{when}{what}"


def lock_path(out: str | os.PathLike) -> Path:
    """``folder/.NAME.lock`` for ``folder/NAME``."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


def hostname() -> str:
    """This machine's name, as lock files record it."""
    return socket.gethostname() or "localhost"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, *, wait: bool = False, progress: ProgressFn = None,
                command: str = "", timeout: float | None = None) -> Iterator[Path | None]:
    """Hold the lock of ``out`` for the duration of the ``with`` block (see the module doc).

    Raises ``OutputLocked`` naming the holder when it is busy and ``wait`` is false; with ``wait``,
    sends one note through ``progress`` and retries every ``POLL_SECONDS``. Yields the lock file's
    path, or None when no lock could be made (folder not writable) or this is a torchrun rank > 0.
    """
    from nfm_cli.runtime import distributed
    if distributed.env_rank() > 0:
        yield None
        return
    timeout = _timeout() if timeout is None else timeout
    path = lock_path(out)
    announced = False
    while True:
        fd, holder = _try_acquire(path, timeout)
        if fd is not None or holder is None:
            break
        if not wait:
            raise OutputLocked(f"is being written by another nfm ({holder.describe()}); rerun with --wait to "
                               "wait for it to finish, or choose another --out", out)
        if not announced:
            note(progress, f"{out}: waiting for another nfm writing it ({holder.describe()}) to finish")
            announced = True
        time.sleep(POLL_SECONDS)
    if fd is None:                 # the folder does not take a lock file: go on without one
        yield None
        return
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fd, stop), daemon=True, name="nfm-lock-heartbeat")
    try:
        _write_holder(fd, command)
        beat.start()
        yield path
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        _release(path, fd)


def read_holder(path: str | os.PathLike) -> Holder | None:
    """The holder recorded in the lock file ``path`` (None if absent or unreadable)."""
    try:
        with open(path, "rb") as handle:
            return _parse(handle.read(4096))
    except OSError:
        return None


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else LOCK_TIMEOUT_SECONDS
    except ValueError:
        raise NfmError(f"{TIMEOUT_ENV} must be a number of seconds, not {text!r}") from None
    return value if value >= 0 else LOCK_TIMEOUT_SECONDS


def _try_acquire(path: Path, timeout: float) -> tuple[int | None, Holder | None]:
    """(fd holding the lock, None) on success; (None, holder) if busy; (None, None) if no lock can be made."""
    for _ in range(100):           # retried only when the file was replaced between open and flock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None, None      # read-only, missing or full folder, or a directory of that name
        flocked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _busy_holder(fd)
            os.close(fd)
            return None, holder
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            flocked = False        # no flock on this file system: the recorded holder alone decides
        if not _same_file(fd, path):  # the holder removed it between our open and flock: take the new one
            os.close(fd)
            continue
        holder = _parse(_read_fd(fd))
        if holder is not None and _still_held(holder, fd, timeout, flocked):
            os.close(fd)
            return None, holder
        return fd, None
    return None, None


def _busy_holder(fd: int, attempts: int = 50) -> Holder:
    """The record of a lock another process holds with flock. It takes the flock before it writes its
    record, so an empty file is read again for up to ``attempts`` x 10 ms before it counts as unknown."""
    for _ in range(attempts):
        holder = _parse(_read_fd(fd))
        if holder is not None:
            return holder
        time.sleep(0.01)
    return Holder("", None, None, "")


def _still_held(holder: Holder, fd: int, timeout: float, flocked: bool) -> bool:
    """A lock file nobody holds with ``flock``: is its recorded holder still at work?"""
    if holder.host == hostname():
        # with flock, a live holder on this host would have blocked us: the recorded process is dead
        if flocked or holder.pid is None or holder.pid == os.getpid():
            return False
        from nfm_cli.store.artifacts import _pid_alive  # here, not at the top: EXIT_LOCKED in --help needs no torch
        return _pid_alive(holder.pid)
    try:
        age = time.time() - os.fstat(fd).st_mtime
    except OSError:
        return False
    return age < timeout           # another host whose flock we cannot see: trust its heartbeat


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, 4096, 0)
    except OSError:
        return b""


def _parse(data: bytes) -> Holder | None:
    try:
        info: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    pid = info.get("pid")
    started = info.get("started")
    return Holder(str(info.get("host", "")), pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                  float(started) if isinstance(started, (int, float)) and not isinstance(started, bool) else None,
                  str(info.get("command", ""))[:200])


def _write_holder(fd: int, command: str) -> None:
    command = command or " ".join(["nfm", *sys.argv[1:2]]).strip()
    data = json.dumps({"host": hostname(), "pid": os.getpid(), "started": time.time(),
                       "command": command}).encode()
    try:                           # informative only: a failure here (disk full) still holds the lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass


def _heartbeat(fd: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            os.utime(fd)
        except OSError:
            pass


def _release(path: Path, fd: int) -> None:
    try:
        if _same_file(fd, path):
            os.unlink(path)        # before closing: a waiter that then gets our flock sees the file gone
    except OSError:
        pass
    finally:
        os.close(fd)
