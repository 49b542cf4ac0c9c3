"""``measure``: from a checkpoint to a measures file in one resumable step.

``measure_checkpoint`` computes the ``normalized-ce`` diagonal (for the normalized measures), the
``ce`` diagonal (for the Hessian-trace baseline, Sec. 6.2), the Fisher-Rao norm (eq. 25), then the
solve (``solving.solve_variance``). The two Hessian files are kept next to the output by default, so
a killed ``measure`` resumes where it stopped; a finished measures file for the same checkpoint and
options is left alone, so rerunning a sweep skips finished runs.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from nfm_cli.choices import DEFAULT_PROBES, FD_SCALE, PRECISIONS, SOLVER_MAX_ITER, SOLVER_TOL
from nfm_cli.curvature.estimators import estimator_class, resolve_estimator
from nfm_cli.curvature.registry import DEFAULT_ESTIMATOR, uses_probes
from nfm_cli.data.datasets import subset_indices
from nfm_cli.errors import NfmError
from nfm_cli.measures.compute import check_solver_options
from nfm_cli.measures.fisher_rao import FISHER_RAO_LOSS, fisher_rao_norm_of_checkpoint
from nfm_cli.measures.rivals import RivalOptions, rival_measures
from nfm_cli.runtime import distributed
from nfm_cli.runtime.devices import resolve_device
from nfm_cli.runtime.progress import ProgressFn, note
from nfm_cli.steps.hessian_diag import (
    SAVE_EVERY_SECONDS,
    HessianDiagonal,
    check_hessian_options,
    compute_hessian_diagonal,
)
from nfm_cli.steps.measure_shared import SHARED_ESTIMATORS, shared_hessians
from nfm_cli.steps.solve import MeasureResult, check_out_path, solve_variance
from nfm_cli.store.artifacts import read_artifact, write_artifact
from nfm_cli.store.checkpoint import Checkpoint, checkpoint_from_artifact, load_checkpoint

DTYPES = {name: getattr(torch, name) for name in PRECISIONS}   # --precision -> the model's and data's dtype


def refuse_diverged(ck: Checkpoint) -> None:
    """A run whose training diverged has no meaningful flatness: say so before computing anything."""
    if not ck.metrics.get("diverged"):
        return
    at = ck.metrics.get("diverged_epoch")
    where = f" at epoch {at}" if at else ""
    raise NfmError(f"training diverged{where} (see nfm inspect); its measures would mean nothing: retrain "
                   "with a smaller --lr", ck.path)


def _in_memory(result: HessianDiagonal, ck: Checkpoint) -> HessianDiagonal:
    """What reading back the file ``compute_hessian_diagonal`` just wrote would give (float64 tensors
    in parameter order, its config and content hash), without reading it."""
    names = [n for n, _ in ck.model.named_parameters()]
    return dataclasses.replace(result, diagonal={n: result.diagonal[n].to(torch.float64) for n in names})


def default_measures_path(checkpoint: str | os.PathLike) -> Path:
    """``run.safetensors`` -> ``run.measures.safetensors`` in the same folder."""
    path = Path(checkpoint)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.with_name(f"{stem}.measures.safetensors")


def intermediate_paths(out: Path, precision: str = "float32") -> dict[str, Path]:
    """The kept Hessian files: ``<out stem>.hdiag-<loss>[.float64].safetensors``."""
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    tag = "" if precision == "float32" else f".{precision}"
    return {loss: out.with_name(f"{stem}.hdiag-{loss}{tag}.safetensors") for loss in ("normalized-ce", "ce")}


def measure_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None, *,
                       estimator: str = DEFAULT_ESTIMATOR, samples: int | None = None, probes: int = DEFAULT_PROBES,
                       batch_size: int | None = None, seed: int = 0, device: str = "auto",
                       precision: str = "float32", keep_intermediate: bool = True, tol: float = SOLVER_TOL,
                       max_iter: int = SOLVER_MAX_ITER,
                       force: bool = False, rivals: bool = False, finite_diff_scale: float = FD_SCALE,
                       data_dir: str | os.PathLike | None = None, save_every_seconds: float = SAVE_EVERY_SECONDS,
                       progress: ProgressFn = None) -> MeasureResult:
    """Hessian diagonals (normalized-ce and ce), Fisher-Rao norm and the solve, resumably.

    ``precision="float64"`` runs the model and data in float64 (slower; for exact comparisons);
    ``data_dir`` is where the dataset is, if not where the checkpoint was trained.
    ``rivals``: also the rival measures of ``nfm_cli.measures.rivals`` (seeded by ``seed``, on the same
    samples); asked of a finished measures file without them, they are added to it."""
    if precision not in PRECISIONS:
        raise NfmError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    check_solver_options(tol, max_iter)
    check_hessian_options(estimator=estimator, probes=probes, samples=samples, batch_size=batch_size,
                          finite_diff_scale=finite_diff_scale)
    out = Path(out) if out is not None else default_measures_path(checkpoint)
    check_out_path(out)
    ck = load_checkpoint(checkpoint, data_dir, dtype=DTYPES[precision])
    refuse_diverged(ck)
    ck.model.eval()
    estimator, why = resolve_estimator(estimator, ck.model)     # auto: exact or ggn, said once
    if why is not None and int(os.environ.get("RANK", "0")) == 0:
        note(progress, why)
    options = {"estimator": estimator, "samples": samples, "probes": probes if uses_probes(estimator) else None,
               "seed": seed, "tol": tol, "max_iter": max_iter, "precision": precision,
               "finite_diff_scale": finite_diff_scale if estimator == "finite-diff" else None}
    if out.exists() and not force:
        return _finished(out, ck, options, rivals, samples, seed, device, progress)
    dev = resolve_device(device)
    paths = intermediate_paths(out, precision)
    hessian_options = dict(estimator=estimator, samples=samples, batch_size=batch_size, seed=seed, device=str(dev),
                           force=force, save_every_seconds=save_every_seconds, progress=progress)
    shared = shared_hessians(ck, paths, **hessian_options)          # one forward pass for both and Fisher-Rao
    if shared is None:
        hessians, fisher = _hessians_one_after_the_other(ck, paths, probes, finite_diff_scale, hessian_options), None
    else:
        hessians, fisher = shared
    # Under torchrun every rank helped with the Hessian files above; the Fisher-Rao norm (when not shared)
    # and the solve (cheap next to them) run on rank 0 alone while the others wait, then every rank returns.
    ctx, rank_dev = distributed.setup(dev)
    failed = 0
    try:
        if ctx.is_main:
            if fisher is None:
                fisher = _fisher_rao(ck, estimator, hessians["normalized-ce"], rank_dev, samples, seed, progress)
            extra = _rival_result(ck, samples, seed, rank_dev, progress) if rivals else None
            # the solve reads the float32 weights as trained: the same loaded file, rebuilt if needed
            solve_ck = ck if ck.dtype == torch.float32 else checkpoint_from_artifact(ck.artifact)
            solve_ck.model.to("cpu")
            result = solve_variance(solve_ck, _in_memory(hessians["normalized-ce"], solve_ck), out,
                                    trace_hdiag=_in_memory(hessians["ce"], solve_ck),
                                    fisher_rao=fisher, tol=tol, max_iter=max_iter, progress=progress,
                                    extra_config={**options, "fisher_rao_loss": FISHER_RAO_LOSS},
                                    extra_result=extra)
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


def _hessians_one_after_the_other(ck: Checkpoint, paths: dict[str, Path], probes: int, finite_diff_scale: float,
                                  options: dict[str, Any]) -> dict[str, HessianDiagonal]:
    """The two diagonals by two ``compute_hessian_diagonal`` runs (stochastic estimators, or files started
    otherwise than by the shared run)."""
    return {loss: compute_hessian_diagonal(ck, path, loss=loss, probes=probes, finite_diff_scale=finite_diff_scale,
                                           **options) for loss, path in paths.items()}


def _fisher_rao(ck: Checkpoint, estimator: str, hessian: HessianDiagonal, device, samples, seed,
                progress: ProgressFn) -> float:
    """Eq. (25) when the shared run did not compute it: for exact and ggn with the Hessian's batch size and
    plan, so that the value is the shared run's bit for bit (a measure killed after both files were
    complete gives the same number); else as ``fisher_rao_norm_of_checkpoint`` chooses."""
    if estimator not in SHARED_ESTIMATORS:
        return fisher_rao_norm_of_checkpoint(ck, device=device, samples=samples, seed=seed, progress=progress)
    plan = estimator_class(estimator).plan(ck.model)
    return fisher_rao_norm_of_checkpoint(ck, device=device, samples=samples, seed=seed, progress=progress,
                                         batch_size=int(hessian.config["batch_size"]), method="rules", plan=plan)


def _finished(out: Path, ck: Checkpoint, options: dict[str, Any], rivals: bool, samples, seed, device,
              progress: ProgressFn) -> MeasureResult:
    """An existing ``out``: the finished result if it was computed from ``ck`` with ``options`` (with the
    rivals added if asked and missing), else the refusal to overwrite it."""
    art = read_artifact(out, ("measures", "checkpoint", "hessian-diag"))
    if art.kind != "measures":
        raise NfmError(f"exists and is a {art.kind} file, not a measures file; choose another --out", out)
    same = (art.meta.get("parents") or {}).get("checkpoint") == ck.sha256 and all(
        (art.meta.get("config") or {}).get(k) == v for k, v in options.items())
    if not same:
        raise NfmError("exists and was computed from another checkpoint or with other options; "
                       "use --force to recompute it or choose another --out", out)
    if rivals and "rivals" not in art.meta["result"]:
        return _add_rivals(art, ck, samples, seed, resolve_device(device), progress)
    return MeasureResult(out, "already complete", _with_estimator(art.meta["result"], art.meta), [])


def _with_estimator(result: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A finished file's result with the estimator that made it (files from before issue 20 have it in
    their config only)."""
    return {**result, "estimator": result.get("estimator") or (meta.get("config") or {}).get("estimator")}


def _rival_result(ck: Checkpoint, samples: int | None, seed: int, device, progress: ProgressFn) -> dict[str, Any]:
    """The five rival measures (top level, as report reads them) and their radii/options under ``rivals``."""
    x, y = ck.training_tensors(device)
    idx = subset_indices(len(y), samples, seed, "hessian-samples").to(y.device)  # the Hessian's samples
    values = rival_measures(ck.model.to(device), x[idx], y[idx], RivalOptions(seed=seed), progress)
    details = {"radii": values.pop("radii"), "options": values.pop("options")}
    return {**values, "rivals": details}


def _add_rivals(art, ck: Checkpoint, samples, seed, device, progress) -> MeasureResult:
    """Add the rivals to a finished measures file (same checkpoint and options), rewritten atomically."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NfmError("adding the rival measures to a finished measures file runs in one process; "
                       "run it without torchrun", art.path)
    result = dict(art.meta["result"], **_rival_result(ck, samples, seed, device, progress))
    write_artifact(art.path, dict(art.tensors), "measures", dict(art.meta, result=result))
    return MeasureResult(Path(art.path), "rivals added", result, [])
