"""The estimators as sequences of work units over a fixed batch order, with explicit state.

A run is ``units_total`` units done in order 0, 1, 2, ...; every unit reads the state, computes its
contribution, and only then adds it to the state (float64, always in the same order). The state is
a dict of tensors, so it can be saved after any unit and restored: a resumed run performs exactly
the same floating-point operations as an uninterrupted one.

* exact, ggn:  unit u = batch u;                 state sum.<p> (sum over samples of the diagonal).
* hutchinson:  unit u = (probe u // B, batch);   state pass.<p> (the probe's H z so far), and over
               finished probes sum.<p>, sumsq.<p> of the estimates z * H z and per-tensor traces.
* finite-diff: unit u = (probe, side +/-, batch); state plus.<p>, minus.<p> (gradient sums), and
               sum/sumsq as for hutchinson.

B = number of batches. Results: the diagonal of the Hessian of the *mean* loss (sum / N), and for the
stochastic estimators the per-element standard error of the mean over probes (eq. 60's average).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nfm_cli.curvature.exact import BatchDiagonal, exact_diagonal_batch
from nfm_cli.curvature.graph import CurvaturePlan
from nfm_cli.curvature.losses import degenerate_mask
from nfm_cli.curvature.registry import AUTO, estimator_spec
from nfm_cli.curvature.split import SubBatches, add_dicts, combine_with_logits
from nfm_cli.curvature.stochastic import (
    FD_SCALE,
    finite_difference_radii,
    gaussian_probe,
    gradient_sum,
    hessian_vector_sum,
    model_parameters,
    rademacher_probe,
)
from nfm_cli.curvature.support import (
    check_exact_supported,
    check_ggn_supported,
    curvature_plan,
    parameterised_layers,
)
from nfm_cli.runtime.progress import ProgressFn


@dataclass
class DiagonalEstimate:
    """A finished estimate: {parameter: float64 diagonal}, per-element standard errors (stochastic
    estimators with >= 2 probes), and summary metrics (per-tensor trace, its standard error, ...)."""

    diagonal: dict[str, torch.Tensor]
    stderr: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class Estimator:
    """Common driver interface; see the module docstring. Subclasses are registered in
    ``curvature.registry`` and built by ``make_estimator`` through ``create``."""

    name = ""

    @classmethod
    def check_supported(cls, model: nn.Module) -> None:
        """Raise ``NfmError`` when this estimator cannot handle ``model`` (before any work)."""

    @classmethod
    def create(cls, model, x, y, loss, batch_size, *, probes, seed, finite_diff_scale) -> Estimator:
        return cls(model, x, y, loss, batch_size)

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, batch_size: int):
        self.model, self.x, self.y, self.loss = model, x, y, loss
        self.batch_size = batch_size
        self.n = len(y)
        self.batches = math.ceil(self.n / batch_size)
        self.params = model_parameters(model)
        self.names = list(self.params)
        self.splitter = SubBatches(batch_size)   # halves the batch on out-of-memory (split.py)

    # -- bookkeeping ------------------------------------------------------------------------
    units_total: int = 0
    # Sharding (torchrun): units come in independent chunks of ``chunk_units`` consecutive units
    # (exact: one batch; probe estimators: one whole probe); chunk c goes to rank c % world. State keys
    # starting with a ``scratch_prefixes`` entry are per-chunk scratch, everything else is a sum.
    scratch_prefixes: tuple[str, ...] = ()

    @property
    def chunk_units(self) -> int:
        return 1

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = slice(b * self.batch_size, min(self.n, (b + 1) * self.batch_size))
        return self.x[part], self.y[part]

    def samples_in(self, b: int) -> int:
        return min(self.n, (b + 1) * self.batch_size) - b * self.batch_size

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in self.params.items()}

    def initial_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe_unit(self, unit: int) -> dict[str, int]:
        """{"probe": p, "batch": b, ...} of a unit, for progress display and metadata."""
        raise NotImplementedError

    def run_unit(self, unit: int, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def finish(self, state: dict[str, torch.Tensor]) -> DiagonalEstimate:
        raise NotImplementedError

    def _count_degenerate(self, logits: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if self.loss == "normalized-ce":
            state["degenerate"] += int(degenerate_mask(logits).sum())


def _add(state: dict[str, torch.Tensor], prefix: str, values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        state[f"{prefix}.{name}"] += value


class ExactEstimator(Estimator):
    """Gauss-Newton identity for piecewise-linear networks (``exact.py``), one unit per batch."""

    name = "exact"

    @classmethod
    def check_supported(cls, model):
        check_exact_supported(model)

    @classmethod
    def plan(cls, model: nn.Module) -> CurvaturePlan:
        return parameterised_layers(model)

    def __init__(self, model, x, y, loss, batch_size):
        super().__init__(model, x, y, loss, batch_size)
        self.layers = self.plan(model)
        self.units_total = self.batches

    def initial_state(self):
        state = {f"sum.{n}": z for n, z in self._zeros().items()}
        state["degenerate"] = torch.zeros((), dtype=torch.int64)
        return state

    def describe_unit(self, unit):
        return {"batch": unit, "samples": self.samples_in(unit)}

    def run_unit(self, unit, state):
        x, y = self.batch(unit)
        part = self.splitter.run(lambda xb, yb: exact_diagonal_batch(self.model, xb, yb, self.loss, self.layers),
                                 x, y, combine_exact)
        self.add_part(state, part)

    @staticmethod
    def add_part(state: dict[str, torch.Tensor], part: BatchDiagonal) -> None:
        """Add one batch's sums to the state (also ``measure``'s shared forward, steps/measure_shared.py)."""
        _add(state, "sum", part.sums)
        state["degenerate"] += part.degenerate

    def finish(self, state):
        diagonal = {n: state[f"sum.{n}"] / self.n for n in self.names}
        return DiagonalEstimate(diagonal, {}, _trace_metrics(diagonal, state))


class GaussNewtonEstimator(ExactEstimator):
    """The exact diagonal of the generalized Gauss-Newton matrix sum_b J_b^T H_b J_b (H_b the loss Hessian
    in the logits) for any graph whose parameters enter through operations with rules: the machinery of
    ``exact`` without its piecewise-linearity requirement. Not the Hessian unless the graph is piecewise
    linear in each weight (then it equals ``exact``)."""

    name = "ggn"

    @classmethod
    def check_supported(cls, model):
        check_ggn_supported(model)

    @classmethod
    def plan(cls, model: nn.Module) -> CurvaturePlan:
        return curvature_plan(model)


class _ProbeEstimator(Estimator):
    """Mean over ``probes`` probes of a per-probe estimate; running sums give the standard error."""

    passes = 1   # full passes over the data per probe

    @property
    def chunk_units(self) -> int:
        return self.passes * self.batches

    @classmethod
    def create(cls, model, x, y, loss, batch_size, *, probes, seed, finite_diff_scale):
        return cls(model, x, y, loss, batch_size, probes, seed)

    def __init__(self, model, x, y, loss, batch_size, probes: int, seed: int):
        super().__init__(model, x, y, loss, batch_size)
        self.probes, self.seed = probes, seed
        self.units_total = probes * self.passes * self.batches
        self._probe_cache: tuple[int, dict[str, torch.Tensor]] | None = None

    def probe(self, index: int) -> dict[str, torch.Tensor]:
        if self._probe_cache is None or self._probe_cache[0] != index:
            self._probe_cache = (index, self.draw_probe(index))
        return self._probe_cache[1]

    def draw_probe(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe_unit(self, unit):
        probe, rest = divmod(unit, self.passes * self.batches)
        side, batch = divmod(rest, self.batches)
        info = {"probe": probe, "batch": batch, "samples": self.samples_in(batch)}
        if self.passes > 1:
            info["side"] = side
        return info

    def _stats_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for prefix in ("sum", "sumsq"):
            state.update({f"{prefix}.{n}": z for n, z in self._zeros().items()})
        state["trace_sum"] = torch.zeros(len(self.names), dtype=torch.float64)
        state["trace_sumsq"] = torch.zeros(len(self.names), dtype=torch.float64)
        state["degenerate"] = torch.zeros((), dtype=torch.int64)
        return state

    def _finish_probe(self, estimate: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
        traces = torch.tensor([float(estimate[n].sum()) for n in self.names], dtype=torch.float64)
        for n in self.names:
            state[f"sum.{n}"] += estimate[n]
            state[f"sumsq.{n}"] += estimate[n] * estimate[n]
        state["trace_sum"] += traces
        state["trace_sumsq"] += traces * traces

    def finish(self, state):
        m = self.probes
        diagonal = {n: state[f"sum.{n}"] / m for n in self.names}
        stderr = {}
        if m >= 2:
            for n in self.names:
                variance = (state[f"sumsq.{n}"] - state[f"sum.{n}"] ** 2 / m) / (m - 1)
                stderr[n] = (variance.clamp_min(0) / m).sqrt()
        metrics = _trace_metrics(diagonal, state)
        if m >= 2:
            trace_var = (state["trace_sumsq"] - state["trace_sum"] ** 2 / m) / (m - 1)
            trace_se = (trace_var.clamp_min(0) / m).sqrt()
            metrics["trace_stderr"] = {n: float(trace_se[i]) for i, n in enumerate(self.names)}
        return DiagonalEstimate(diagonal, stderr, metrics)


class HutchinsonEstimator(_ProbeEstimator):
    """Eq. (60) with Rademacher probes and exact Hessian-vector products."""

    name = "hutchinson"
    scratch_prefixes = ("pass.",)

    def draw_probe(self, index):
        return rademacher_probe(self.params, self.seed, index)

    def initial_state(self):
        state = self._stats_state()
        state.update({f"pass.{n}": z for n, z in self._zeros().items()})
        return state

    def run_unit(self, unit, state):
        info = self.describe_unit(unit)
        probe, batch = info["probe"], info["batch"]
        z = self.probe(probe)
        x, y = self.batch(batch)
        hv, logits = self.splitter.run(
            lambda xb, yb: hessian_vector_sum(self.model, self.params, xb, yb, self.loss, z), x, y, combine_with_logits)
        if batch == 0:
            for n in self.names:
                state[f"pass.{n}"].zero_()
        _add(state, "pass", hv)
        if probe == 0:
            self._count_degenerate(logits, state)
        if batch == self.batches - 1:
            self._finish_probe({n: z[n].double() * state[f"pass.{n}"] / self.n for n in self.names}, state)


class FiniteDifferenceEstimator(_ProbeEstimator):
    """Algorithm 1 / eq. (61): central differences of full-set gradients at theta +- r eps."""

    name = "finite-diff"
    passes = 2
    scratch_prefixes = ("plus.", "minus.")

    @classmethod
    def create(cls, model, x, y, loss, batch_size, *, probes, seed, finite_diff_scale):
        return cls(model, x, y, loss, batch_size, probes, seed, finite_diff_scale)

    def __init__(self, model, x, y, loss, batch_size, probes, seed, scale: float = FD_SCALE):
        super().__init__(model, x, y, loss, batch_size, probes, seed)
        self.scale = scale
        self.radii = finite_difference_radii(self.params, scale)
        self._point_cache: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None

    def draw_probe(self, index):
        return gaussian_probe(self.params, self.seed, index)

    def initial_state(self):
        state = self._stats_state()
        for prefix in ("plus", "minus"):
            state.update({f"{prefix}.{n}": z for n, z in self._zeros().items()})
        return state

    def point(self, probe: int, side: int) -> dict[str, torch.Tensor]:
        """theta + r eps (side 0) or theta - r eps (side 1)."""
        key = (probe, side)
        if self._point_cache is None or self._point_cache[0] != key:
            eps = self.probe(probe)
            sign = 1.0 if side == 0 else -1.0
            self._point_cache = (key, {n: p + (sign * self.radii[n]) * eps[n] for n, p in self.params.items()})
        return self._point_cache[1]

    def run_unit(self, unit, state):
        info = self.describe_unit(unit)
        probe, side, batch = info["probe"], info["side"], info["batch"]
        x, y = self.batch(batch)
        point = self.point(probe, side)
        grads, logits = self.splitter.run(
            lambda xb, yb: gradient_sum(self.model, point, xb, yb, self.loss), x, y, combine_with_logits)
        prefix = "plus" if side == 0 else "minus"
        if batch == 0:
            for n in self.names:
                state[f"{prefix}.{n}"].zero_()
        _add(state, prefix, grads)
        if probe == 0 and side == 0:
            self._count_degenerate(logits, state)
        if side == 1 and batch == self.batches - 1:
            eps = self.probe(probe)
            estimate = {n: eps[n].double() * (state[f"plus.{n}"] - state[f"minus.{n}"])
                        / (2.0 * self.radii[n] * self.n) for n in self.names}
            self._finish_probe(estimate, state)


def combine_exact(parts: list[BatchDiagonal]) -> BatchDiagonal:
    """The sums of the sub-batches a batch was split into (out of memory, ``split.py``)."""
    return BatchDiagonal(add_dicts([p.sums for p in parts]), sum(p.degenerate for p in parts))


def _trace_metrics(diagonal: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    traces = {n: float(d.sum()) for n, d in diagonal.items()}
    return {"trace": traces, "trace_total": float(sum(traces.values())),
            "negative_fraction": float(sum(int((d < 0).sum()) for d in diagonal.values())
                                       / max(1, sum(d.numel() for d in diagonal.values()))),
            "degenerate_samples": int(state["degenerate"])}


def estimator_class(name: str) -> type[Estimator]:
    """The Estimator class registered as ``name`` (``curvature.registry``; not ``auto``)."""
    return estimator_spec(name).load()


def resolve_estimator(name: str, model: nn.Module) -> tuple[str, str | None]:
    """(the estimator to run, why) for ``name``: ``auto`` becomes ``exact`` where the graph is piecewise
    linear in each weight, else ``ggn`` with the reason (e.g. "GELU at 'blocks.0.mlp.act': ..."); any
    other name is checked against the model (``check_supported``) and returned with None."""
    if name != AUTO:
        estimator_class(name).check_supported(model)
        return name, None
    plan = curvature_plan(model)          # raises for what neither exact estimator handles
    if plan.nonlinear is None:
        return "exact", "the graph is piecewise linear in each weight: using the exact Hessian diagonal"
    why = str(plan.nonlinear).split("; ")[1] if "; " in str(plan.nonlinear) else str(plan.nonlinear)
    return "ggn", f"{why}: using the Gauss-Newton diagonal (ggn), not the Hessian's"


def make_estimator(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, *,
                   batch_size: int, probes: int | None = None, seed: int = 0,
                   finite_diff_scale: float = FD_SCALE, progress: ProgressFn = None) -> Estimator:
    """The estimator ``name`` (registered in ``curvature.registry``; ``auto`` resolved with
    ``resolve_estimator`` first) over (x, y); the model must be in eval mode. ``progress`` receives a
    note when a batch is split after running out of memory."""
    if name == AUTO:
        name, _ = resolve_estimator(name, model)
    est = estimator_class(name).create(model, x, y, loss, batch_size, probes=probes, seed=seed,
                                       finite_diff_scale=finite_diff_scale)
    est.splitter.progress = progress
    return est


def estimate_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, estimator: str = "exact",
                      *, batch_size: int = 128, probes: int | None = None, seed: int = 0,
                      finite_diff_scale: float = FD_SCALE) -> DiagonalEstimate:
    """Run an estimator to the end in memory (no file, no resume): tests, benchmarks, notebooks."""
    est = make_estimator(estimator, model, x, y, loss, batch_size=batch_size, probes=probes, seed=seed,
                         finite_diff_scale=finite_diff_scale)
    state = est.initial_state()
    for unit in range(est.units_total):
        est.run_unit(unit, state)
    return est.finish(state)
