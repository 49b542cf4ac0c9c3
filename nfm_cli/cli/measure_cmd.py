"""``nfm measure``, and ``finish``: the JSON or summary table it shares with ``nfm solve-variance``."""
from __future__ import annotations

from pathlib import Path

import typer

from nfm_cli.cli import WORKFLOW, command
from nfm_cli.cli.lock_guard import locked, wait_option
from nfm_cli.cli.many import CheckpointsArg, debug_requested, finish_many, outcome_printer
from nfm_cli.cli.options import (
    DEFAULT_ESTIMATOR,
    DEFAULT_PROBES,
    FD_SCALE,
    HESSIAN_SAVE_EVERY_SECONDS,
    SOLVER_MAX_ITER,
    SOLVER_TOL,
    BatchSize,
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
from nfm_cli.errors import NfmError


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
    ctx: typer.Context,
    checkpoints: CheckpointsArg,
    out: Path | None = typer.Option(None, "--out", "-o", help="Measures file (default: CKPT's name with "
                                       ".measures.safetensors, next to it); only with one checkpoint."),
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
    """Normalized sharpness and its rivals of checkpoints: Hessian diagonals, Fisher-Rao norm, solve.

    Several checkpoints are measured one after the other in this process, each exactly as alone (same
    outputs, locks, resume and refusals): one line per file on stderr (one JSON object per line on stdout
    with --json); a failing file gets its error line, the others go on, and the exit status is non-zero.

    Ctrl-C or SIGTERM saves the Hessian in progress and exits (130 / 143); rerun the same command to resume.
    """
    from nfm_cli.steps.measure import default_measures_path, measure_checkpoint
    from nfm_cli.steps.measure_many import check_distinct_outputs, count_line, each_file, exit_code
    if out is not None and len(checkpoints) > 1:
        raise NfmError(f"--out names one measures file but {len(checkpoints)} checkpoints were given; leave it "
                       "out (each gets CKPT's name with .measures.safetensors) or measure them one by one")
    check_distinct_outputs([(c, out or default_measures_path(c)) for c in checkpoints])

    def measure_one(checkpoint: Path, progress) -> object:
        # one lock for the measures file and its kept Hessian files (named after it)
        with locked(out or default_measures_path(checkpoint), wait, "nfm measure"):
            return measure_checkpoint(checkpoint, out, estimator=estimator.value, samples=samples, probes=probes,
                                      batch_size=batch_size, seed=seed, device=device, precision=precision.value,
                                      keep_intermediate=keep_intermediate, tol=tol, max_iter=max_iter,
                                      force=force, rivals=rivals, finite_diff_scale=finite_diff_scale,
                                      data_dir=data_dir, save_every_seconds=save_every, progress=progress)

    if len(checkpoints) == 1:
        with progress_bar(quiet or as_json) as progress:
            result = measure_one(checkpoints[0], progress)
        _say_status(result, as_json or quiet)
        finish(result, as_json, quiet)
        return
    printer = outcome_printer(len(checkpoints), as_json, quiet, _row_fields)
    with progress_bar(quiet or as_json) as progress:
        outcomes = each_file(checkpoints, lambda c: measure_one(c, progress), on_outcome=printer,
                             raise_internal=debug_requested(ctx), progress=progress)
    finish_many(outcomes, quiet or as_json, count_line(outcomes), exit_code(outcomes))


def _say_status(result, silent: bool) -> None:
    if result.status == "already complete" and not silent:
        console.print(f"{result.path}: already complete; use --force to recompute")
    elif result.status == "rivals added" and not silent:
        console.print(f"{result.path}: rival measures added")


def _row_fields(result) -> dict:
    """A measures result's row in the many-checkpoint table, and its JSON line's keys."""
    r = result.result
    return {"status": result.status, "path": result.path, "normalized": r.get("normalized_sharpness"),
            "trace": r.get("hessian_trace"), "gap": (r.get("metrics") or {}).get("gap"), "json": r}
