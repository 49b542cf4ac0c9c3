"""``nfm measure``, and ``finish``: the JSON or summary table it shares with ``nfm solve-variance``."""
from __future__ import annotations

from pathlib import Path

import typer

from nfm_cli.cli import WORKFLOW, command
from nfm_cli.cli.lock_guard import locked, wait_option
from nfm_cli.cli.options import (
    DEFAULT_ESTIMATOR,
    DEFAULT_PROBES,
    FD_SCALE,
    HESSIAN_SAVE_EVERY_SECONDS,
    SOLVER_MAX_ITER,
    SOLVER_TOL,
    BatchSize,
    CheckpointArg,
    DataDir,
    Device,
    Estimator,
    EstimatorOpt,
    FiniteDiffScale,
    Force,
    Json,
    MaxIter,
    Precision,
    Probes,
    Quiet,
    Samples,
    SaveEvery,
    Seed,
    Tol,
)
from nfm_cli.cli.render import console, print_json, progress_bar, render_summary


def finish(result, as_json: bool, quiet: bool = False) -> None:
    """JSON on stdout, or the summary on stderr (unless quiet) and the path on stdout."""
    if as_json:
        print_json(dict(result.result, path=str(result.path)))
        return
    if not quiet:
        render_summary(result.result, result.path)
    typer.echo(str(result.path))


@command("measure", WORKFLOW)
def measure_command(
    checkpoint: CheckpointArg,
    out: Path | None = typer.Option(None, "--out", "-o", help="Measures file (default: CKPT's name with "
                                       ".measures.safetensors, next to it)."),
    estimator: EstimatorOpt = Estimator(DEFAULT_ESTIMATOR),
    samples: Samples = None,
    probes: Probes = DEFAULT_PROBES,
    batch_size: BatchSize = None,
    seed: Seed = 0,
    finite_diff_scale: FiniteDiffScale = FD_SCALE,
    device: Device = "auto",
    precision: Precision = typer.Option(Precision("float32"), help="float32 (as trained) or float64 (slower; "
                                        "rounding-free comparisons, e.g. invariance checks on deep nets)."),
    keep_intermediate: bool = typer.Option(True, "--keep-intermediate/--no-keep-intermediate",
                                           help="Keep the two hessian-diag files next to the output (default), "
                                           "so a killed measure resumes without redoing finished work."),
    tol: Tol = SOLVER_TOL,
    max_iter: MaxIter = SOLVER_MAX_ITER,
    data_dir: DataDir = None,
    save_every: SaveEvery = HESSIAN_SAVE_EVERY_SECONDS,
    force: Force = False,
    rivals: bool = typer.Option(False, "--rivals", help="Also the rival sharpness measures of the literature "
                                "(PAC-Bayes flatness and its magnitude-aware form, worst-case and magnitude-aware "
                                "worst-case sharpness, adaptive sharpness; seeded by --seed, on the same samples; "
                                "see README). Added to an existing measures file without recomputing the rest."),
    as_json: Json = False,
    quiet: Quiet = False,
    wait: bool = wait_option(),
) -> None:
    """Normalized sharpness and its rivals of one checkpoint: Hessian diagonals, Fisher-Rao norm, solve.

    Ctrl-C or SIGTERM saves the Hessian in progress and exits (130 / 143); rerun the same command to resume.
    """
    from nfm_cli.steps.measure import default_measures_path, measure_checkpoint
    # one lock for the measures file and its kept Hessian files (named after it)
    lock = locked(out or default_measures_path(checkpoint), wait, "nfm measure")
    with lock, progress_bar(quiet or as_json) as progress:
        result = measure_checkpoint(checkpoint, out, estimator=estimator.value, samples=samples, probes=probes,
                                    batch_size=batch_size, seed=seed, device=device, precision=precision.value,
                                    keep_intermediate=keep_intermediate, tol=tol, max_iter=max_iter, force=force,
                                    rivals=rivals, finite_diff_scale=finite_diff_scale, data_dir=data_dir,
                                    save_every_seconds=save_every, progress=progress)
    if result.status == "already complete" and not as_json and not quiet:
        console.print(f"{result.path}: already complete; use --force to recompute")
    elif result.status == "rivals added" and not as_json and not quiet:
        console.print(f"{result.path}: rival measures added")
    finish(result, as_json, quiet)
