"""Flatness measures of one checkpoint from its Hessian diagonal(s): the normalized sharpness and its rivals.

Per weight matrix (``matrices.py``: Linear ``[out, in]``; Conv ``[out, in, kh, kw]`` with h and W^2 summed
over the kernel positions, Sec. 5.3; a grouped conv as its block-diagonal [out, in] matrix; attention's
Q/K/V; Embedding), with h the
Hessian diagonal of the ``normalized-ce`` loss (20)-(22) clipped at 0 (Algorithm 1) and lambda = 1/2:

- ``normalized_sharpness``: sum over layers of S_l, the minimum of (17) (``variance.solve_layer``);
- ``matrix_normalized_sharpness``: sum of 2 sqrt(||W||_F^2 H) (eq. 13 with the same lambda
  convention, one sigma per matrix), so S_l <= its matrix-normalized value for every layer;
- ``hessian_trace``: eq. (5), the sum of the raw diagonal over all parameters (of the ``ce``
  Hessian when one is given, as in Sec. 6.2), and ``hessian_trace_weights`` over weight matrices only;
- ``clipped_fraction``: the share of the diagonal's absolute mass over weight matrices that was
  negative and clipped;
- ``frobenius_norm_sq``: sum of squared Frobenius norms; ``spectral_norm_product``: product of the
  spectral norms of the weight matrices (conv reshaped to out x in*kh*kw), also as its log;
- ``params_left_out``: parameters outside weight matrices (biases, normalization; footnote 5).

``fisher_rao_norm`` (eq. 25) needs per-sample gradients and comes from ``fisher_rao``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import scipy.linalg
import torch
from torch import nn

from nfm_cli.choices import SOLVER_MAX_ITER, SOLVER_TOL
from nfm_cli.errors import NfmError
from nfm_cli.measures.matrices import WeightMatrix, weight_matrices
from nfm_cli.measures.variance import LayerSolution, matrix_normalized_layer, solve_layer, to_matrix
from nfm_cli.runtime.progress import ProgressFn, report


def spectral_norm(matrix: torch.Tensor) -> float:
    """Largest singular value, as the square root of the largest eigenvalue of the smaller Gram matrix
    (M M^T or M^T M, float64), computed alone (LAPACK's dsyevr with an index range). The eigenvalue has
    an absolute error of a few eps * sigma_1^2, so sigma_1 is exact to float64 rounding; it costs one
    matrix product and a tridiagonalisation instead of a full SVD (a 512 x 784 layer: 0.07 s against
    0.25-1.8 s for ``svdvals`` on this loaded 2-core CPU, and 5-10 s for torch's multi-threaded SVD)."""
    if not matrix.numel():
        return 0.0
    m = matrix.detach().to("cpu", torch.float64).numpy()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    top = scipy.linalg.eigvalsh(gram, subset_by_index=[len(gram) - 1, len(gram) - 1], check_finite=False)[0]
    return math.sqrt(max(float(top), 0.0))


@dataclass
class Measures:
    """The result object: JSON-able ``summary`` (totals, layers, metrics) and the sigma tensors."""

    summary: dict[str, Any]
    sigmas: dict[str, torch.Tensor]


def check_solver_options(tol: float, max_iter: int) -> None:
    """Refuse a solver setting before any work (``measure`` checks it before the Hessians)."""
    if not (tol > 0 and math.isfinite(tol)):
        raise NfmError(f"tol must be a positive number, not {tol}")
    if max_iter < 1:
        raise NfmError(f"max_iter must be at least 1, not {max_iter}")


def compute_measures(model: nn.Module, hdiag: dict[str, torch.Tensor],
                     trace_hdiag: dict[str, torch.Tensor] | None = None, *, tol: float = SOLVER_TOL,
                     max_iter: int = SOLVER_MAX_ITER, progress: ProgressFn = None) -> Measures:
    """All Hessian-based measures of ``model`` from ``hdiag`` (normalized-ce diagonal, raw) and
    ``trace_hdiag`` (the diagonal whose trace is reported; defaults to ``hdiag``)."""
    check_solver_options(tol, max_iter)
    trace_hdiag = hdiag if trace_hdiag is None else trace_hdiag
    params = dict(model.named_parameters())
    matrices = weight_matrices(model)
    layers: dict[str, dict[str, Any]] = {}
    sigmas: dict[str, torch.Tensor] = {}
    masses: list[tuple[float, float]] = []
    for index, (name, matrix) in enumerate(matrices.items()):
        layers[name], solution, mass = _layer_measures(matrix, matrix.take(params[matrix.param]),
                                                       matrix.take(hdiag[matrix.param]),
                                                       matrix.take(trace_hdiag[matrix.param]), tol, max_iter)
        sigmas[f"sigma_row.{name}"] = solution.sigma_row
        sigmas[f"sigma_col.{name}"] = solution.sigma_col
        masses.append(mass)
        report(progress, "layers", index + 1, len(matrices), layer=name)
    return Measures(_summary(layers, masses, params, matrices, trace_hdiag), sigmas)


def _layer_measures(matrix: WeightMatrix, param: torch.Tensor, h_param: torch.Tensor, trace_param: torch.Tensor,
                    tol: float, max_iter: int) -> tuple[dict[str, Any], LayerSolution, tuple[float, float]]:
    """One weight matrix: its row of the per-layer table, the solution of (17), and the (negative,
    absolute) mass of its raw diagonal."""
    weight = param.detach().to("cpu", torch.float64)
    h_raw = h_param.to("cpu", torch.float64)
    groups = matrix.groups
    w2, h = to_matrix(weight, h_raw, groups)
    solution: LayerSolution = solve_layer(w2, h, tol=tol, max_iter=max_iter)
    neg = float(h_raw.clamp_max(0).abs().sum())
    # a grouped conv is block diagonal: its spectral norm is the largest of its blocks'
    spectral = max(spectral_norm(block.reshape(block.shape[0], -1)) for block in weight.chunk(groups))
    row = {
        "type": matrix.kind, "shape": list(weight.shape), "groups": groups,
        "normalized_sharpness": solution.value, "matrix_normalized_sharpness": matrix_normalized_layer(w2, h),
        "hessian_trace": float(trace_param.double().sum()),
        "frobenius_norm_sq": float(w2.sum()), "spectral_norm": spectral,
        "clipped_fraction": neg / max(float(h_raw.abs().sum()), 1e-300),
        "iterations": solution.iterations, "residual": solution.residual, "converged": solution.converged,
        "degenerate_rows": solution.degenerate_rows, "degenerate_cols": solution.degenerate_cols,
        "attained": solution.attained,
    }
    return row, solution, (neg, float(h_raw.abs().sum()))


def _running_sum(values) -> float:
    """Left-to-right float sum from 0.0 (the order the per-layer values were always added in)."""
    total = 0.0
    for value in values:
        total += value
    return total


def _summary(layers: dict[str, dict[str, Any]], masses: list[tuple[float, float]], params: dict[str, Any],
             matrices: dict[str, WeightMatrix], trace_hdiag: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The totals over weight matrices, the traces, the diagnostics and the per-layer table."""
    rows = list(layers.values())
    negative_mass = _running_sum(neg for neg, _ in masses)
    abs_mass = _running_sum(total for _, total in masses)
    log_spectral = _running_sum(math.log(r["spectral_norm"]) if r["spectral_norm"] > 0 else -math.inf for r in rows)
    in_matrices = sum(m.take(params[m.param]).numel() for m in matrices.values())
    return {
        "normalized_sharpness": _running_sum(r["normalized_sharpness"] for r in rows),
        "matrix_normalized_sharpness": _running_sum(r["matrix_normalized_sharpness"] for r in rows),
        "hessian_trace": float(sum(t.double().sum() for t in trace_hdiag.values())),
        "hessian_trace_weights": float(sum(m.take(trace_hdiag[m.param]).double().sum() for m in matrices.values())),
        "clipped_fraction": negative_mass / abs_mass if abs_mass > 0 else 0.0,
        "frobenius_norm_sq": _running_sum(r["frobenius_norm_sq"] for r in rows),
        # a zero matrix makes the product 0 (log undefined: None); past float range: None, log kept
        "spectral_norm_product": math.exp(log_spectral) if log_spectral < 709 else None,
        "log_spectral_norm_product": log_spectral if math.isfinite(log_spectral) else None,
        "weight_matrices": len(matrices),
        "params_in_matrices": in_matrices,
        "params_left_out": sum(p.numel() for p in params.values()) - in_matrices,
        "converged": all(r["converged"] for r in rows),
        "layers": layers,
    }
