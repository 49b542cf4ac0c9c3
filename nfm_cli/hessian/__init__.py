"""Diagonal of the Hessian of the training loss (the h of eqs. 5, 17, 59 in Tsuzuku et al., 2020).

* ``exact``       (``exact.py``): Gauss-Newton identity for piecewise-linear networks, per-layer rules.
* ``hutchinson``  (``stochastic.py``): eq. (60) with Rademacher probes and exact Hessian-vector products.
* ``finite-diff`` (``stochastic.py``): Algorithm 1 / eq. (61), central differences of gradients.
* ``estimators.py``: each estimator as a resumable sequence of work units with float64 state.
* ``driver.py``: the file-backed, resumable run (``nfm hessian-diag``) and reading its result back.
"""
from nfm_cli.choices import DEFAULT_PROBES, ESTIMATORS, FD_SCALE
from nfm_cli.hessian.driver import (
    KIND,
    SAVE_EVERY_SECONDS,
    HessianDiagonal,
    HessianResult,
    auto_batch_size,
    check_hessian_options,
    compute_hessian_diagonal,
    read_hessian_diagonal,
)
from nfm_cli.hessian.estimators import DiagonalEstimate, estimate_diagonal
from nfm_cli.hessian.exact import (
    PIECEWISE_LINEAR_LEAVES,
    RULES,
    check_exact_supported,
    exact_diagonal,
    exact_diagonal_batch,
)
from nfm_cli.hessian.stochastic import finite_difference_radii

__all__ = ["auto_batch_size", "DEFAULT_PROBES", "ESTIMATORS", "FD_SCALE", "KIND", "PIECEWISE_LINEAR_LEAVES",
           "RULES", "SAVE_EVERY_SECONDS", "DiagonalEstimate", "HessianDiagonal", "HessianResult",
           "check_exact_supported", "check_hessian_options",
           "compute_hessian_diagonal", "estimate_diagonal", "exact_diagonal", "exact_diagonal_batch",
           "finite_difference_radii", "read_hessian_diagonal"]
