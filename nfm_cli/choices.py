"""The values the core's options accept, and their defaults, in one module that imports no torch.

The command line lists them (choices and defaults in ``--help``, checked by the parser) without
loading torch; each core module imports its own from here and checks against them for Python callers
(``losses.LOSS_NAMES`` is ``choices.LOSS_NAMES``). The model names are ``nfm_models.CATALOG``'s.
"""
from __future__ import annotations

from nfm_cli.measure_registry import summary_keys

LOSS_NAMES = ("normalized-ce", "ce")                     # losses: what a Hessian diagonal is of
ESTIMATORS = ("exact", "hutchinson", "finite-diff")     # hessian.estimators
DEFAULT_PROBES = 100                                     # hessian: probes of hutchinson and finite-diff
FD_SCALE = 0.1                                           # hessian.stochastic: finite-diff radius / rms(tensor)
HESSIAN_SAVE_EVERY_SECONDS = 60.0                        # hessian.driver: partial state saved this often
TRAIN_SAVE_EVERY_SECONDS = 60.0                          # training: the checkpoint saved this often
PRECISIONS = ("float32", "float64")                      # measuring: the torch dtypes of these names
DATASETS = ("mnist", "fashion-mnist", "cifar10", "synthetic")   # data: the registered datasets
OPTIMIZERS = ("adam", "sgd")                             # training
RESCALE_MODES = ("layer", "neuron", "bn")                # rescale
REPORT_MEASURES = summary_keys()                         # report: the measures correlated by default
REPORT_GROUP_BY = ("model", "dataset")                   # report: run fields that split groups by default
