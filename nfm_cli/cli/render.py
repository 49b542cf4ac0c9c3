"""Rendering helpers shared by the commands: stderr console, progress bars, JSON on stdout."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from nfm_cli.measures.registry import SUMMARY_DIAGNOSTICS, rival_keys, summary_keys
from nfm_cli.runtime.progress import NOTE, ProgressEvent

console = Console(stderr=True)
if not console.is_terminal:  # logs and pipes: wide enough for the tables, no wrapping of names
    console = Console(stderr=True, width=140)


def plural(count: int, noun: str) -> str:
    """``1 run``, ``3 runs``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def number(value: Any, digits: int = 6) -> str:
    """A table cell: ``-`` for a missing value, a float to ``digits`` significant digits, else ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def score(value: float, signed: bool = True) -> str:
    """A correlation (``+0.123``) or a statistic (3 significant digits); ``nan`` where not finite."""
    if not math.isfinite(value):
        return "nan"
    return f"{value:+.3f}" if signed else f"{value:.3g}"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def log_interval() -> float:
    """Seconds between two log lines of the same task ($NFM_LOG_INTERVAL, default 5; 0 = every event)."""
    try:
        return max(0.0, float(os.environ.get("NFM_LOG_INTERVAL", "5")))
    except ValueError:
        return 5.0


class LogLines:
    """Progress as plain timestamped lines, for stderr that is not a terminal (batch jobs, ``2>log``).

    One line per epoch (at most one every ``interval`` seconds, the last one always), other tasks
    (Hessian samples/probes, Fisher-Rao, solver layers) at most every 6 x ``interval``, training
    batches only when nothing was logged for 12 x ``interval`` (a long epoch still shows life), and
    a line whenever a partial result is saved. Each line: time, task, done/total, the event's
    numbers, the command's elapsed time and the task's ETA at its rate in this session.
    """

    def __init__(self, write, interval: float | None = None, clock=time.monotonic, wall=time.time):
        self.write, self.clock, self.wall = write, clock, wall
        self.interval = log_interval() if interval is None else interval
        self.first: dict[str, tuple[float, int]] = {}   # task -> (time, done) its rate is measured from
        self.last_line: dict[str, float] = {}
        self.any_line = -math.inf
        self.created = clock()
        self.first_event: float | None = None

    def _gap(self, task: str) -> float:
        return {"epoch": 1, "batch": 12}.get(task, 6) * self.interval

    def __call__(self, event: ProgressEvent) -> None:
        now = self.clock()
        if self.first_event is None:
            self.first_event = now
        if event.task == NOTE:
            self._line(str(event.info.get("message", "")))
            return
        if event.task == "saved":
            self._line(f"saved progress of {event.info.get('file', 'the output')} "
                       f"({event.done}/{event.total} units); rerun the same command to resume from here")
            return
        base = self.first.get(event.task)
        if base is None or event.done < base[1]:   # a new task, or a task starting over (the next epoch's batches)
            # an epoch event arrives when the epoch is over: it started with the first event (its first batch)
            base = (self.first_event, event.done - 1) if event.task == "epoch" else (now, event.done)
            self.first[event.task] = base
        final = event.done >= event.total
        since = now - (self.any_line if event.task == "batch" else self.last_line.get(event.task, -math.inf))
        if not final and since < self._gap(event.task):
            return
        self.last_line[event.task] = now
        rate_done = event.done - base[1]
        eta = (now - base[0]) / rate_done * (event.total - event.done) if rate_done > 0 and not final else None
        info = dict(event.info)
        unit = info.pop("unit", None)
        label = event.task
        if event.task == "batch" and "epoch" in info:
            label = f"epoch {info['epoch']}/{info.get('epochs', '?')} batch"
        text = f"{label} {event.done}/{event.total}" + (f" {unit}" if unit else "")
        text += "".join(f" {k} {number(v, 3)}" for k, v in info.items()
                        if k not in ("epoch", "epochs") and v is not None)
        text += f" elapsed {_duration(now - self.created)}" + (f" eta {_duration(eta)}" if eta is not None else "")
        self._line(text)

    def _line(self, text: str) -> None:
        self.any_line = self.clock()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.wall()))
        self.write(f"{stamp} {text}\n")


def _write_stderr(text: str) -> None:
    if console.quiet:          # under torchrun, ranks > 0 stay silent
        return
    sys.stderr.write(text)
    sys.stderr.flush()


@contextlib.contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Any]:
    """A callback for the core's progress events: one rich bar per task name on a terminal, plain
    timestamped lines (``LogLines``) when stderr is a file or pipe."""
    if quiet:
        yield None
        return
    if not console.is_terminal:
        yield LogLines(_write_stderr)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
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
        if event.task == "saved":  # the bars show progress already; saves matter in logs
            return
        if not started:
            bars.start()
            started = True
        info = " ".join(f"{k}={number(v, 3)}" for k, v in event.info.items() if k not in ("epochs",) and v is not None)
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


# the totals of a measures file, in the registry's order
TOTALS = summary_keys() + SUMMARY_DIAGNOSTICS + rival_keys()


def render_summary(result: dict[str, Any], path: Path) -> None:
    """Per-layer table and totals on stderr (stdout carries the path or the JSON)."""
    render_layers(result, str(path))
    render_totals(result, "totals")


def render_layers(result: dict[str, Any], title: str) -> None:
    """One row per weight matrix: its normalized, matrix-normalized sharpness, trace, norm, solver stats."""
    trace_header = f"trace ({result.get('trace_loss') or 'ce'} loss)"
    layers = Table("layer", "shape", "normalized", "matrix-norm.", trace_header, "||W||_F^2", "iters", "residual",
                   title=title, title_justify="left")
    for name, layer in result["layers"].items():
        layers.add_row(name, "x".join(map(str, layer["shape"])), number(layer["normalized_sharpness"]),
                       number(layer["matrix_normalized_sharpness"]), number(layer["hessian_trace"]),
                       number(layer["frobenius_norm_sq"]), str(layer["iterations"]), f"{layer['residual']:.1e}")
    console.print(layers)


def render_totals(result: dict[str, Any], title: str) -> None:
    """The whole-network measures, the run's accuracies and gap, and a convergence warning."""
    totals = Table("measure", "value", title=title, title_justify="left")
    for key in TOTALS:
        if key in result:
            label = f"{key} ({result.get('trace_loss') or 'ce'} loss)" if key == "hessian_trace" else key
            totals.add_row(label, number(result[key]))
    m = result.get("metrics", {})
    totals.add_row("params left out", f"{result.get('params_left_out')} (biases, normalization)")
    totals.add_row("train / test acc, gap", f"{number(m.get('train_acc'))} / {number(m.get('test_acc'))}, "
                   f"{number(m.get('gap'))}")
    console.print(totals)
    if not result.get("converged", True):
        console.print("[yellow]warning: some layers did not converge to --tol; raise --max-iter[/yellow]")
