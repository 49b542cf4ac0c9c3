"""``nfm sweep``: a grid of ``nfm train && nfm measure`` runs as one resumable unit.

A grid names ``nfm train`` config fields (as in the checkpoint's ``config``) and their values:
``{"lr": [1e-3, 3e-4], "width": [128, 256]}``, with the seeds apart. It expands to the product of the
values (the first field varying slowest, the seeds fastest), one run per combination, each with a
stable name made of the fields that take more than one value and the seed, e.g.
``lr=0.001-width=128-seed=0``; a field with one value is a fixed setting. Run i writes
``OUT/<name>.safetensors`` and ``OUT/<name>.measures.safetensors``. Every run is validated before any
runs, and every run skips what it finished before (train and measure leave complete files alone).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import queue
import shlex
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfm_cli.data.datasets import shared_splits
from nfm_cli.errors import NfmError
from nfm_cli.runtime import interrupt
from nfm_cli.runtime.progress import ProgressFn, report
from nfm_cli.steps.sweep_workers import WorkerPool
from nfm_cli.steps.train import TrainConfig
from nfm_cli.store.train_config import GRID_FIELDS, OPTIONAL_FIELDS, fields_of_type

# the value types of the train config's fields (``store.train_config``)
INT_FIELDS, FLOAT_FIELDS, STR_FIELDS = fields_of_type(int), fields_of_type(float), fields_of_type(str)
OPTIONAL = OPTIONAL_FIELDS


@dataclass
class Run:
    index: int
    name: str
    config: TrainConfig
    checkpoint: Path
    measures: Path


def _value(field: str, text: str) -> Any:
    text = text.strip()
    if field in OPTIONAL and text.lower() in ("none", "null", ""):
        return None
    try:
        if field in INT_FIELDS:
            return int(text)
        if field in FLOAT_FIELDS:
            return float(text)
    except ValueError:
        raise NfmError(f"grid field {field!r}: {text!r} is not a number") from None
    return text


def parse_values(field: str, text: str) -> list[Any]:
    """``a,b,c`` or an inclusive range ``start:stop:step`` (numbers only), typed for ``field``."""
    check_field(field)
    if text.count(":") == 2 and field in INT_FIELDS + FLOAT_FIELDS:
        start, stop, step = (_value("random_ratio", part) for part in text.split(":"))  # as floats
        if not (step > 0 and stop >= start):
            raise NfmError(f"grid field {field!r}: range {text!r} needs start <= stop and a positive step")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        values = [round(start + k * step, 12) for k in range(count)]
        return [int(v) for v in values] if field in INT_FIELDS else values
    values = [_value(field, part) for part in text.split(",") if part.strip() or field in OPTIONAL]
    if not values:
        raise NfmError(f"grid field {field!r} has no values")
    return values


def check_field(field: str) -> None:
    """Refuse a grid field that is not a train config field (or is the seed)."""
    if field == "seed":
        raise NfmError("give the seeds with --seeds (or \"seeds\" in the grid file), not as a grid field")
    if field not in GRID_FIELDS:
        raise NfmError(f"grid field {field!r} is not an nfm train config field; valid: {', '.join(GRID_FIELDS)}")


def parse_grid_args(args: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr=1e-3,3e-4", "width=128"]`` -> ``{"lr": [...], "width": [...]}``."""
    grid: dict[str, list[Any]] = {}
    for arg in args:
        field, sep, text = arg.partition("=")
        field = field.strip().replace("-", "_")
        if not sep:
            raise NfmError(f"--grid {arg!r}: expected FIELD=VALUES, e.g. lr=1e-3,3e-4")
        if field in grid:
            raise NfmError(f"grid field {field!r} given twice")
        grid[field] = parse_values(field, text)
    return grid


def read_grid_file(path: str | Path) -> tuple[dict[str, list[Any]], list[int] | None]:
    """A JSON or TOML file: field -> value, list of values or range ``"start:stop:step"``, and optionally
    ``seeds``."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise NfmError(f"cannot read the grid file: {str(exc).splitlines()[0][:120]}", path) from None
    if not isinstance(data, dict):
        raise NfmError("a grid file holds one object: field -> list of values (and seeds)", path)
    seeds = data.pop("seeds", None)
    grid = {}
    for field, values in data.items():
        check_field(field)
        if isinstance(values, str) and values.count(":") == 2:
            values = parse_values(field, values)          # a range, as with --grid: "0:1:0.1"
        values = values if isinstance(values, list) else [values]
        if not values:
            raise NfmError(f"grid field {field!r} has no values", path)
        grid[field] = [_value(field, str(v)) if not isinstance(v, (int, float)) or isinstance(v, bool)
                       else (int(v) if field in INT_FIELDS else float(v) if field in FLOAT_FIELDS else v)
                       for v in values]
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds)):
        raise NfmError("\"seeds\" must be a list of integers", path)
    return grid, seeds


def _label(value: Any) -> str:
    return "none" if value is None else repr(value) if isinstance(value, float) else str(value)


def expand(grid: dict[str, list[Any]], seeds: Sequence[int], out: str | Path) -> list[Run]:
    """Every run of the grid, validated (an impossible value fails here, naming its field)."""
    if not seeds:
        raise NfmError("--seeds has no values")
    if len(set(seeds)) != len(seeds):
        raise NfmError("--seeds lists a seed twice")
    out = Path(out)
    varying = [f for f, values in grid.items() if len(values) > 1]
    runs = []
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values, strict=True))
        for seed in seeds:
            config = TrainConfig(**settings, seed=seed)
            try:
                config.validate()
            except NfmError as err:
                where = ", ".join(f"{f}={_label(settings[f])}" for f in grid) or "defaults"
                raise NfmError(f"grid run {where}: {err.message}") from None
            name = "-".join([f"{f}={_label(settings[f])}" for f in varying] + [f"seed={seed}"])
            runs.append(Run(len(runs), name, config, out / f"{name}.safetensors",
                            out / f"{name}.measures.safetensors"))
    return runs


def train_args(run: Run, grid_fields: Sequence[str]) -> list[str]:
    """``nfm train`` arguments for ``run`` (the grid's fields and the seed; the rest as defaults)."""
    args = ["train", "--out", str(run.checkpoint)]
    for field in grid_fields:
        value = getattr(run.config, field)
        if value is not None:
            args += [f"--{field.replace('_', '-')}", _label(value)]
    return args + ["--seed", str(run.config.seed), "--quiet"]


def measure_args(run: Run, rivals: bool = False) -> list[str]:
    """The ``nfm measure`` arguments of one run."""
    return ["measure", str(run.checkpoint), "--out", str(run.measures)] + (["--rivals"] if rivals else [])


def command_line(run: Run, grid_fields: Sequence[str], rivals: bool = False, nfm: str = "nfm") -> str:
    """One shell line: ``nfm train ... && nfm measure ...``."""
    return " ".join(shlex.quote(a) for a in [nfm] + train_args(run, grid_fields)) + " && " + \
        " ".join(shlex.quote(a) for a in [nfm] + measure_args(run, rivals))


def describe(run: Run) -> dict[str, Any]:
    """One run as JSON: index, name, output paths and config."""
    return {"index": run.index, "name": run.name, "checkpoint": str(run.checkpoint), "measures": str(run.measures),
            "config": {k: v for k, v in dataclasses.asdict(run.config).items() if k != "NON_IDENTITY"}}


def run_one(run: Run, *, rivals: bool = False, device: str = "auto", progress: ProgressFn = None) -> Path:
    """Train (or resume, or skip) and measure one run in this process; returns the measures file."""
    from nfm_cli.steps.measure import measure_checkpoint
    from nfm_cli.steps.train import train
    from nfm_cli.store.locks import output_lock
    # the same one-writer locks as nfm train / nfm measure: a requeued task meeting a run being written refuses
    with output_lock(run.checkpoint, progress=progress, command="nfm sweep"):
        train(run.config, run.checkpoint, device=device, progress=progress)
    with output_lock(run.measures, progress=progress, command="nfm sweep"):
        measure_checkpoint(run.checkpoint, run.measures, device=device, rivals=rivals, progress=progress)
    return run.measures


def run_all(runs: Sequence[Run], grid_fields: Sequence[str], *, jobs: int = 1, rivals: bool = False,
            device: str = "auto", progress: ProgressFn = None) -> list[Path]:
    """Every run, ``jobs`` at once (worker processes, each with cores / jobs threads, each training and
    measuring its share of the runs: ``steps.sweep_workers``; one job runs in this process); finished
    work is skipped. Raises NfmError naming the failed runs at the end."""
    if jobs < 1:
        raise NfmError(f"--jobs must be at least 1, not {jobs}")
    if not runs:
        return []
    runs[0].checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if jobs == 1:
        with shared_splits():
            for i, run in enumerate(runs):
                run_one(run, rivals=rivals, device=device)
                report(progress, "runs", i + 1, len(runs), run=run.name)
        return [run.measures for run in runs]
    failures = _run_in_workers(runs, jobs, rivals, device, progress)
    if failures:
        name, error = failures[0]
        raise NfmError(f"{len(failures)} of {len(runs)} runs failed (first: {name}: {error}); "
                       "rerun the same command to retry them, finished runs are skipped")
    return [run.measures for run in runs]


def _run_in_workers(runs: Sequence[Run], jobs: int, rivals: bool, device: str,
                    progress: ProgressFn) -> list[tuple[str, str]]:
    """The runs shared by ``jobs`` worker processes; (name, error) of the failed ones, in run order.
    An interrupt stops the pool (the busy workers save) and goes on with what was stopped."""
    pool = WorkerPool(runs, jobs, max(1, (os.cpu_count() or 1) // jobs), rivals, device)
    errors: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=pool.jobs) as threads:
        feeders = [threads.submit(pool.feed, slot) for slot in range(pool.jobs)]
        try:
            for done in range(1, len(runs) + 1):
                run, error = _next_answer(pool, feeders)
                if error is not None:
                    errors[run.index] = error
                report(progress, "runs", done, len(runs), run=run.name)
        except interrupt.Interrupted as stop:
            stopped = pool.stop(stop.signum)
            raise interrupt.Interrupted(stop.signum, f"{stopped} run(s) in progress were stopped and saved "
                                        f"their progress under {runs[0].checkpoint.parent}") from None
    return [(run.name, errors[run.index]) for run in runs if run.index in errors]


def _next_answer(pool: WorkerPool, feeders) -> tuple[Run, str | None]:
    """The next (run, error) from the pool (waiting in short steps, so a signal is handled at once)."""
    while True:
        try:
            return pool.results.get(timeout=0.2)
        except queue.Empty:
            for feeder in feeders:
                if feeder.done() and feeder.exception() is not None:
                    raise feeder.exception() from None
