"""``nfm rescale``."""
from __future__ import annotations

from pathlib import Path

import typer

from nfm_cli.cli import STEPS, command
from nfm_cli.cli.lock_guard import locked, wait_option
from nfm_cli.cli.options import CheckpointArg, DataDir, Mode
from nfm_cli.cli.render import console


@command("rescale", STEPS)
def rescale_command(
    checkpoint: CheckpointArg,
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the rescaled checkpoint."),
    mode: Mode = typer.Option(..., help="layer (Dinh et al.: alpha W_k, W_k+1 / alpha), neuron (Sec. 5.1: "
                             "row i / alpha_i, column i * alpha_i, every hidden unit) or bn (conv feeding "
                             "BatchNorm, running statistics adjusted), attention (per head dimension: "
                             "query x a, key x 1/a, value x b, output column x 1/b), layernorm (gain and "
                             "bias x c, the Linear "
                             "layers that alone consume the norm x 1/c) or all (every one of these the "
                             "model has)."),
    alpha: float | None = typer.Option(None, help="One factor for everything touched."),
    random_range: tuple[float, float] | None = typer.Option(
        None, "--random-range", help="Draw a factor per unit/channel/head dimension/feature uniformly from [LO, HI]."),
    seed: int = typer.Option(0, help="Seed for --random-range."),
    pair: int = typer.Option(0, help="--mode layer: which pair of ReLU-joined weight layers (0 = first)."),
    data_dir: DataDir = None,
    wait: bool = wait_option(),
) -> None:
    """Write a function-preserving rescaled copy of a checkpoint, checked on a batch of training inputs.

    The input checkpoint is left unchanged. Normalized sharpness must not change (matrix-normalized
    sharpness only under one factor per layer, --alpha); the Hessian trace and weight norms do.
    """
    from nfm_cli.steps.rescale import rescale_checkpoint
    with locked(out, wait, "nfm rescale"):
        result = rescale_checkpoint(checkpoint, out, mode.value, alpha=alpha, random_range=random_range,
                                    seed=seed, pair=pair, data_dir=data_dir)
    console.print(f"rescaled {len(result.touched)} layers ({mode.value}); outputs unchanged up to max abs diff "
                  f"{result.max_abs_diff:.3g} (logits up to {result.max_abs_logit:.3g})")
    typer.echo(str(result.path))
