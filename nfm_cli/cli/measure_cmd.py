"""``nfm solve-variance`` and ``nfm measure``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from nfm_cli.cli import app
from nfm_cli.cli.locking import locked, wait_option
from nfm_cli.cli.render import console, print_json, progress_bar
from nfm_cli.pipeline import default_measures_path, measure_checkpoint, solve_variance

TOTALS = ("normalized_sharpness", "matrix_normalized_sharpness", "hessian_trace", "fisher_rao_norm",
          "frobenius_norm_sq", "spectral_norm_product", "clipped_fraction", "pacbayes_flatness",
          "pacbayes_mag_flatness", "sharpness_worst", "sharpness_mag_worst", "adaptive_sharpness")


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


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
        layers.add_row(name, "x".join(map(str, layer["shape"])), _number(layer["normalized_sharpness"]),
                       _number(layer["matrix_normalized_sharpness"]), _number(layer["hessian_trace"]),
                       _number(layer["frobenius_norm_sq"]), str(layer["iterations"]), f"{layer['residual']:.1e}")
    console.print(layers)


def render_totals(result: dict[str, Any], title: str) -> None:
    """The whole-network measures, the run's accuracies and gap, and a convergence warning."""
    totals = Table("measure", "value", title=title, title_justify="left")
    for key in TOTALS:
        if key in result:
            label = f"{key} ({result.get('trace_loss') or 'ce'} loss)" if key == "hessian_trace" else key
            totals.add_row(label, _number(result[key]))
    m = result.get("metrics", {})
    totals.add_row("params left out", f"{result.get('params_left_out')} (biases, normalization)")
    totals.add_row("train / test acc, gap", f"{_number(m.get('train_acc'))} / {_number(m.get('test_acc'))}, "
                   f"{_number(m.get('gap'))}")
    console.print(totals)
    if not result.get("converged", True):
        console.print("[yellow]warning: some layers did not converge to --tol; raise --max-iter[/yellow]")


@app.command("solve-variance")
def solve_variance_command(
    checkpoint: Path = typer.Argument(..., help="The checkpoint the Hessian diagonal was computed from."),
    hdiag: Path = typer.Argument(..., help="hessian-diag file (normalized-ce for the paper's measures)."),
    out: Path = typer.Option(..., "--out", "-o", help="Measures file to write."),
    trace_hdiag: Optional[Path] = typer.Option(None, "--trace-hdiag", help="A second hessian-diag file (e.g. "
                                               "--loss ce, Sec. 6.2) whose trace is reported; default: HDIAG."),
    tol: float = typer.Option(1e-10, help="Stop when the relative objective change and optimality residual are below."),
    max_iter: int = typer.Option(10_000, "--max-iter", help="Iteration cap per layer."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
    wait: bool = wait_option(),
) -> None:
    """Solve problem (17) per weight matrix (lambda = 1/2, h clipped at 0) and compute the rival measures."""
    with locked(out, wait, "nfm solve-variance"), progress_bar(as_json) as progress:
        result = solve_variance(checkpoint, hdiag, out, trace_hdiag=trace_hdiag, tol=tol, max_iter=max_iter,
                                progress=progress)
    _finish(result, as_json)


@app.command("measure")
def measure_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to measure."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Measures file (default: CKPT's name with "
                                       ".measures.safetensors, next to it)."),
    estimator: str = typer.Option("exact", help="exact, hutchinson or finite-diff (see hessian-diag)."),
    samples: Optional[int] = typer.Option(None, help="Seeded subset of the training set (default: all)."),
    probes: int = typer.Option(100, help="Probes for the stochastic estimators."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per batch (memory vs speed)."),
    seed: int = typer.Option(0, help="Seed for --samples and probes."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu or cuda."),
    precision: str = typer.Option("float32", help="float32 (as trained) or float64 (slower; rounding-free "
                                  "comparisons, e.g. invariance checks on deep nets)."),
    keep_intermediate: bool = typer.Option(True, "--keep-intermediate/--no-keep-intermediate",
                                           help="Keep the two hessian-diag files next to the output (default), "
                                           "so a killed measure resumes without redoing finished work."),
    tol: float = typer.Option(1e-10, help="Solver tolerance."),
    max_iter: int = typer.Option(10_000, "--max-iter", help="Solver iteration cap per layer."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the outputs exist."),
    rivals: bool = typer.Option(False, "--rivals", help="Also the rival sharpness measures of the literature "
                                "(PAC-Bayes flatness and its magnitude-aware form, worst-case and magnitude-aware "
                                "worst-case sharpness, adaptive sharpness; seeded by --seed, on the same samples; "
                                "see README). Added to an existing measures file without recomputing the rest."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object on stdout."),
    wait: bool = wait_option(),
) -> None:
    """Normalized sharpness and its rivals of one checkpoint: Hessian diagonals, Fisher-Rao norm, solve.

    Ctrl-C or SIGTERM saves the Hessian in progress and exits (130 / 143); rerun the same command to resume.
    """
    # one lock for the measures file and its kept Hessian files (named after it)
    lock = locked(out or default_measures_path(checkpoint), wait, "nfm measure")
    with lock, progress_bar(as_json) as progress:
        result = measure_checkpoint(checkpoint, out, estimator=estimator, samples=samples, probes=probes,
                                    batch_size=batch_size, seed=seed, device=device,
                                    precision=precision, keep_intermediate=keep_intermediate, tol=tol, max_iter=max_iter,
                                    force=force, rivals=rivals, progress=progress)
    if result.status == "already complete" and not as_json:
        console.print(f"{result.path}: already complete; use --force to recompute")
    elif result.status == "rivals added" and not as_json:
        console.print(f"{result.path}: rival measures added")
    _finish(result, as_json)


def _finish(result, as_json: bool) -> None:
    if as_json:
        print_json(dict(result.result, path=str(result.path)))
        return
    render_summary(result.result, result.path)
    typer.echo(str(result.path))
