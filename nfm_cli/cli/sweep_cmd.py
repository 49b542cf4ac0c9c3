"""``nfm sweep``."""
from __future__ import annotations

from pathlib import Path

import typer

from nfm_cli.cli import WORKFLOW, NfmCommand, app, command
from nfm_cli.cli.many import debug_requested
from nfm_cli.cli.render import console, print_json, progress_bar
from nfm_cli.errors import NfmError


@command("sweep", WORKFLOW)
def sweep_command(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the runs' checkpoints and measures files "
                             "(created if missing)."),
    grid: list[str] | None = typer.Option(None, "--grid", help="FIELD=VALUES, repeatable: an nfm train config "
                                             "field (as in the checkpoint config) and its values, comma-separated "
                                             "(lr=1e-3,3e-4) or an inclusive range start:stop:step "
                                             "(random_ratio=0:1:0.1); one value fixes a setting."),
    grid_file: Path | None = typer.Option(None, "--grid-file", help="The grid as a JSON or TOML file: "
                                             "field = value or list of values, and optionally seeds = [...]."),
    seeds: str | None = typer.Option(None, "--seeds", help="Comma-separated seeds, one run each per grid "
                                        "point (default 0, or the grid file's)."),
    list_runs: bool = typer.Option(False, "--list", help="Print one `nfm train ... && nfm measure ...` line per "
                                   "run (for xargs -P, GNU parallel, job arrays) and run nothing."),
    index: int | None = typer.Option(None, "--index", help="Run only run INDEX (0-based, in --list order), "
                                        "e.g. $SLURM_ARRAY_TASK_ID."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Runs at once: N worker processes, each with cores / N "
                             "threads, each training and measuring its share of the runs (1: in this process)."),
    rivals: bool = typer.Option(False, "--rivals", help="Measure the rival measures too (nfm measure --rivals)."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="With --list: the runs as one JSON object instead."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train and measure a grid of runs as one resumable unit: every run is validated first, finished
    runs are skipped, and the same runs can be listed for any scheduler."""
    from nfm_cli.steps.sweep import command_line, describe, expand, parse_grid_args, read_grid_file, run_all, run_one
    spec, file_seeds = read_grid_file(grid_file) if grid_file is not None else ({}, None)
    for field, values in parse_grid_args(grid or []).items():
        if field in spec:
            raise NfmError(f"grid field {field!r} is in both --grid and the grid file")
        spec[field] = values
    seed_list = _seeds(seeds) if seeds is not None else (file_seeds or [0])
    runs = expand(spec, seed_list, out)
    fields = list(spec)
    if list_runs:
        if as_json:
            print_json({"runs": [dict(describe(r), command=command_line(r, fields, rivals)) for r in runs]})
        else:
            for run in runs:
                typer.echo(command_line(run, fields, rivals))
        return
    if index is not None:
        if not 0 <= index < len(runs):
            raise NfmError(f"--index {index} is outside the grid's {len(runs)} runs (0 to {len(runs) - 1})")
        out.mkdir(parents=True, exist_ok=True)
        with progress_bar(quiet) as progress:
            typer.echo(str(run_one(runs[index], rivals=rivals, device=device, progress=progress)))
        return
    with progress_bar(quiet) as progress:
        paths = run_all(runs, fields, jobs=jobs, rivals=rivals, device=device, progress=progress)
    if not quiet:
        console.print(f"{len(paths)} runs measured in {out}", markup=False, highlight=False)
    for path in paths:
        typer.echo(str(path))


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise NfmError(f"--seeds must be comma-separated integers, not {text!r}") from None


@app.command("sweep-worker", hidden=True, cls=NfmCommand)
def sweep_worker_command(ctx: typer.Context) -> None:
    """A worker of ``nfm sweep --jobs N`` (started by it, not by hand): runs read on stdin, one
    answer line each on stdout (``nfm_cli.steps.sweep_workers``)."""
    import sys

    from nfm_cli.steps.sweep_workers import serve
    serve(iter(sys.stdin.readline, ""), lambda line: (sys.stdout.write(line), sys.stdout.flush()),
          raise_internal=debug_requested(ctx))
