"""How the field scores a generalization measure over a hyperparameter grid (``nfm report --protocol``).

Given runs (one trained model each) with a measure mu, the generalization gap g, their config
values on the hyperparameter *axes* (config fields that vary over the runs, the seed excluded) and
their seed:

- ``kendall_tau``: Jiang et al. 2020 ("Fantastic Generalization Measures and Where to Find Them",
  ICLR; eq. 4), tau = mean over pairs of runs of sgn(mu_i - mu_j) sgn(g_i - g_j) (tau-a: a tie
  counts 0).
- ``granulated_kendall`` (Jiang et al. eq. 5): for axis i, psi_i = mean, over the cells that fix
  every other axis (and the seed), of tau within the cell (only axis i varies in it); cells with
  fewer than 2 runs are skipped. ``granulated_kendall_mean`` Psi = mean of psi_i over the axes.
- ``cmi_score`` (Jiang et al. Sec. 5.2): over ordered pairs of distinct runs, V_mu = sgn(mu_i - mu_j),
  V_g = sgn(g_i - g_j) and U_S = the values of both runs on the axes in S;
  K = min over |S| <= 2 of I(V_mu; V_g | U_S) / H(V_g | U_S), both averaged over U_S with its
  empirical probability (sets with H(V_g | U_S) = 0 are undefined and skipped). The PGDL
  competition's scorer averages over the cells of U_S unweighted and only over |S| = 2; this is the
  paper's definition.
- ``robust_sign_error_max`` / ``_p90`` (Dziugaite et al. 2020, "In Search of Robust Measures of
  Generalization", NeurIPS, Sec. 4): an environment is an unordered pair of configs differing in
  exactly one axis; its sign error is the weighted mean over the pairs of runs (one of each config,
  every seed combination) of (1 - sgn(mu_a - mu_b) sgn(g_a - g_b)) / 2, each pair weighted by its
  Hoeffding weight: w = (1 - 2 exp(-2 n (|g_a - g_b| / 2)^2))^2, the probability bound that the two
  gaps, estimated on n test samples, truly differ, shifted to (w - 1/2)_+ as in their experiments
  (n = the smaller test set of the two; without test sizes every pair weighs 1). Environments of
  zero total weight are dropped; the score is the max and the 90th percentile (linear
  interpolation) over the rest.
- 95% bootstrap intervals over seeds (when there are several): each replicate draws as many seeds
  as there are, with replacement (``numpy.random.default_rng(seed).multinomial``, seeds in sorted
  order), and weighs every run by how often its seed was drawn. That is the statistic on the table
  where the runs of a seed drawn k times appear k times, each draw as a seed of its own, and pairs of
  a run with a copy of itself left out. The interval is the 2.5th and 97.5th percentiles of the
  finite replicates.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nfm_cli.errors import NfmError

SCALARS = ("kendall_tau", "granulated_kendall_mean", "cmi_score", "robust_sign_error_max",
           "robust_sign_error_p90")


def _axis_value(value: Any) -> Hashable:
    """Config values as dictionary keys: NaN (an unset number) reads as None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class Grid:
    """The runs of one group as arrays: measure ``mu``, gap ``g``, the axis values per run (``axes``:
    axis -> tuple over runs), ``seed`` per run and the test sizes ``n_test`` (None: unknown)."""

    mu: np.ndarray
    g: np.ndarray
    axes: dict[str, tuple]
    seed: tuple
    n_test: np.ndarray | None = None

    @property
    def configs(self) -> list[tuple]:
        return list(zip(*self.axes.values(), strict=True)) if self.axes else [()] * len(self.mu)


def varying_axes(runs: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> list[str]:
    """The candidate fields that take more than one value over ``runs`` (in candidate order)."""
    return [a for a in candidates if a != "seed" and len({_axis_value(r.get(a)) for r in runs}) > 1]


def make_grid(runs: Sequence[Mapping[str, Any]], measure: str, y: str, axes: Sequence[str],
              test_size_key: str | None = "test_samples") -> Grid:
    """The runs where both ``measure`` and ``y`` are finite numbers, as a ``Grid``."""
    def num(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    keep = [r for r in runs if math.isfinite(num(r.get(measure))) and math.isfinite(num(r.get(y)))]
    n_test = None
    if test_size_key is not None and keep and all(num(r.get(test_size_key)) > 0 for r in keep):
        n_test = np.array([num(r[test_size_key]) for r in keep])
    return Grid(np.array([num(r[measure]) for r in keep], dtype=np.float64),
                np.array([num(r[y]) for r in keep], dtype=np.float64),
                {a: tuple(_axis_value(r.get(a)) for r in keep) for a in axes},
                tuple(_axis_value(r.get("seed")) for r in keep), n_test)


def _pair_weights(w: np.ndarray) -> np.ndarray:
    """Weight of each ordered pair (i, j): w_i w_j, and 0 on the diagonal (a run with its own copies)."""
    pw = np.outer(w, w)
    np.fill_diagonal(pw, 0.0)
    return pw


def kendall_tau(grid: Grid, w: np.ndarray) -> float:
    """Jiang's tau (tau-a) over all pairs of runs, runs weighted by ``w``."""
    pw = _pair_weights(w)
    total = pw.sum()
    if total == 0:
        return math.nan
    s = np.sign(grid.mu[:, None] - grid.mu[None, :]) * np.sign(grid.g[:, None] - grid.g[None, :])
    return float((pw * s).sum() / total)


def granulated_kendall(grid: Grid, w: np.ndarray) -> dict[str, float]:
    """psi_i per axis: the mean of tau over the cells fixing every other axis and the seed."""
    out = {}
    configs = grid.configs
    names = list(grid.axes)
    for k, axis in enumerate(names):
        cells: dict[tuple, list[int]] = {}
        for r, cfg in enumerate(configs):
            cells.setdefault(cfg[:k] + cfg[k + 1:] + (grid.seed[r],), []).append(r)
        taus, weights = [], []
        for members in cells.values():
            idx = np.array(members)
            if len(idx) < 2 or w[idx[0]] == 0:
                continue
            sub = Grid(grid.mu[idx], grid.g[idx], {}, ())
            taus.append(kendall_tau(sub, np.ones(len(idx))))
            weights.append(w[idx[0]])  # one seed per cell: every run in it has its seed's weight
        out[axis] = float(np.average(taus, weights=weights)) if taus else math.nan
    return out


def _pair_codes(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row/column indices of the ordered pairs i != j, and V_mu, V_g in {0, 1, 2} (sign + 1)."""
    n = len(grid.mu)
    i, j = np.nonzero(~np.eye(n, dtype=bool))
    v_mu = (np.sign(grid.mu[i] - grid.mu[j]) + 1).astype(np.int64)
    v_g = (np.sign(grid.g[i] - grid.g[j]) + 1).astype(np.int64)
    return i, j, v_mu, v_g


def _conditioning_codes(grid: Grid, subset: Sequence[str], i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """An integer per pair naming U_S: the values of both runs on the axes in ``subset``."""
    if not subset:
        return np.zeros(len(i), dtype=np.int64)
    labels = list(zip(*[grid.axes[a] for a in subset], strict=True))
    ids = {v: n for n, v in enumerate(dict.fromkeys(labels))}
    run_code = np.array([ids[v] for v in labels], dtype=np.int64)
    return run_code[i] * len(ids) + run_code[j]


def _normalized_cmi(counts: np.ndarray) -> float:
    """I(V_mu; V_g | U) / H(V_g | U) from weighted counts shaped [U, 3 (V_mu), 3 (V_g)]."""
    total = counts.sum()
    if total == 0:
        return math.nan
    p = counts / total
    p_u = p.sum(axis=(1, 2), keepdims=True)
    p_mu_u = p.sum(axis=2, keepdims=True)
    p_g_u = p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.where(p > 0, p * np.log(p * p_u / (p_mu_u * p_g_u)), 0.0).sum()
        h = -np.where(p_g_u > 0, p_g_u * np.log(p_g_u / p_u), 0.0).sum()
    return float(mi / h) if h > 1e-12 else math.nan


class _CmiTables:
    """Pair codes for every conditioning set, computed once, reused by every bootstrap replicate."""

    def __init__(self, grid: Grid, max_set: int = 2):
        self.i, self.j, v_mu, v_g = _pair_codes(grid)
        self.codes = []
        names = list(grid.axes)
        for size in range(min(max_set, len(names)) + 1):
            for subset in itertools.combinations(names, size):
                u = _conditioning_codes(grid, subset, self.i, self.j)
                _, u = np.unique(u, return_inverse=True)
                self.codes.append((int(u.max()) + 1 if len(u) else 1, u * 9 + v_mu * 3 + v_g))

    def score(self, w: np.ndarray) -> float:
        pw = w[self.i] * w[self.j]
        values = []
        for n_u, code in self.codes:
            counts = np.bincount(code, weights=pw, minlength=n_u * 9).reshape(n_u, 3, 3)
            values.append(_normalized_cmi(counts))
        finite = [v for v in values if math.isfinite(v)]
        return min(finite) if finite else math.nan


def hoeffding_weight(delta_gap: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Dziugaite et al.'s weight (1 - 2 exp(-2 n (delta/2)^2))_+^2, then shifted to (w - 1/2)_+."""
    w = np.clip(1.0 - 2.0 * np.exp(-2.0 * n * (np.abs(delta_gap) / 2.0) ** 2), 0.0, None) ** 2
    return np.clip(w - 0.5, 0.0, None)


class _Environments:
    """The run pairs of every environment (configs differing in exactly one axis), with weights."""

    def __init__(self, grid: Grid):
        configs = grid.configs
        by_config: dict[tuple, list[int]] = {}
        for r, cfg in enumerate(configs):
            by_config.setdefault(cfg, []).append(r)
        keys = list(by_config)
        self.envs = []
        for a, b in itertools.combinations(range(len(keys)), 2):
            if sum(x != y for x, y in zip(keys[a], keys[b], strict=True)) != 1:
                continue
            ra, rb = np.array(by_config[keys[a]]), np.array(by_config[keys[b]])
            ia, ib = np.repeat(ra, len(rb)), np.tile(rb, len(ra))
            err = (1.0 - np.sign(grid.mu[ia] - grid.mu[ib]) * np.sign(grid.g[ia] - grid.g[ib])) / 2.0
            hw = (np.ones(len(ia)) if grid.n_test is None else
                  hoeffding_weight(grid.g[ia] - grid.g[ib], np.minimum(grid.n_test[ia], grid.n_test[ib])))
            self.envs.append((ia, ib, err, hw))

    def losses(self, w: np.ndarray) -> np.ndarray:
        out = []
        for ia, ib, err, hw in self.envs:
            weight = hw * w[ia] * w[ib]
            if weight.sum() > 0:
                out.append(float((weight * err).sum() / weight.sum()))
        return np.array(out)


def _scores(grid: Grid, w: np.ndarray, cmi: _CmiTables, envs: _Environments) -> dict[str, Any]:
    psi = granulated_kendall(grid, w)
    finite_psi = [v for v in psi.values() if math.isfinite(v)]
    losses = envs.losses(w)
    return {"kendall_tau": kendall_tau(grid, w), "granulated_kendall": psi,
            "granulated_kendall_mean": float(np.mean(finite_psi)) if finite_psi else math.nan,
            "cmi_score": cmi.score(w),
            "robust_sign_error_max": float(losses.max()) if losses.size else math.nan,
            "robust_sign_error_p90": float(np.percentile(losses, 90)) if losses.size else math.nan,
            "environments": int(losses.size)}


def _interval(values: Sequence[float]) -> list[float] | None:
    v = np.array([x for x in values if math.isfinite(x)])
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v.size else None


def seed_weights(grid: Grid, counts: np.ndarray) -> np.ndarray:
    """Per-run weights from how often each distinct seed (numbers in increasing order first) was drawn."""
    seeds = sorted(set(grid.seed), key=lambda s: (0, s, "") if isinstance(s, (int, float)) else (1, 0, repr(s)))
    index = {s: k for k, s in enumerate(seeds)}
    return np.array([counts[index[s]] for s in grid.seed], dtype=np.float64)


def protocol_scores(grid: Grid, *, bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """Every score of the module docstring for one measure, with bootstrap intervals over seeds."""
    if bootstrap < 0:
        raise NfmError(f"bootstrap replicates must be non-negative, not {bootstrap}")
    cmi, envs = _CmiTables(grid), _Environments(grid)
    result = _scores(grid, np.ones(len(grid.mu)), cmi, envs)
    n_seeds = len(set(grid.seed))
    result.update({"n_runs": len(grid.mu), "n_seeds": n_seeds, "axes": list(grid.axes), "ci95": None})
    if n_seeds < 2 or bootstrap == 0:
        return result
    rng = np.random.default_rng(seed)
    reps = [_scores(grid, seed_weights(grid, rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds))),
                    cmi, envs) for _ in range(bootstrap)]
    ci: dict[str, Any] = {k: _interval([r[k] for r in reps]) for k in SCALARS}
    ci["granulated_kendall"] = {a: _interval([r["granulated_kendall"][a] for r in reps]) for a in grid.axes}
    result["ci95"] = ci
    return result
