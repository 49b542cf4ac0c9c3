"""Rendering helpers shared by the commands: stderr console, progress bars, JSON on stdout."""
from __future__ import annotations

import contextlib
import json
import math
import sys
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nfm_cli.progress import NOTE, ProgressEvent

console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: wide enough for the tables, no wrapping of names
    console = Console(stderr=True, width=140)


def plural(count: int, noun: str) -> str:
    """``1 run``, ``3 runs``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


@contextlib.contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Any]:
    """A callback for the core's progress events, drawing one bar per task name on stderr."""
    if quiet:
        yield None
        return
    bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=False)
    tasks: dict[str, Any] = {}
    last: dict[str, int] = {}

    started = False  # an error before the first event must not leave an empty bar (a blank stderr line)

    def on_event(event: ProgressEvent) -> None:
        nonlocal started
        if event.task == NOTE:      # a one-line message above the bars, not a bar
            print_note(event.info.get("message", ""))
            return
        if not started:
            bars.start()
            started = True
        info = " ".join(f"{k}={_fmt(v)}" for k, v in event.info.items() if k not in ("epochs",) and v is not None)
        label = "epochs" if event.task == "epoch" else event.task
        if event.task == "batch" and "epoch" in event.info:
            label = f"epoch {event.info['epoch']}/{event.info.get('epochs', '?')}"
        if event.task not in tasks:
            tasks[event.task] = bars.add_task(label, total=event.total, info=info)
        elif event.done < last.get(event.task, 0):
            bars.reset(tasks[event.task], total=event.total)
        last[event.task] = event.done
        bars.update(tasks[event.task], completed=event.done, total=event.total, description=label, info=info)

    try:
        yield on_event
    finally:
        if started:
            bars.stop()


def print_note(message: str) -> None:
    """One line on stderr (above any live progress bars)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def note_printer(event: ProgressEvent) -> None:
    """A progress callback that prints notes only (for --quiet runs and steps without bars)."""
    if event.task == NOTE:
        print_note(event.info.get("message", ""))


def print_json(obj: Any) -> None:
    """One JSON object on stdout (NaN written as null, so every JSON parser reads it)."""
    sys.stdout.write(json.dumps(_nan_to_none(obj), indent=2, sort_keys=False) + "\n")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
