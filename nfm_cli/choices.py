"""The values the core's options accept, and their defaults, in one module that imports no torch.

The command line lists them (choices and defaults in ``--help``, checked by the parser) without
loading torch; each core module imports its own from here or from its package's torch-free registry
(estimators: ``curvature.registry``; datasets: ``data.registry``; measures: ``measures.registry``), and
checks against them for Python callers (``losses.LOSS_NAMES`` is ``choices.LOSS_NAMES``). The model names are
``nfm_models.CATALOG``'s.
"""
from __future__ import annotations

from nfm_cli.curvature.registry import (  # noqa: F401  (re-exported for the CLI)
    DEFAULT_ESTIMATOR,
    DEFAULT_PROBES,
    FD_SCALE,
    estimators_help,
)
from nfm_cli.curvature.registry import ESTIMATOR_NAMES as ESTIMATORS
from nfm_cli.data.registry import DATASET_NAMES as DATASETS

LOSS_NAMES = ("normalized-ce", "ce")                     # losses: what a Hessian diagonal is of
HESSIAN_SAVE_EVERY_SECONDS = 60.0                        # steps.hessian_diag: partial state saved this often
TRAIN_SAVE_EVERY_SECONDS = 60.0                          # steps.train: the checkpoint saved this often
PRECISIONS = ("float32", "float64")                      # steps.measure: the torch dtypes of these names
OPTIMIZERS = ("adam", "sgd", "adamw")                    # steps.train
RESCALE_MODES = ("layer", "neuron", "bn", "attention", "layernorm", "all")  # steps.rescale
REPORT_GROUP_BY = ("model", "dataset")                   # report: run fields that split groups by default
SOLVER_TOL = 1e-10                                       # measures.variance: relative tolerance of (17)
SOLVER_MAX_ITER = 10_000                                 # measures.variance: block sweeps per layer at most

__all__ = ["DATASETS", "DEFAULT_ESTIMATOR", "DEFAULT_PROBES", "ESTIMATORS", "FD_SCALE", "HESSIAN_SAVE_EVERY_SECONDS",
           "LOSS_NAMES", "OPTIMIZERS", "PRECISIONS", "REPORT_GROUP_BY", "RESCALE_MODES", "SOLVER_MAX_ITER",
           "SOLVER_TOL", "TRAIN_SAVE_EVERY_SECONDS", "estimators_help"]
