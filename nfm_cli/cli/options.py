"""Options shared by the commands, declared once: typed ``Annotated`` aliases and ``str`` Enums.

The choices and defaults come from the core's own lists (``nfm_cli.choices``: losses, estimators,
precisions, datasets, rescale modes, optimizers; ``nfm_models.CATALOG``: models), so a new value there
shows up in every command's ``--help`` and validation. Neither imports torch: loading the command line
and printing help stay torch-free. Ranges (``--epochs >= 1``, ...) are checked by the parser before
any work; the core checks them again in its own terms for Python callers.
"""
from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Annotated

import typer

import nfm_models
from nfm_cli.choices import (
    DATASETS,
    DEFAULT_ESTIMATOR,
    DEFAULT_PROBES,
    ESTIMATORS,
    FD_SCALE,
    HESSIAN_SAVE_EVERY_SECONDS,
    LOSS_NAMES,
    OPTIMIZERS,
    PRECISIONS,
    RESCALE_MODES,
    SOLVER_MAX_ITER,
    SOLVER_TOL,
    estimators_help,
)


def _choices(name: str, values) -> type[enum.Enum]:
    return enum.Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Loss = _choices("Loss", LOSS_NAMES)
Estimator = _choices("Estimator", ESTIMATORS)
Precision = _choices("Precision", PRECISIONS)
Model = _choices("Model", nfm_models.names())
Dataset = _choices("Dataset", DATASETS)
Mode = _choices("Mode", RESCALE_MODES)
Optimizer = _choices("Optimizer", OPTIMIZERS)


def positive(value: float | None) -> float | None:
    """Option callback: a finite number > 0 (typer has no open lower bound)."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter(f"{value} is not a positive finite number.")
    return value


def flag(*names: str, help: str) -> typer.models.OptionInfo:
    """A boolean flag for ``Annotated[bool, flag(...)] = False``: it takes no value (``--json true`` is refused)."""
    return typer.Option(*names, help=help)


CheckpointArg = Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="A complete checkpoint written by "
                                               "nfm train.", show_default=False)]
Quiet = Annotated[bool, flag("--quiet", "-q", help="No progress bars and no summary on stderr.")]
Json = Annotated[bool, flag("--json", help="Print one JSON object on stdout instead of tables.")]
Force = Annotated[bool, flag("--force", help="Start over, replacing whatever is at the output path.")]
Seed = Annotated[int, typer.Option(help="Seed of the probes and of the --samples subset.")]
Device = Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda or cuda:N.")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Folder with the dataset files, if not where "
                                                 "the checkpoint was trained.")]
Samples = Annotated[int | None, typer.Option(min=1, help="Use a seeded subset of this many training samples "
                                                "(default: the whole training set as trained).")]
BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", min=1, help="Samples per batch: more is faster and uses more memory; the result changes only "
    "at rounding level. Default: the largest power of two <= 512 whose activations fit about 2 GiB (MLP/LeNet "
    "512, WRN-16-4 64).")]
FiniteDiffScale = Annotated[float, typer.Option("--finite-diff-scale", callback=positive,
                                                help="finite-diff radius per tensor: r = scale * rms(tensor).")]
EstimatorOpt = Annotated[Estimator, typer.Option("--estimator", help=estimators_help() + ".")]
Probes = Annotated[int, typer.Option(min=1, help=f"Probes for hutchinson and finite-diff (default {DEFAULT_PROBES}); "
                                     "ignored by exact and ggn.")]
SaveEvery = Annotated[float, typer.Option("--save-every", min=0.0, metavar="SECONDS", help="Save the partial "
                                          "state this often (and when interrupted); rerunning the same command "
                                          "continues from the last save. 0: after every batch or probe. The "
                                          "interval never changes the numbers.")]
Tol = Annotated[float, typer.Option(callback=positive, help="Solver tolerance: stop when the relative "
                                    "objective change and the optimality residual are below it.")]
MaxIter = Annotated[int, typer.Option("--max-iter", min=1, help="Solver iteration cap per layer.")]

__all__ = ["BatchSize", "CheckpointArg", "DataDir", "Dataset", "DEFAULT_ESTIMATOR", "Device", "Estimator",
           "EstimatorOpt", "DEFAULT_PROBES", "FD_SCALE", "FiniteDiffScale", "Force", "HESSIAN_SAVE_EVERY_SECONDS",
           "Json", "Loss", "MaxIter", "Mode", "Model", "Optimizer", "Precision", "Probes", "Quiet", "Samples",
           "SaveEvery", "Seed", "SOLVER_MAX_ITER", "SOLVER_TOL", "Tol", "flag", "positive"]
