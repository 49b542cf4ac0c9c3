"""``measure_model``: ``nfm measure`` on an ``nn.Module`` and tensors in memory, writing no file.

It runs what ``measuring.measure_checkpoint`` runs (the ``normalized-ce`` and ``ce`` Hessian diagonals
over the same seeded sample subset, the Fisher-Rao norm of eq. (25), the per-layer solve of (17))
and returns the same dict as ``nfm measure --json`` prints, without ``path``; its ``metrics`` hold the
loss and accuracy on ``(x, y)`` (and on ``(x_test, y_test)`` with the gap, when given).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nfm_cli.choices import DEFAULT_ESTIMATOR, DEFAULT_PROBES, ESTIMATORS, SOLVER_MAX_ITER, SOLVER_TOL
from nfm_cli.curvature.batch_size import auto_batch_size
from nfm_cli.curvature.estimators import make_estimator, resolve_estimator
from nfm_cli.curvature.registry import uses_probes
from nfm_cli.data.datasets import subset_indices
from nfm_cli.errors import NfmError
from nfm_cli.measures.compute import compute_measures
from nfm_cli.measures.fisher_rao import fisher_rao_norm
from nfm_cli.runtime.progress import ProgressFn, note, report
from nfm_cli.steps.train import _evaluate


def measure_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, x_test: torch.Tensor | None = None,
                  y_test: torch.Tensor | None = None, estimator: str = DEFAULT_ESTIMATOR, samples: int | None = None,
                  probes: int = DEFAULT_PROBES, batch_size: int | None = None, seed: int = 0,
                  tol: float = SOLVER_TOL, max_iter: int = SOLVER_MAX_ITER,
                  progress: ProgressFn = None) -> dict[str, Any]:
    """Normalized sharpness and its rivals of ``model`` on the training data ``(x, y)``, in memory.

    ``x``: inputs as the model takes them; ``y``: int64 labels the model was trained on (on the model's
    device). The model is put in eval mode (BatchNorm uses its running statistics). Options mean what
    they mean for ``nfm measure``; for the same weights, data and options the numbers are those of
    ``nfm measure --json`` (including ``"estimator"``, the one ``auto`` picked). Raises ``NfmError`` for
    bad input.
    """
    if estimator not in ESTIMATORS:
        raise NfmError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    _check_data(x, y, "x, y")
    if (x_test is None) != (y_test is None):
        raise NfmError("give both x_test and y_test, or neither")
    if x_test is not None:
        _check_data(x_test, y_test, "x_test, y_test")
    if samples is not None and not 1 <= samples <= len(y):
        raise NfmError(f"samples must be in [1, {len(y)}], not {samples}")
    model.eval()
    estimator, why = resolve_estimator(estimator, model)       # auto: exact or ggn, said once
    if why is not None:
        note(progress, why)
    idx = subset_indices(len(y), samples, seed, "hessian-samples").to(y.device)   # as hessian-diag
    xs, ys = x[idx], y[idx]
    batch = int(batch_size or auto_batch_size(model, xs[:1], estimator, len(ys)))
    diagonals = {loss: _diagonal(model, xs, ys, loss, estimator, batch, probes, seed, progress)
                 for loss in ("normalized-ce", "ce")}
    fisher = fisher_rao_norm(model, xs, ys, progress=progress)
    measures = compute_measures(model, diagonals["normalized-ce"], diagonals["ce"], tol=tol, max_iter=max_iter,
                                progress=progress)
    result = dict(measures.summary, fisher_rao_norm=fisher, hessian_loss="normalized-ce", trace_loss="ce",
                  estimator=estimator)
    result["metrics"] = _metrics(model, x, y, x_test, y_test)
    return result


def _check_data(x: Any, y: Any, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise NfmError(f"{what} must be tensors")
    if y.dtype != torch.int64 or y.ndim != 1 or len(y) != len(x) or len(y) == 0:
        raise NfmError(f"{what}: y must be a non-empty int64 vector with one label per row of x, not "
                       f"{y.dtype} {tuple(y.shape)} for x {tuple(x.shape)}")


def _diagonal(model, x, y, loss, estimator, batch, probes, seed, progress) -> dict[str, torch.Tensor]:
    est = make_estimator(estimator, model, x, y, loss, batch_size=batch,
                         probes=int(probes) if uses_probes(estimator) else None, seed=int(seed))
    state = est.initial_state()
    for unit in range(est.units_total):
        est.run_unit(unit, state)
        report(progress, f"{estimator} {loss}", unit + 1, est.units_total)
    diagonal = est.finish(state).diagonal
    if not all(bool(torch.isfinite(d).all()) for d in diagonal.values()):
        raise NfmError(f"the {loss} Hessian diagonal came out NaN or inf (weights too large for the precision?)")
    return diagonal


def _metrics(model, x, y, x_test, y_test) -> dict[str, Any]:
    if x_test is None:
        x_test, y_test = x, y
        metrics = _evaluate(model, x, y, x_test, y_test)
        metrics = {k: metrics[k] for k in ("train_acc", "train_loss")}
    else:
        metrics = _evaluate(model, x, y, x_test, y_test)
    return dict(metrics, random_ratio=None)
