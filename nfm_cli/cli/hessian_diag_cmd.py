"""``nfm hessian-diag``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from nfm_cli.cli import app
from nfm_cli.cli.locking import locked, wait_option
from nfm_cli.cli.render import console, progress_bar
from nfm_cli.hessian import DEFAULT_PROBES, FD_SCALE, compute_hessian_diagonal


@app.command("hessian-diag")
def hessian_diag_command(
    checkpoint: Path = typer.Argument(..., help="A complete checkpoint written by nfm train."),
    out: Path = typer.Option(..., "--out", "-o", help="hessian-diag file to write (safetensors). A partial one "
                             "with the same options is resumed; a complete one is left alone."),
    loss: str = typer.Option("normalized-ce", help="normalized-ce (eqs. 20-22, for normalized sharpness) or ce "
                             "(plain cross-entropy, for the Hessian-trace baseline)."),
    estimator: str = typer.Option("exact", help="exact (Gauss-Newton identity, piecewise-linear networks), "
                                  "hutchinson (Rademacher probes, exact Hessian-vector products) or finite-diff "
                                  "(the paper's Algorithm 1)."),
    probes: Optional[int] = typer.Option(None, help=f"Probes for hutchinson and finite-diff (default "
                                         f"{DEFAULT_PROBES}); ignored by exact."),
    samples: Optional[int] = typer.Option(None, help="Use a seeded subset of this many training samples "
                                          "(default: the whole training set as trained)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per batch: more is faster "
                                             "and uses more memory; the result changes only at rounding level. "
                                             "Default: the largest power of two <= 512 whose activations fit "
                                             "about 2 GiB (MLP/LeNet 512, WRN-16-4 64)."),
    seed: int = typer.Option(0, help="Seed of the probes and of the --samples subset."),
    finite_diff_scale: float = typer.Option(FD_SCALE, "--finite-diff-scale", help="finite-diff radius per tensor: "
                                            "r = scale * rms(tensor)."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu or cuda."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder with the dataset files, if not "
                                            "where the checkpoint was trained."),
    force: bool = typer.Option(False, "--force", help="Start over, replacing whatever is at --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    wait: bool = wait_option(),
) -> None:
    """Diagonal of the Hessian of the mean training loss, one tensor per parameter (eq. 5; h in eq. 17).

    Uses the checkpoint's training set exactly as trained (random labels included), model in eval mode.

    Saves its progress every minute, and on Ctrl-C or SIGTERM (after the batch in progress; exit 130 /
    143, also under torchrun); rerun the same command to continue. Prints the output path on stdout.
    """
    with locked(out, wait, "nfm hessian-diag"), progress_bar(quiet) as progress:
        result = compute_hessian_diagonal(checkpoint, out, loss=loss, estimator=estimator, probes=probes,
                                          samples=samples, batch_size=batch_size, seed=seed, device=device,
                                          force=force, finite_diff_scale=finite_diff_scale, progress=progress,
                                          data_dir=data_dir)
    if result.status == "already complete":
        console.print(f"{out}: already complete; use --force to recompute")
    elif not quiet:
        m = result.metrics
        extra = f", {m['degenerate_samples']} samples with constant logits" if m.get("degenerate_samples") else ""
        console.print(f"{result.status} {result.config['estimator']} {result.config['loss']} diagonal of "
                      f"{m.get('parameters', 0)} parameters over {result.config['samples']} samples in "
                      f"{result.wall_time:.1f}s: trace {m.get('trace_total', float('nan')):.4g}, "
                      f"{100 * m.get('negative_fraction', 0.0):.2g}% negative entries{extra}")
    typer.echo(str(out))
