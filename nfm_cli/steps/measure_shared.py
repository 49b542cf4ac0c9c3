"""``measure``'s shared forward pass (issue 22 item 3): the ``normalized-ce`` and ``ce`` diagonals and the
Fisher-Rao sums (eq. 25) of one batch from ONE forward pass and its captured layer inputs, then
2(K-1) + 1 directions back-propagated through the same graph (``CapturedForward.square_sums``).

Each diagonal is computed exactly as ``nfm hessian-diag --loss X`` computes it alone (the same forward,
the same directions, the same rules, summed into float64 in the same unit order), so the two kept files
are bit-identical to separate runs. The run is one sequence of units (batches) with one state: the
``normalized-ce`` estimator's keys as they are, the ``ce`` estimator's under ``shared.ce.``, the
Fisher-Rao sums under ``shared.fisher.``; partial saves go to the ``normalized-ce`` file (a standalone
``hessian-diag`` can continue it, ignoring the shared keys), and at the end both files are written.

Only for the exact and ggn estimators, and only where neither file was started otherwise (the
``ce`` file absent, the ``normalized-ce`` file absent or a partial file of this shared run); any other
case runs the two diagonals one after the other (``measure.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nfm_cli.curvature.estimators import Estimator, ExactEstimator, combine_exact, make_estimator
from nfm_cli.curvature.exact import BatchDiagonal, CapturedForward, logit_hessian_factor
from nfm_cli.curvature.losses import degenerate_mask
from nfm_cli.curvature.split import add_dicts
from nfm_cli.data.datasets import subset_indices
from nfm_cli.measures.fisher_rao import FISHER_RAO_LOSS, batch_square_sums, fisher_rao_from_sums
from nfm_cli.runtime import distributed
from nfm_cli.runtime.devices import resolve_device
from nfm_cli.runtime.progress import ProgressFn
from nfm_cli.steps import hessian_diag as hd
from nfm_cli.store.artifacts import is_complete
from nfm_cli.store.checkpoint import Checkpoint

SHARED_ESTIMATORS = ("exact", "ggn")
LOSSES = ("normalized-ce", "ce")        # the first one's file holds the partial state
SECONDARY, FISHER = "shared.ce.", "shared.fisher."


class SharedForwardEstimator(Estimator):
    """Units = batches; each unit one forward pass, then the directions of both losses and the loss gradient."""

    def __init__(self, primary: ExactEstimator, secondary: ExactEstimator):
        super().__init__(primary.model, primary.x, primary.y, primary.loss, primary.batch_size)
        self.name, self.units_total = primary.name, primary.units_total
        self.primary, self.secondary = primary, secondary
        self.splitter = primary.splitter

    def initial_state(self):
        state = self.primary.initial_state()
        state.update({SECONDARY + k: v for k, v in self.secondary.initial_state().items()})
        state.update({FISHER + n: z for n, z in self._zeros().items()})
        return state

    def describe_unit(self, unit):
        return self.primary.describe_unit(unit)

    def run_unit(self, unit, state):
        x, y = self.batch(unit)
        primary, secondary, fisher = self.splitter.run(self._batch, x, y, _combine)
        self.primary.add_part(state, primary)
        part = self.secondary_state(state)
        self.secondary.add_part(part, secondary)            # adds in place: the views are the state's tensors
        for name, value in fisher.items():
            state[FISHER + name] += value

    def _batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[BatchDiagonal, BatchDiagonal, dict]:
        forward = CapturedForward(self.model, x, self.primary.layers)
        logits = forward.logits.detach()
        parts = []
        for loss in LOSSES:
            directions, signs = logit_hessian_factor(logits, y, loss)
            degenerate = int(degenerate_mask(logits).sum()) if loss == "normalized-ce" else 0
            parts.append(BatchDiagonal(forward.square_sums(directions, signs, keep_graph=True), degenerate))
        return parts[0], parts[1], batch_square_sums(forward, y, FISHER_RAO_LOSS)

    def primary_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if not k.startswith("shared.")}

    def secondary_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[len(SECONDARY):]: v for k, v in state.items() if k.startswith(SECONDARY)}

    def fisher_sums(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: state[FISHER + n] for n in self.names}

    def finish(self, state):
        return self.primary.finish(self.primary_state(state))


def _combine(parts):
    return (combine_exact([p[0] for p in parts]), combine_exact([p[1] for p in parts]),
            add_dicts([p[2] for p in parts]))


def shared_hessians(ck: Checkpoint, paths: dict[str, Path], *, estimator: str, samples: int | None,
                    batch_size: int | None, seed: int, device: str, force: bool, save_every_seconds: float,
                    progress: ProgressFn) -> tuple[dict[str, hd.HessianDiagonal], float] | None:
    """Both diagonals and the Fisher-Rao norm from one forward pass per batch, resumably; None where the
    shared run does not apply (module docstring): the caller then runs them one after the other."""
    if estimator not in SHARED_ESTIMATORS:
        return None
    outs = {loss: hd.output_path(paths[loss]) for loss in LOSSES}
    ck = hd.complete_checkpoint(ck, None, outs[LOSSES[0]])
    if not force and outs[LOSSES[1]].exists():
        return None
    model = ck.model
    model.eval()
    ctx, dev = distributed.setup(resolve_device(device))
    if not ctx.is_main:
        progress = None
    x_all, y_all = ck.training_tensors(device="cpu")
    use = hd.sample_count(samples, len(y_all))
    batch_size = hd.resolve_batch_size(batch_size, outs[LOSSES[0]], force, model, x_all[:1], estimator, use, ctx, dev)
    metas = {loss: _meta(ck, hd.hessian_config(loss, estimator, use, len(y_all), None, seed, 0.0, batch_size), dev)
             for loss in LOSSES}
    previous = _shared_partial(outs[LOSSES[0]], metas[LOSSES[0]], ck, force)
    if previous is False:
        return None
    idx = subset_indices(len(y_all), use, seed, "hessian-samples")
    x, y = x_all[idx].to(dev), y_all[idx].to(dev)
    model.to(dev)
    primary, secondary = (make_estimator(estimator, model, x, y, loss, batch_size=batch_size, progress=progress)
                          for loss in LOSSES)
    est = SharedForwardEstimator(primary, secondary)
    run = hd.run_units(ctx, est, previous, outs[LOSSES[0]], metas[LOSSES[0]], save_every_seconds, progress)
    results = {LOSSES[0]: hd.write_complete(ctx, primary, est.finish(run.state), run, outs[LOSSES[0]],
                                            metas[LOSSES[0]], ck),
               LOSSES[1]: hd.write_complete(ctx, secondary, secondary.finish(est.secondary_state(run.state)), run,
                                            outs[LOSSES[1]], metas[LOSSES[1]], ck)}
    return results, fisher_rao_from_sums(model, est.fisher_sums(run.state), est.n)


def _meta(ck: Checkpoint, config: dict[str, Any], dev) -> dict[str, Any]:
    """What ``compute_hessian_diagonal`` records besides progress, metrics and wall time."""
    source = {"checkpoint": str(ck.path), "model": ck.model_spec.get("name"), "device": str(dev)}
    return {"config": config, "parents": {"checkpoint": ck.sha256}, "source": source}


def _shared_partial(out: Path, meta: dict[str, Any], ck: Checkpoint, force: bool):
    """None: start afresh; the partial file of an earlier shared run to continue; False: ``out`` holds
    something else (complete, or partial without the shared state), for the one-after-the-other path."""
    if force or not out.exists():
        return None
    previous = hd.previous_run(out, meta["config"], ck.sha256)
    if is_complete(previous.meta["progress"]):
        return False
    if not any(name.startswith("state." + FISHER) for name in previous.tensors):
        return False
    return previous


__all__ = ["SHARED_ESTIMATORS", "SharedForwardEstimator", "shared_hessians"]
