"""``nfm hessian-diag``: the resumable, file-backed run of an estimator over a checkpoint's training set.

The artifact (kind ``hessian-diag``), when complete:

* tensors ``<param>``: float64 diagonal of the Hessian of the mean training loss, one per parameter,
  named and shaped exactly as ``model.named_parameters()`` (raw values, negative ones included:
  clipping is the solver's business). Float64 because the sums are accumulated in float64; the
  per-batch contributions are computed in the model's dtype (float32 for trained checkpoints).
* tensors ``stderr.<param>``: per-element standard error of the mean over probes (hutchinson and
  finite-diff with >= 2 probes).
* metadata ``nfm.config`` {loss, estimator, samples, probes, seed, batch_size, finite_diff?},
  ``nfm.parents`` {"checkpoint": sha256}, ``nfm.progress`` {done, units_done, units_total, batches,
  batch_size, probes_done, samples_done}, ``nfm.metrics`` {trace, trace_total, trace_stderr?,
  negative_fraction, degenerate_samples, parameters}, ``nfm.wall_time`` (seconds, all sessions),
  ``nfm.source`` {checkpoint path, model, device} for information.

While running, the same file holds the estimator's float64 state as tensors ``state.<key>`` and
``nfm.progress.done = false``; it is rewritten atomically every ``save_every_seconds`` and when the
run is interrupted between two units. Rerunning with the same out path continues after the last
saved unit and performs the same floating-point operations in the same order, so on the same
device the result is bit-identical to an uninterrupted run.

Under ``torchrun`` (``nfm_cli.runtime.distributed``) the units are sharded over the ranks in independent
chunks (exact: batches; hutchinson/finite-diff: whole probes), the float64 sums are all-reduced, and
only rank 0 writes; partial saves hold the reduced sums of a prefix of the units, so any number of
processes can continue them (equal to an uninterrupted run to float rounding, not bit for bit).

Identity: a file at ``out`` is continued (or, if complete, left alone) only if it is a
``hessian-diag`` file of the same checkpoint hash and the same config (``IDENTITY_KEYS``); the batch
size changes the numbers only at rounding level, so a complete file computed with another batch
size counts as the same result, but a partial one must be continued with its own batch size.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nfm_cli.choices import DEFAULT_PROBES, ESTIMATORS, FD_SCALE
from nfm_cli.choices import HESSIAN_SAVE_EVERY_SECONDS as SAVE_EVERY_SECONDS
from nfm_cli.curvature.batch_size import auto_batch_size
from nfm_cli.curvature.estimators import DiagonalEstimate, Estimator, make_estimator, resolve_estimator
from nfm_cli.curvature.losses import LOSS_NAMES
from nfm_cli.curvature.registry import DEFAULT_ESTIMATOR, uses_probes
from nfm_cli.data.datasets import subset_indices
from nfm_cli.errors import NfmError
from nfm_cli.runtime import distributed, interrupt
from nfm_cli.runtime.devices import resolve_device
from nfm_cli.runtime.progress import ProgressFn, note, report
from nfm_cli.store.artifacts import COMPLETE, Artifact, has_completion_flag, is_complete, read_artifact, write_artifact
from nfm_cli.store.checkpoint import Checkpoint, load_checkpoint

KIND = "hessian-diag"
IDENTITY_KEYS = ("loss", "estimator", "samples", "probes", "seed", "finite_diff")
FD_RULE = "r_t = scale * rms(theta_t) = scale * ||theta_t||_F / sqrt(numel); all-zero tensor: scale * rms(theta)"


@dataclass
class HessianDiagonal:
    """A complete Hessian diagonal: what ``compute_hessian_diagonal`` returns (``status`` "computed",
    "resumed" or "already complete") and what ``read_hessian_diagonal`` returns for a file ("read")."""

    path: Path
    status: str
    config: dict[str, Any]
    diagonal: dict[str, torch.Tensor]
    stderr: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    sha256: str = ""
    checkpoint_sha256: str = ""
    artifact: Artifact | None = None    # the file as read (``read_hessian_diagonal`` and "already complete")


HessianResult = HessianDiagonal   # the name compute_hessian_diagonal's result had before


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def compute_hessian_diagonal(checkpoint: Checkpoint | str | os.PathLike, out: str | os.PathLike, *,
                             loss: str = "normalized-ce", estimator: str = DEFAULT_ESTIMATOR, probes: int | None = None,
                             samples: int | None = None, batch_size: int | None = None, seed: int = 0,
                             device: str = "auto", force: bool = False, finite_diff_scale: float = FD_SCALE,
                             progress: ProgressFn = None, save_every_seconds: float = SAVE_EVERY_SECONDS,
                             data_dir: str | os.PathLike | None = None) -> HessianDiagonal:
    """Diagonal of the Hessian of the mean training loss of ``checkpoint`` (a path or a loaded
    ``Checkpoint``), written to ``out``; resumes a partial ``out`` and leaves a complete one alone.

    ``estimator``: a registered one or ``auto`` (exact where the graph is piecewise linear, else ggn; the
    choice and its reason go to ``progress`` as a note, the file records the estimator used);
    ``samples``: a seeded subset of the training set (default all); ``probes``: for hutchinson and
    finite-diff (default 100; ignored by exact and ggn); ``batch_size``: default ``auto_batch_size``;
    ``force``: start over whatever is at ``out``. Raises ``NfmError`` for every problem the user can fix.
    """
    probes = check_hessian_options(loss=loss, estimator=estimator, probes=probes, samples=samples,
                                   batch_size=batch_size, finite_diff_scale=finite_diff_scale)
    out = output_path(out)
    ck = complete_checkpoint(checkpoint, data_dir, out)
    model = ck.model
    model.eval()
    ctx, dev = distributed.setup(resolve_device(device))    # world size 1 (no-op) without torchrun
    if not ctx.is_main:
        progress = None                     # rank 0 reports the global count

    x_all, y_all = ck.training_tensors(device="cpu")
    n_total = len(y_all)
    use = sample_count(samples, n_total)
    estimator, why = resolve_estimator(estimator, model)    # auto: exact or ggn, said once
    if why is not None:
        note(progress, why)
    batch_size = resolve_batch_size(batch_size, out, force, model, x_all[:1], estimator, use, ctx, dev)
    config = hessian_config(loss, estimator, use, n_total, probes, seed, finite_diff_scale, batch_size)

    previous = None if force or not out.exists() else previous_run(out, config, ck.sha256)
    if previous is not None and is_complete(previous.meta["progress"]):
        done = _as_hessian_diagonal(previous)
        done.status = "already complete"
        return done

    idx = subset_indices(n_total, use, seed, "hessian-samples")
    x, y = x_all[idx].to(dev), y_all[idx].to(dev)
    model.to(dev)
    est = make_estimator(estimator, model, x, y, loss, batch_size=batch_size, probes=probes, seed=int(seed),
                         finite_diff_scale=finite_diff_scale, progress=progress)
    source = {"checkpoint": str(ck.path), "model": ck.model_spec.get("name"), "device": str(dev)}
    meta_base = {"config": config, "parents": {"checkpoint": ck.sha256}, "source": source}
    return _run_and_write(ctx, est, previous, out, meta_base, ck, save_every_seconds, progress)


def resolve_batch_size(batch_size: int | None, out: Path, force: bool, model, x_one: torch.Tensor, estimator: str,
                       use: int, ctx: distributed.Dist, dev) -> int:
    """The given batch size, else a partial run's at ``out`` (kept whatever memory is free now), else
    ``auto_batch_size`` (under torchrun the smallest over the ranks)."""
    if batch_size is None:
        batch_size = _partial_batch_size(out, force) or auto_batch_size(model, x_one, estimator, use, dev)
        if ctx.active:              # ranks see different free memory: all take the smallest
            batch_size = -distributed.max_ints(ctx, [-batch_size])[0]
    return int(batch_size)


def hessian_config(loss: str, estimator: str, use: int, n_total: int, probes: int | None, seed: int,
                   finite_diff_scale: float, batch_size: int) -> dict[str, Any]:
    """The ``nfm.config`` of a hessian-diag file (``IDENTITY_KEYS`` and the batch size)."""
    return {"loss": loss, "estimator": estimator, "samples": use, "probes": probes,
            "seed": None if (not uses_probes(estimator) and use == n_total) else int(seed),
            "finite_diff": ({"scale": float(finite_diff_scale), "rule": FD_RULE}
                            if estimator == "finite-diff" else None),
            "batch_size": batch_size}


def output_path(out: str | os.PathLike) -> Path:
    """``out`` as a Path, refused when it is a folder or its folder does not exist (also ``measure``'s)."""
    out = Path(out)
    if out.is_dir():
        raise NfmError("output path is a directory; give a file name such as hdiag.safetensors", out)
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise NfmError(f"output folder {str(out.parent)!r} does not exist; create it first", out)
    return out


def complete_checkpoint(checkpoint: Checkpoint | str | os.PathLike, data_dir, out: Path) -> Checkpoint:
    """The loaded checkpoint of a finished training run that is not ``out`` itself."""
    ck = _load_checkpoint(checkpoint, data_dir)
    if out.exists() and ck.path.exists() and os.path.samefile(out, ck.path):
        raise NfmError("the output is the checkpoint itself; choose another output file", out)
    if not ck.complete:
        done = ck.progress.get("epochs_done", "?")
        total = ck.config.get("epochs", "?")
        raise NfmError(f"checkpoint is from an unfinished training run ({done} of {total} epochs); finish "
                       "it by rerunning the same nfm train command first", ck.path)
    return ck


def sample_count(samples: int | None, n_total: int) -> int:
    """How many of the ``n_total`` training samples to use (``--samples``; all when None), checked."""
    if samples is None:
        return n_total
    samples = int(samples)
    if samples < 1:
        raise NfmError(f"samples must be at least 1, not {samples}")
    if samples > n_total:
        raise NfmError(f"samples={samples} is more than the {n_total} training samples of the checkpoint; "
                       "leave it out to use all of them")
    return samples


def _run_and_write(ctx: distributed.Dist, est: Estimator, previous: Artifact | None, out: Path,
                   meta_base: dict[str, Any], ck: Checkpoint, save_every_seconds: float,
                   progress: ProgressFn) -> HessianDiagonal:
    """Run the estimator's units from where ``previous`` (a partial file, or None) stopped, saving as it
    goes, and write the complete file (rank 0)."""
    run = run_units(ctx, est, previous, out, meta_base, save_every_seconds, progress)
    return write_complete(ctx, est, est.finish(run.state), run, out, meta_base, ck)


@dataclass
class UnitRun:
    """What ``run_units`` leaves: the final (reduced) state, the unit it started from and reached, the
    wall time of earlier sessions and the clock this one started at."""

    state: dict[str, torch.Tensor]
    start: int
    unit: int
    wall_before: float
    t0: float

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0


def run_units(ctx: distributed.Dist, est: Estimator, previous: Artifact | None, out: Path,
              meta_base: dict[str, Any], save_every_seconds: float, progress: ProgressFn) -> UnitRun:
    """The units of ``est`` from where ``previous`` stopped, partial saves (every state key) into ``out``."""
    state = est.initial_state()
    start, wall_before = 0, 0.0
    if previous is not None:
        start, wall_before = _restore(previous, est, state, out)
    t0 = time.perf_counter()

    def save_partial(units: int, values: dict[str, torch.Tensor]) -> str:
        write_artifact(out, {f"state.{k}": v for k, v in values.items()}, KIND,
                       dict(meta_base, progress=_progress(est, units, False),
                            wall_time=wall_before + time.perf_counter() - t0))
        report(progress, "saved", units, est.units_total, file=out.name)
        return f"{units} of {est.units_total} units of {out} are saved"

    if ctx.active:
        unit = _run_sharded(ctx, est, state, start, save_partial, save_every_seconds, progress)
    else:
        unit = _run_serial(est, state, start, save_partial, save_every_seconds, progress)
    return UnitRun(state, start, unit, wall_before, t0)


def write_complete(ctx: distributed.Dist, est: Estimator, result: DiagonalEstimate, run: UnitRun, out: Path,
                   meta_base: dict[str, Any], ck: Checkpoint) -> HessianDiagonal:
    """Check ``result`` (finite) and write it to ``out`` as a complete hessian-diag file (rank 0)."""
    if not all(bool(torch.isfinite(d).all()) for d in result.diagonal.values()):
        if (getattr(ck, "metrics", None) or {}).get("diverged"):
            raise NfmError("the Hessian diagonal came out NaN or inf: training diverged (see nfm inspect); "
                           "retrain with a smaller learning rate", ck.path)
        raise NfmError("the Hessian diagonal came out NaN or inf (weights too large for the float "
                       "precision? try --device cpu with a float64 copy, or check the checkpoint)", ck.path)
    wall = run.wall()
    metrics = dict(result.metrics, parameters=sum(d.numel() for d in result.diagonal.values()))
    diagonal = {n: d.cpu() for n, d in result.diagonal.items()}
    stderr = {n: s.cpu() for n, s in result.stderr.items()}
    tensors = dict(diagonal)
    tensors.update({f"stderr.{n}": s for n, s in stderr.items()})
    sha = ""
    if ctx.is_main:
        sha = write_artifact(out, tensors, KIND, dict(meta_base, progress=_progress(est, run.unit, True),
                                                      metrics=metrics, wall_time=wall))
    if ctx.active:
        distributed.barrier(ctx)            # the file exists for every rank once this returns
    return HessianDiagonal(out, "resumed" if run.start > 0 else "computed", meta_base["config"], diagonal, stderr,
                           metrics, wall, sha, ck.sha256)


def check_hessian_options(*, loss: str = "normalized-ce", estimator: str = DEFAULT_ESTIMATOR, probes: int | None = None,
                          samples: int | None = None, batch_size: int | None = None,
                          finite_diff_scale: float = FD_SCALE) -> int | None:
    """Refuse impossible options before any work; returns the probe count to use (None for the
    estimators without probes, and for ``auto``, which picks one of them)."""
    _check_choice(loss, LOSS_NAMES, "loss")
    _check_choice(estimator, ESTIMATORS, "estimator")
    if batch_size is not None and int(batch_size) < 1:
        raise NfmError(f"batch_size must be at least 1, not {batch_size}")
    if samples is not None and int(samples) < 1:
        raise NfmError(f"samples must be at least 1, not {samples}")
    if estimator == "finite-diff" and not (finite_diff_scale > 0 and math.isfinite(finite_diff_scale)):
        raise NfmError(f"finite_diff_scale must be a positive number, not {finite_diff_scale}")
    if not uses_probes(estimator):
        return None             # no probes: the option is ignored
    probes = DEFAULT_PROBES if probes is None else int(probes)
    if probes < 1:
        raise NfmError(f"probes must be at least 1, not {probes}")
    return probes


def read_hessian_diagonal(path: str | os.PathLike,
                          checkpoint: Checkpoint | str | os.PathLike | None = None) -> HessianDiagonal:
    """A complete hessian-diag file (``config``: loss, estimator, ...; ``sha256``: the content hash to record
    as a parent); with ``checkpoint`` (path or ``Checkpoint``), also checks that it was computed from that
    checkpoint and that its tensors match the model's parameters (then ``diagonal`` is in parameter order).

    Raises ``NfmError`` if the file is incomplete, from another checkpoint ("computed from another
    checkpoint"), has missing/misshaped tensors, or holds NaN/inf.
    """
    art = read_artifact(path, KIND)
    result = _as_hessian_diagonal(art)
    if checkpoint is not None:
        ck = _load_checkpoint(checkpoint, None)
        if result.checkpoint_sha256 != ck.sha256:
            raise NfmError(f"was computed from another checkpoint (sha256 {result.checkpoint_sha256[:12]}..., "
                           f"{ck.path} is {ck.sha256[:12]}...); compute it for this checkpoint with "
                           "nfm hessian-diag", art.path)
        params = dict(ck.model.named_parameters())
        missing = [n for n in params if n not in result.diagonal]
        extra = [n for n in result.diagonal if n not in params]
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has unknown tensors {extra[:3]}"
            raise NfmError(f"does not match the checkpoint's model: it {what}", art.path)
        for n, p in params.items():
            if tuple(result.diagonal[n].shape) != tuple(p.shape):
                raise NfmError(f"tensor {n} has shape {tuple(result.diagonal[n].shape)}, the model's parameter "
                               f"has {tuple(p.shape)}", art.path)
        result.diagonal = {n: result.diagonal[n] for n in params}
    return result


# --------------------------------------------------------------------------------------------
# The unit loops: one process, or sharded over torchrun ranks
# --------------------------------------------------------------------------------------------

def _run_serial(est: Estimator, state: dict[str, torch.Tensor], start: int, save_partial,
                save_every_seconds: float, progress: ProgressFn) -> int:
    """Units start.. in order on this process; saves every ``save_every_seconds`` and on interrupt.

    SIGTERM / SIGINT (``nfm_cli.runtime.interrupt``) are deferred while a unit runs: the loop stops after
    the unit, saves, and raises ``Interrupted`` saying what was saved (all units done included: the
    rerun then only finishes)."""
    saved_units = start
    last_save = time.monotonic()
    consistent = True
    unit = start
    _report(progress, est, start)
    try:
        with interrupt.deferred():
            while unit < est.units_total:
                consistent = False      # the state is being updated: do not save it if interrupted now
                est.run_unit(unit, state)
                unit += 1
                consistent = True
                if interrupt.pending() is not None:
                    raise interrupt.Interrupted(interrupt.take())      # saved below
                if unit < est.units_total and time.monotonic() - last_save >= save_every_seconds:
                    save_partial(unit, state)
                    saved_units, last_save = unit, time.monotonic()
                _report(progress, est, unit)
    except BaseException as exc:
        if consistent and unit > saved_units:
            try:
                saved = save_partial(unit, state)
                if isinstance(exc, interrupt.Interrupted) and exc.saved is None:
                    exc.saved = saved
            except NfmError:
                pass
        raise
    return unit


def _run_sharded(ctx: distributed.Dist, est: Estimator, state: dict[str, torch.Tensor], start: int,
                 save_partial, save_every_seconds: float, progress: ProgressFn) -> int:
    """Units start.. over ``ctx.world`` ranks; on return ``state`` holds the all-reduced sums.

    Work goes in rounds: in round k, rank r runs chunk c0 + k * world + r (``est.chunk_units``
    consecutive units; chunks are independent). After each round all ranks have finished the same
    prefix of chunks, so that is where rank 0 (which alone decides, by time) has everybody save: the
    saved state is the all-reduced sum over that prefix, which any number of processes, one
    included, can continue. Rank 0 holds the restored state; the other ranks start from zero.
    SIGTERM / SIGINT on any rank (torchrun forwards them to every worker) is deferred to the end of
    the round, where the ranks agree to save and stop with ``Interrupted``. Killed harder (SIGKILL,
    a lost node), a sharded run loses the work since the last save (peers may be gone: no collective).
    """
    if not ctx.is_main:
        for value in state.values():
            value.zero_()
    check = distributed.max_ints(ctx, [start, -start])
    if check[0] != -check[1]:
        raise NfmError(f"ranks disagree on the saved progress ({-check[1]} to {check[0]} units); "
                       "was the output file changed while the job started?")
    chunk = est.chunk_units
    n_chunks = -(-est.units_total // chunk)
    # a single-process save may lie inside a chunk: rank 0 finishes that chunk first
    lead_end = min(est.units_total, -(-start // chunk) * chunk)
    if ctx.is_main:
        for unit in range(start, lead_end):
            est.run_unit(unit, state)
    scratch = tuple(est.scratch_prefixes)
    last_save = time.monotonic()
    c = lead_end // chunk
    units_done = lead_end
    _report(progress, est, units_done)
    with interrupt.deferred():
        while c < n_chunks:
            mine = c + ctx.rank
            if mine < n_chunks:
                for unit in range(mine * chunk, min(est.units_total, (mine + 1) * chunk)):
                    est.run_unit(unit, state)
            c = min(n_chunks, c + ctx.world)
            units_done = min(est.units_total, c * chunk)
            due = ctx.is_main and time.monotonic() - last_save >= save_every_seconds
            # one collective per round: save now? (rank 0's clock) and the largest signal seen
            save, signum = distributed.max_ints(ctx, [int(due), interrupt.pending() or 0])
            if (save and units_done < est.units_total) or signum:
                saved = _save_round(ctx, state, scratch, units_done, save_partial)
                last_save = time.monotonic()
                if signum:
                    interrupt.take()
                    raise interrupt.Interrupted(signum, saved=saved)
            _report(progress, est, units_done)
    distributed.all_reduce_sum(ctx, list(state.values()))
    return est.units_total


def _save_round(ctx: distributed.Dist, state: dict[str, torch.Tensor], scratch: tuple[str, ...], units_done: int,
                save_partial) -> str | None:
    """All ranks: all-reduce a copy of the sums (scratch zeroed: chunks are complete), rank 0 writes."""
    total = {k: v.clone() for k, v in state.items()}
    distributed.all_reduce_sum(ctx, list(total.values()))
    for key, value in total.items():
        if key.startswith(scratch):
            value.zero_()
    saved = save_partial(units_done, total) if ctx.is_main else None
    distributed.barrier(ctx)
    return saved


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _check_choice(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise NfmError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _load_checkpoint(checkpoint: Checkpoint | str | os.PathLike, data_dir) -> Checkpoint:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    return load_checkpoint(checkpoint, data_dir) if data_dir else load_checkpoint(checkpoint)


def _progress(est: Estimator, units_done: int, done: bool) -> dict[str, Any]:
    info = {COMPLETE: done, "units_done": units_done, "units_total": est.units_total, "batches": est.batches,
            "batch_size": est.batch_size, "samples": est.n}
    if not uses_probes(est.name):
        info["samples_done"] = min(est.n, units_done * est.batch_size)
    else:
        info["probes_done"] = units_done // (est.passes * est.batches)
    return info


def _report(progress: ProgressFn, est: Estimator, units_done: int) -> None:
    if progress is None:
        return
    if not uses_probes(est.name):
        report(progress, est.name, min(est.n, units_done * est.batch_size), est.n, unit="samples")
        return
    per_probe = est.passes * est.batches
    probe, rest = divmod(units_done, per_probe)
    done = probe * est.passes * est.n + min(est.passes * est.n, rest * est.batch_size)
    report(progress, est.name, done, est.probes * est.passes * est.n,
           probe=f"{min(probe + 1, est.probes)}/{est.probes}")


def _partial_batch_size(out: Path, force: bool) -> int | None:
    """The batch size a partial hessian-diag file at ``out`` was saved with (None if none)."""
    if force or not out.is_file():
        return None
    try:
        progress = read_artifact(out, KIND).meta.get("progress")
    except NfmError:
        return None                 # previous_run names the problem
    size = progress.get("batch_size") if isinstance(progress, dict) and not is_complete(progress) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 1 else None


def previous_run(out: Path, config: dict[str, Any], checkpoint_sha: str) -> Artifact:
    """The hessian-diag artifact already at ``out``, checked to be of this run (``config``, checkpoint)."""
    hint = "use --force to overwrite it or choose another --out"
    try:
        art = read_artifact(out)
    except NfmError as err:
        raise NfmError(f"exists and is not a readable hessian-diag file ({err.message}); {hint}", out) from None
    if art.kind != KIND:
        raise NfmError(f"exists and is a {art.kind} file, not a hessian-diag file; choose another --out", out)
    parent = (art.meta.get("parents") or {}).get("checkpoint")
    if parent != checkpoint_sha:
        raise NfmError(f"holds a Hessian diagonal of another checkpoint (sha256 {str(parent)[:12]}..., this "
                       f"checkpoint is {checkpoint_sha[:12]}...); {hint}", out)
    old = art.meta.get("config") or {}
    diff = [k for k in IDENTITY_KEYS if old.get(k) != config.get(k)]
    if diff:
        what = ", ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in diff)
        raise NfmError(f"exists with another config ({what}); {hint}", out)
    progress = art.meta.get("progress")
    if not has_completion_flag(progress):
        raise NfmError(f"has no valid nfm.progress entry; {hint}", out)
    if not is_complete(progress) and progress.get("batch_size") != config["batch_size"]:
        raise NfmError(f"is a partial run with --batch-size {progress.get('batch_size')}; rerun with that batch "
                       f"size to continue it (now {config['batch_size']}), or {hint}", out)
    return art


def _restore(art: Artifact, est: Estimator, state: dict[str, torch.Tensor], out: Path) -> tuple[int, float]:
    progress = art.meta["progress"]
    units = progress.get("units_done")
    if (not isinstance(units, int) or progress.get("units_total") != est.units_total
            or not 0 <= units <= est.units_total):
        raise NfmError("partial run's progress does not fit this config (different training set?); "
                       "use --force to start over", out)
    for key, value in state.items():
        saved = art.tensors.get(f"state.{key}")
        if saved is None or saved.shape != value.shape or saved.dtype != value.dtype:
            raise NfmError(f"partial run lacks a valid state tensor state.{key}; use --force to start over", out)
        value.copy_(saved.to(value.device))
    return units, float(art.meta.get("wall_time") or 0.0)


def _as_hessian_diagonal(art: Artifact) -> HessianDiagonal:
    progress = art.meta.get("progress") or {}
    if not is_complete(progress):
        raise NfmError(f"is an unfinished hessian-diag run ({progress.get('units_done', '?')} of "
                       f"{progress.get('units_total', '?')} units); rerun the same nfm hessian-diag command "
                       "to finish it", art.path)
    parent = (art.meta.get("parents") or {}).get("checkpoint")
    if not isinstance(parent, str):
        raise NfmError("has no nfm.parents.checkpoint hash (corrupt file)", art.path)
    config = art.meta.get("config")
    if not isinstance(config, dict) or config.get("loss") not in LOSS_NAMES:
        raise NfmError("has no valid nfm.config.loss entry (corrupt file)", art.path)
    diagonal, stderr = {}, {}
    for name, tensor in art.tensors.items():
        if name.startswith("state."):
            raise NfmError("complete file still holds run state tensors (corrupt file)", art.path)
        if not tensor.is_floating_point():
            raise NfmError(f"tensor {name} is not floating point (corrupt file)", art.path)
        if not torch.isfinite(tensor).all():
            raise NfmError(f"tensor {name} holds NaN or inf", art.path)
        if name.startswith("stderr."):
            stderr[name[len("stderr."):]] = tensor.to(torch.float64)
        else:
            diagonal[name] = tensor.to(torch.float64)
    if not diagonal:
        raise NfmError("holds no Hessian diagonal tensors", art.path)
    return HessianDiagonal(art.path, "read", art.meta.get("config") or {}, diagonal, stderr,
                           art.meta.get("metrics") or {}, float(art.meta.get("wall_time") or 0.0), art.sha256, parent,
                           art)
