"""``nfm hessian-diag``."""
from __future__ import annotations

from pathlib import Path

import typer

from nfm_cli.cli import STEPS, command
from nfm_cli.cli.lock_guard import locked, wait_option
from nfm_cli.cli.options import (
    DEFAULT_ESTIMATOR,
    DEFAULT_PROBES,
    FD_SCALE,
    HESSIAN_SAVE_EVERY_SECONDS,
    BatchSize,
    CheckpointArg,
    DataDir,
    Device,
    Estimator,
    EstimatorOpt,
    FiniteDiffScale,
    Force,
    Loss,
    Probes,
    Quiet,
    Samples,
    SaveEvery,
    Seed,
)
from nfm_cli.cli.render import console, progress_bar


@command("hessian-diag", STEPS)
def hessian_diag_command(
    checkpoint: CheckpointArg,
    out: Path = typer.Option(..., "--out", "-o", help="hessian-diag file to write (safetensors). A partial one "
                             "with the same options is resumed; a complete one is left alone."),
    loss: Loss = typer.Option(Loss("normalized-ce"), help="normalized-ce (eqs. 20-22, for normalized sharpness) "
                              "or ce (plain cross-entropy, for the Hessian-trace baseline)."),
    estimator: EstimatorOpt = Estimator(DEFAULT_ESTIMATOR),
    probes: Probes = DEFAULT_PROBES,
    samples: Samples = None,
    batch_size: BatchSize = None,
    seed: Seed = 0,
    finite_diff_scale: FiniteDiffScale = FD_SCALE,
    device: Device = "auto",
    data_dir: DataDir = None,
    save_every: SaveEvery = HESSIAN_SAVE_EVERY_SECONDS,
    force: Force = False,
    quiet: Quiet = False,
    wait: bool = wait_option(),
) -> None:
    """Diagonal of the Hessian of the mean training loss, one tensor per parameter (eq. 5; h in eq. 17).

    Uses the checkpoint's training set exactly as trained (random labels included), model in eval mode.

    Saves its progress every minute (--save-every), and on Ctrl-C or SIGTERM (after the batch in progress;
    exit 130 / 143, also under torchrun); rerun the same command to continue. Prints the output path on stdout.
    """
    from nfm_cli.steps.hessian_diag import compute_hessian_diagonal
    with locked(out, wait, "nfm hessian-diag"), progress_bar(quiet) as progress:
        result = compute_hessian_diagonal(checkpoint, out, loss=loss.value, estimator=estimator.value,
                                          probes=probes, samples=samples, batch_size=batch_size, seed=seed,
                                          device=device, force=force, finite_diff_scale=finite_diff_scale,
                                          progress=progress, data_dir=data_dir, save_every_seconds=save_every)
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
