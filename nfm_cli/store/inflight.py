"""Files of writes still in flight, which a reader of a live sweep folder must not take for results.

Every nfm writer saves to a temp file ``.NAME.<host>-<pid>.<random>.tmp`` in the destination folder
and renames it onto ``NAME`` when complete (``artifacts.atomic_write``), and holds the lock file
``.NAME.lock`` while it works (``locks``). A shell glob such as ``runs/* runs/.*`` lists those too.
``in_flight_reason`` tells them apart by name (and a FIFO or device, which a reader would block on,
by type) so that ``report`` skips them with a reason instead of reading them; a temp file is never
a result, even when it is already complete.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from nfm_cli.store.artifacts import _pid_alive, _writer_tag


def parse_temp_name(name: str) -> tuple[str, str, int] | None:
    """(target name, host, pid) of a writer's temp file name ``.NAME.<host>-<pid>.<random>.tmp``."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    stem = name[1:-len(".tmp")]
    parts = stem.rsplit(".", 2)
    if len(parts) != 3:
        return None
    target, tag, _ = parts
    host, _, pid = tag.rpartition("-")
    if not (target and host and pid.isdigit()):
        return None
    return target, host, int(pid)


def in_flight_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a finished artifact to read (a writer's temp or lock file, a FIFO), or None."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        return None                                  # missing or a broken link: the reader says so
    name = path.name
    temp = parse_temp_name(name)
    if temp is not None:
        target, host, pid = temp
        if host != _writer_tag().rsplit("-", 1)[0]:
            state = f"by pid {pid} on host {host}"
        elif _pid_alive(pid):
            state = f"still being written by pid {pid}"
        else:
            state = f"left by a killed writer (pid {pid})"
        return f"temp file of an unfinished save of {target} ({state}); not a result"
    if name.startswith(".") and name.endswith(".lock") and len(name) > len("..lock"):
        return f"lock file of a writer of {name[1:-len('.lock')]}; not a result"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "not a regular file (a FIFO, socket or device)"
    return None
