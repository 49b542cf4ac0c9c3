"""The Hessian-diagonal estimators by name: the one list that choices, help texts, memory planning and
the exact-only code paths are derived from. Torch-free, so ``nfm --help`` can list them.

Adding an estimator: one ``EstimatorSpec`` here, its class in its own module (a subclass of
``curvature.estimators.Estimator``), and its tests.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

DEFAULT_PROBES = 100        # probes of the stochastic estimators
FD_SCALE = 0.1              # finite-diff radius / rms(tensor) (stochastic.finite_difference_radii)


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator: ``name`` (the option value), ``target`` ("module:Class" of its Estimator),
    ``memory_factor`` (live memory per sample in units of one forward pass's layer outputs, for the
    automatic batch size), ``uses_probes`` (``--probes`` applies), ``exact`` (deterministic, no probes;
    the model must pass ``check_supported``), and ``help`` (one line for ``--help``)."""

    name: str
    target: str
    memory_factor: int
    uses_probes: bool
    exact: bool
    help: str

    def load(self) -> type:
        """The Estimator class (imports torch)."""
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


# memory factors measured on WRN-16-4: exact ~3.6x (plus the separately bounded unfold cache); double
# backward (hutchinson) about twice that
ESTIMATORS: dict[str, EstimatorSpec] = {spec.name: spec for spec in (
    EstimatorSpec("exact", "nfm_cli.curvature.estimators:ExactEstimator", 4, False, True,
                  "the exact diagonal for piecewise-linear networks (Gauss-Newton identity, per-layer rules)"),
    EstimatorSpec("hutchinson", "nfm_cli.curvature.estimators:HutchinsonEstimator", 8, True, False,
                  "mean of z * Hz over --probes Rademacher probes (eq. 60), with standard errors"),
    EstimatorSpec("finite-diff", "nfm_cli.curvature.estimators:FiniteDifferenceEstimator", 4, True, False,
                  "the paper's Algorithm 1: central differences of gradients along --probes Gaussian probes"),
)}
ESTIMATOR_NAMES = tuple(ESTIMATORS)
DEFAULT_ESTIMATOR = "exact"


def estimator_spec(name: str) -> EstimatorSpec:
    """The spec of ``name``; ValueError for an unknown name (callers check names first)."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; one of {', '.join(ESTIMATOR_NAMES)}") from None


def estimators_help() -> str:
    """The ``--estimator`` help text: every estimator and what it computes."""
    return "; ".join(f"{spec.name}: {spec.help}" for spec in ESTIMATORS.values())
