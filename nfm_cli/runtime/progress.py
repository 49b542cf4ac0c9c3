"""Progress reporting from the core to whoever renders it (the CLI draws rich progress bars)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ProgressEvent:
    """``done`` of ``total`` units of ``task`` (e.g. "epoch 3/50", "samples") with extra fields to show."""

    task: str
    done: int
    total: int
    info: dict = field(default_factory=dict)


ProgressFn = Callable[[ProgressEvent], None] | None


def report(progress: ProgressFn, task: str, done: int, total: int, **info) -> None:
    """Send one event if a callback was given."""
    if progress is not None:
        progress(ProgressEvent(task, done, total, info))


NOTE = "note"


def note(progress: ProgressFn, message: str) -> None:
    """A one-line message for the user (e.g. "waiting for a lock", "batch halved after out of memory"):
    an event of task ``NOTE`` with ``info["message"]``; renderers print it as a line, not a bar."""
    report(progress, NOTE, 0, 0, message=message)
