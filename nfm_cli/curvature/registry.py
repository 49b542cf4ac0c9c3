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
    automatic batch size), ``uses_probes`` (``--probes`` applies; otherwise the estimator is
    deterministic and walks the data once, batch by batch), ``curvature`` (what its numbers are:
    "hessian" or "gauss-newton", recorded so the two are never mixed), and ``help`` (one line for
    ``--help``). Whether a model is accepted is the class's ``check_supported(model)``."""

    name: str
    target: str
    memory_factor: int
    uses_probes: bool
    curvature: str
    help: str

    def load(self) -> type:
        """The Estimator class (imports torch)."""
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


# memory factors measured on WRN-16-4: exact ~3.6x (plus the separately bounded unfold cache); double
# backward (hutchinson) about twice that
ESTIMATORS: dict[str, EstimatorSpec] = {spec.name: spec for spec in (
    EstimatorSpec("exact", "nfm_cli.curvature.estimators:ExactEstimator", 4, False, "hessian",
                  "the exact Hessian diagonal for piecewise-linear networks (Gauss-Newton identity, per-operation "
                  "rules)"),
    EstimatorSpec("ggn", "nfm_cli.curvature.estimators:GaussNewtonEstimator", 4, False, "gauss-newton",
                  "the exact diagonal of the generalized Gauss-Newton matrix J^T H J (not the Hessian) for any "
                  "graph whose parameters enter through operations with rules (GELU, attention, LayerNorm...)"),
    EstimatorSpec("hutchinson", "nfm_cli.curvature.estimators:HutchinsonEstimator", 8, True, "hessian",
                  "mean of z * Hz over --probes Rademacher probes (eq. 60), with standard errors"),
    EstimatorSpec("finite-diff", "nfm_cli.curvature.estimators:FiniteDifferenceEstimator", 4, True, "hessian",
                  "the paper's Algorithm 1: central differences of gradients along --probes Gaussian probes"),
)}
# ``auto`` is not an estimator but a choice between two, made on the model (estimators.resolve_estimator):
# exact where the graph is piecewise linear in each weight, else ggn. Artifacts record the one used.
AUTO = "auto"
AUTO_CHOICES = ("exact", "ggn")
AUTO_HELP = "exact where the graph is piecewise linear in each weight, else ggn (the choice is printed and recorded)"
ESTIMATOR_NAMES = (AUTO, *ESTIMATORS)
DEFAULT_ESTIMATOR = AUTO


def estimator_spec(name: str) -> EstimatorSpec:
    """The spec of ``name`` (an estimator, not ``auto``: resolve that on the model first); ValueError for
    an unknown name (callers check names first)."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; one of {', '.join(ESTIMATORS)}") from None


def uses_probes(name: str) -> bool:
    """Whether ``--probes`` applies to ``name`` (``auto`` picks deterministic estimators only)."""
    return name != AUTO and estimator_spec(name).uses_probes


def estimators_help() -> str:
    """The ``--estimator`` help text: every estimator and what it computes."""
    return "; ".join([f"{AUTO}: {AUTO_HELP}"] + [f"{spec.name}: {spec.help}" for spec in ESTIMATORS.values()])
