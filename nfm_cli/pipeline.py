"""``solve-variance`` and ``measure``: from a checkpoint and its Hessian diagonals to a measures file.

``solve_variance`` reads a checkpoint and a ``hessian-diag`` file (refusing one computed from
another checkpoint), computes every measure of ``measures.compute_measures`` and writes a
``measures`` artifact: tensors ``sigma_row.<param>`` / ``sigma_col.<param>`` and metadata
``result`` (what ``--json`` prints: totals, ``layers``, ``metrics``), ``config``, ``parents``.

``measure_checkpoint`` is the one-shot path: the ``normalized-ce`` diagonal (for the normalized
measures), the ``ce`` diagonal (for the Hessian-trace baseline, Sec. 6.2), the Fisher-Rao norm
(eq. 25), then the solve. The two Hessian files are kept next to the output by default, so a killed
``measure`` resumes where it stopped; a finished measures file for the same checkpoint and options
is left alone, so rerunning a sweep skips finished runs.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nfm_cli import distributed
from nfm_cli.artifacts import read_artifact, write_artifact
from nfm_cli.checkpoint import Checkpoint, load_checkpoint
from nfm_cli.devices import resolve_device
from nfm_cli.errors import NfmError
from nfm_cli.fisher_rao import FISHER_RAO_LOSS, fisher_rao_norm_of_checkpoint
from nfm_cli.hessian import FD_SCALE, SAVE_EVERY_SECONDS, compute_hessian_diagonal, read_hessian_diagonal
from nfm_cli.measure_registry import RUN_METRICS
from nfm_cli.measures import compute_measures
from nfm_cli.progress import ProgressFn

RESULT_CONFIG = ("model", "dataset", "seed", "train_size", "epochs", "width", "depth", "lr", "batch_size",
                 "optimizer", "momentum", "weight_decay", "stop_at_loss")


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


def solve_variance(checkpoint: str | os.PathLike, hdiag: str | os.PathLike, out: str | os.PathLike, *,
                   trace_hdiag: str | os.PathLike | None = None, fisher_rao: float | None = None,
                   tol: float = 1e-10, max_iter: int = 10_000, progress: ProgressFn = None,
                   extra_config: dict[str, Any] | None = None) -> MeasureResult:
    """Solve (17) for every weight matrix of ``checkpoint`` with the diagonal in ``hdiag``."""
    start = time.perf_counter()
    ck = load_checkpoint(checkpoint)
    h = read_hessian_diagonal(hdiag, ck)
    trace_h = h if trace_hdiag is None else read_hessian_diagonal(trace_hdiag, ck)
    measures = compute_measures(ck.model, h.diagonal, trace_h.diagonal, tol=tol, max_iter=max_iter,
                                progress=progress)
    result = dict(measures.summary)
    result["fisher_rao_norm"] = fisher_rao
    result["hessian_loss"] = h.config["loss"]
    result["trace_loss"] = trace_h.config["loss"]
    result["metrics"] = checkpoint_metrics(ck)
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value) and key != "spectral_norm_product":
            raise NfmError(f"measure {key} came out {value}; the Hessian file or checkpoint is broken", hdiag)
    parents = {"checkpoint": ck.sha256, "hessian": h.sha256, "trace_hessian": trace_h.sha256}
    config = {"tol": tol, "max_iter": max_iter, "lambda": 0.5, "hessian_loss": result["hessian_loss"],
              "trace_loss": result["trace_loss"], "estimator": h.config.get("estimator")}
    config.update(extra_config or {})
    meta = {"config": config, "parents": parents, "result": result, "checkpoint_path": str(ck.path),
            "progress": {"complete": True}, "wall_time": time.perf_counter() - start}
    write_artifact(out, measures.sigmas, "measures", meta)
    return MeasureResult(Path(out), "written", result, [])


def default_measures_path(checkpoint: str | os.PathLike) -> Path:
    """``run.safetensors`` -> ``run.measures.safetensors`` in the same folder."""
    path = Path(checkpoint)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.with_name(f"{stem}.measures.safetensors")


PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def intermediate_paths(out: Path, precision: str = "float32") -> dict[str, Path]:
    """The kept Hessian files: ``<out stem>.hdiag-<loss>[.float64].safetensors``."""
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    tag = "" if precision == "float32" else f".{precision}"
    return {loss: out.with_name(f"{stem}.hdiag-{loss}{tag}.safetensors") for loss in ("normalized-ce", "ce")}


def measure_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, *,
                       estimator: str = "exact", samples: int | None = None, probes: int = 100,
                       batch_size: int | None = None, seed: int = 0, device: str = "auto",
                       precision: str = "float32", keep_intermediate: bool = True, tol: float = 1e-10, max_iter: int = 10_000,
                       force: bool = False, finite_diff_scale: float = FD_SCALE,
                       data_dir: str | os.PathLike | None = None, save_every_seconds: float = SAVE_EVERY_SECONDS,
                       progress: ProgressFn = None) -> MeasureResult:
    """Hessian diagonals (normalized-ce and ce), Fisher-Rao norm and the solve, resumably.

    ``precision="float64"`` runs the model and data in float64 (slower; for exact comparisons);
    ``data_dir`` is where the dataset is, if not where the checkpoint was trained."""
    if precision not in PRECISIONS:
        raise NfmError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    out = Path(out) if out is not None else default_measures_path(checkpoint)
    ck = load_checkpoint(checkpoint, data_dir, dtype=PRECISIONS[precision])
    options = {"estimator": estimator, "samples": samples, "probes": probes if estimator != "exact" else None,
               "seed": seed, "tol": tol, "max_iter": max_iter, "precision": precision,
               "finite_diff_scale": finite_diff_scale if estimator == "finite-diff" else None}
    if out.exists() and not force:
        art = read_artifact(out, ("measures", "checkpoint", "hessian-diag"))
        if art.kind != "measures":
            raise NfmError(f"exists and is a {art.kind} file, not a measures file; choose another --out", out)
        same = (art.meta.get("parents") or {}).get("checkpoint") == ck.sha256 and all(
            (art.meta.get("config") or {}).get(k) == v for k, v in options.items())
        if not same:
            raise NfmError("exists and was computed from another checkpoint or with other options; "
                           "use --force to recompute it or choose another --out", out)
        return MeasureResult(out, "already complete", art.meta["result"], [])
    dev = resolve_device(device)
    paths = intermediate_paths(out, precision)
    for loss, path in paths.items():
        compute_hessian_diagonal(ck, path, loss=loss, estimator=estimator, probes=probes,
                                 samples=samples, batch_size=batch_size, seed=seed, device=str(dev),
                                 force=force, finite_diff_scale=finite_diff_scale, progress=progress,
                                 save_every_seconds=save_every_seconds)
    # Under torchrun every rank helped with the Hessian files above; the Fisher-Rao norm and the solve
    # (cheap next to them) run on rank 0 alone while the others wait, then every rank returns the result.
    ctx, rank_dev = distributed.setup(dev)
    failed = 0
    try:
        if ctx.is_main:
            fisher = fisher_rao_norm_of_checkpoint(ck, device=rank_dev, samples=samples, seed=seed,
                                                   progress=progress)
            result = solve_variance(checkpoint, paths["normalized-ce"], out, trace_hdiag=paths["ce"],
                                    fisher_rao=fisher, tol=tol, max_iter=max_iter, progress=progress,
                                    extra_config={**options, "fisher_rao_loss": FISHER_RAO_LOSS})
    except BaseException:
        failed = 1
        raise
    finally:
        if ctx.active:
            failed = distributed.max_ints(ctx, [failed])[0]
    if failed:
        raise NfmError("rank 0 failed computing the Fisher-Rao norm or the solve; see its error", out)
    if not ctx.is_main:
        result = MeasureResult(out, "written", read_artifact(out, "measures").meta["result"], [])
    if ctx.is_main and not keep_intermediate:
        for path in paths.values():
            path.unlink(missing_ok=True)
    result.intermediates = list(paths.values()) if keep_intermediate else []
    return result
