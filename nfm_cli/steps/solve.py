"""``solve-variance``: from a checkpoint and its Hessian diagonal(s) to a measures file.

``solve_variance`` reads a checkpoint and a ``hessian-diag`` file (refusing one computed from
another checkpoint), computes every measure of ``measures.compute_measures`` and writes a
``measures`` artifact: tensors ``sigma_row.<param>`` / ``sigma_col.<param>`` and metadata
``result`` (what ``--json`` prints: totals, ``layers``, ``metrics``), ``config``, ``parents``.
It is also the last step of ``measuring.measure_checkpoint``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfm_cli.choices import SOLVER_MAX_ITER, SOLVER_TOL
from nfm_cli.errors import NfmError
from nfm_cli.measures.compute import check_solver_options, compute_measures
from nfm_cli.measures.registry import RUN_METRICS
from nfm_cli.runtime.progress import ProgressFn
from nfm_cli.steps.hessian_diag import HessianDiagonal, read_hessian_diagonal
from nfm_cli.store.artifacts import COMPLETE, write_artifact
from nfm_cli.store.checkpoint import Checkpoint, load_checkpoint
from nfm_cli.store.train_config import RESULT_FIELDS

RESULT_CONFIG = RESULT_FIELDS   # the run's config fields copied into measures files (store.train_config)


@dataclass
class MeasureResult:
    path: Path
    status: str  # "written" or "already complete"
    result: dict[str, Any]
    intermediates: list[Path]


def checkpoint_metrics(ck: Checkpoint) -> dict[str, Any]:
    """The run's metrics and identity, copied into measures files so ``report`` needs nothing else."""
    metrics = {k: ck.metrics.get(k) for k in RUN_METRICS}
    metrics.update({k: ck.config.get(k) for k in RESULT_CONFIG})
    metrics["checkpoint"] = str(ck.path)
    return metrics


def solve_variance(checkpoint: str | os.PathLike | Checkpoint, hdiag: str | os.PathLike | HessianDiagonal,
                   out: str | os.PathLike, *,
                   trace_hdiag: str | os.PathLike | HessianDiagonal | None = None, fisher_rao: float | None = None,
                   tol: float = SOLVER_TOL, max_iter: int = SOLVER_MAX_ITER, progress: ProgressFn = None,
                   extra_config: dict[str, Any] | None = None,
                   extra_result: dict[str, Any] | None = None) -> MeasureResult:
    """Solve (17) for every weight matrix of ``checkpoint`` with the diagonal in ``hdiag``.

    ``checkpoint`` is a path or an already loaded float32 ``Checkpoint``; ``hdiag`` / ``trace_hdiag``
    are hessian-diag files or their contents already in memory (``measure`` passes what it has, so
    nothing is read or hashed twice)."""
    start = time.perf_counter()
    check_solver_options(tol, max_iter)
    check_out_path(out)
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    h_art = _hessian(hdiag, ck)
    trace_art = h_art if trace_hdiag is None else _hessian(trace_hdiag, ck)
    measures = compute_measures(ck.model, h_art.diagonal, trace_art.diagonal, tol=tol, max_iter=max_iter,
                                progress=progress)
    result = dict(measures.summary)
    result["fisher_rao_norm"] = fisher_rao
    result["hessian_loss"] = h_art.config["loss"]
    result["trace_loss"] = trace_art.config["loss"]
    result["estimator"] = h_art.config.get("estimator")      # exact/hutchinson: Hessian; ggn: Gauss-Newton
    result["metrics"] = checkpoint_metrics(ck)
    result.update(extra_result or {})
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value) and key != "spectral_norm_product":
            raise NfmError(f"measure {key} came out {value}; the Hessian file or checkpoint is broken", h_art.path)
    parents = {"checkpoint": ck.sha256, "hessian": h_art.sha256, "trace_hessian": trace_art.sha256}
    config = {"tol": tol, "max_iter": max_iter, "lambda": 0.5, "hessian_loss": result["hessian_loss"],
              "trace_loss": result["trace_loss"], "estimator": h_art.config.get("estimator")}
    config.update(extra_config or {})
    meta = {"config": config, "parents": parents, "result": result, "checkpoint_path": str(ck.path),
            "progress": {COMPLETE: True}, "wall_time": time.perf_counter() - start}
    write_artifact(out, measures.sigmas, "measures", meta)
    return MeasureResult(Path(out), "written", result, [])


def check_out_path(out: str | os.PathLike) -> None:
    """``--out`` must name a file in an existing folder (checked before any work, and named as
    ``--out``, not as one of the intermediate files written next to it)."""
    out = Path(out)
    if out.is_dir():
        raise NfmError("--out is a directory; give a file name such as run.measures.safetensors", out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise NfmError(f"the folder of --out ({str(folder)!r}) does not exist; create it first", out)


def _hessian(hdiag: str | os.PathLike | HessianDiagonal, ck: Checkpoint) -> HessianDiagonal:
    return hdiag if isinstance(hdiag, HessianDiagonal) else read_hessian_diagonal(hdiag, ck)
