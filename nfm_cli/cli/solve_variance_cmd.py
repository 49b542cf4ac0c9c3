"""``nfm solve-variance``."""
from __future__ import annotations

from pathlib import Path

import typer

from nfm_cli.cli import STEPS, command
from nfm_cli.cli.lock_guard import locked, wait_option
from nfm_cli.cli.measure_cmd import finish
from nfm_cli.cli.options import SOLVER_MAX_ITER, SOLVER_TOL, CheckpointArg, Json, MaxIter, Quiet, Tol
from nfm_cli.cli.render import progress_bar


@command("solve-variance", STEPS)
def solve_variance_command(
    checkpoint: CheckpointArg,
    hdiag: Path = typer.Argument(..., metavar="HDIAG", help="hessian-diag file of CHECKPOINT (normalized-ce for "
                                 "the paper's measures)."),
    out: Path = typer.Option(..., "--out", "-o", help="Measures file to write."),
    trace_hdiag: Path | None = typer.Option(None, "--trace-hdiag", help="A second hessian-diag file (e.g. "
                                               "--loss ce, Sec. 6.2) whose trace is reported; default: HDIAG."),
    tol: Tol = SOLVER_TOL,
    max_iter: MaxIter = SOLVER_MAX_ITER,
    as_json: Json = False,
    quiet: Quiet = False,
    wait: bool = wait_option(),
) -> None:
    """Solve problem (17) per weight matrix (lambda = 1/2, h clipped at 0) and compute the rival measures."""
    from nfm_cli.steps.solve import solve_variance
    with locked(out, wait, "nfm solve-variance"), progress_bar(quiet or as_json) as progress:
        result = solve_variance(checkpoint, hdiag, out, trace_hdiag=trace_hdiag, tol=tol, max_iter=max_iter,
                                progress=progress)
    finish(result, as_json, quiet)
