"""``nfm hessian-diag``."""
from __future__ import annotations

from pathlib import Path

import typer

from nfm_cli.cli import STEPS, command
from nfm_cli.cli.lock_guard import locked, wait_option
from nfm_cli.cli.many import CheckpointsArg, debug_requested, finish_many, outcome_printer
from nfm_cli.cli.options import (
    DEFAULT_ESTIMATOR,
    DEFAULT_PROBES,
    FD_SCALE,
    HESSIAN_SAVE_EVERY_SECONDS,
    BatchSize,
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
from nfm_cli.errors import NfmError


@command("hessian-diag", STEPS)
def hessian_diag_command(
    ctx: typer.Context,
    checkpoints: CheckpointsArg,
    out: Path | None = typer.Option(None, "--out", "-o", help="hessian-diag file to write (safetensors; default: "
                                    "CKPT's name with .hdiag-LOSS.safetensors, next to it; only with one "
                                    "checkpoint). A partial one with the same options is resumed; a complete one "
                                    "is left alone."),
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
    Several checkpoints are computed one after the other in this process, each as alone, one line each.
    """
    from nfm_cli.steps.hessian_diag import compute_hessian_diagonal
    from nfm_cli.steps.measure_many import check_distinct_outputs, count_line, each_file, exit_code
    if out is not None and len(checkpoints) > 1:
        raise NfmError(f"--out names one hessian-diag file but {len(checkpoints)} checkpoints were given; leave "
                       "it out (each gets CKPT's name with .hdiag-LOSS.safetensors) or compute them one by one")
    outs = [out or default_hdiag_path(c, loss.value) for c in checkpoints]
    check_distinct_outputs(list(zip(checkpoints, outs, strict=True)))

    def compute_one(checkpoint: Path, target: Path, progress):
        with locked(target, wait, "nfm hessian-diag"):
            return compute_hessian_diagonal(checkpoint, target, loss=loss.value, estimator=estimator.value,
                                            probes=probes, samples=samples, batch_size=batch_size, seed=seed,
                                            device=device, force=force, finite_diff_scale=finite_diff_scale,
                                            progress=progress, data_dir=data_dir, save_every_seconds=save_every)

    if len(checkpoints) == 1:
        with progress_bar(quiet) as progress:
            result = compute_one(checkpoints[0], outs[0], progress)
        _say(result, quiet)
        typer.echo(str(outs[0]))
        return
    targets = dict(zip(checkpoints, outs, strict=True))
    printer = outcome_printer(len(checkpoints), False, quiet, _row_fields, HDIAG_COLUMNS)
    with progress_bar(quiet) as progress:
        outcomes = each_file(checkpoints, lambda c: compute_one(c, targets[c], progress), on_outcome=printer,
                             raise_internal=debug_requested(ctx), progress=progress)
    finish_many(outcomes, quiet, count_line(outcomes, done="computed"), exit_code(outcomes))


HDIAG_COLUMNS = (("trace", "trace", 12, 6), ("negative", "negative %", 10, 3))


def default_hdiag_path(checkpoint: Path, loss: str) -> Path:
    """``run.safetensors`` -> ``run.hdiag-<loss>.safetensors`` in the same folder."""
    stem = checkpoint.name[: -len(".safetensors")] if checkpoint.name.endswith(".safetensors") else checkpoint.name
    return checkpoint.with_name(f"{stem}.hdiag-{loss}.safetensors")


def _say(result, quiet: bool) -> None:
    if result.status == "already complete":
        console.print(f"{result.path}: already complete; use --force to recompute")
    elif not quiet:
        m = result.metrics
        extra = f", {m['degenerate_samples']} samples with constant logits" if m.get("degenerate_samples") else ""
        console.print(f"{result.status} {result.config['estimator']} {result.config['loss']} diagonal of "
                      f"{m.get('parameters', 0)} parameters over {result.config['samples']} samples in "
                      f"{result.wall_time:.1f}s: trace {m.get('trace_total', float('nan')):.4g}, "
                      f"{100 * m.get('negative_fraction', 0.0):.2g}% negative entries{extra}")


def _row_fields(result) -> dict:
    m = result.metrics
    negative = m.get("negative_fraction")
    return {"status": f"{result.status}", "path": result.path, "trace": m.get("trace_total"),
            "negative": None if negative is None else 100 * negative}
