"""Per-layer variance solver for the normalized sharpness (Tsuzuku, Sato, Sugiyama, ICML 2020).

For one weight matrix with squared weights ``w2[i, j] = W_ij**2`` and Hessian diagonal
``h[i, j] >= 0`` (already clipped at 0 by the caller), the paper's eq. (17) with lambda = 1/2 reads

    S_l = inf_{a, b > 0}  sum_ij  h_ij a_i b_j + w2_ij / (a_i b_j),        a_i = sigma_i**2, b_j = sigma'_j**2.

For a convolution ``[out, in, kh, kw]`` every kernel position of (i, j) shares sigma_i sigma'_j
(Sec. 5.3), so h and w2 are summed over the kernel positions first (:func:`to_matrix`); a grouped
convolution gives the block-diagonal [out, in] matrix of its real connections.
Another lambda only rescales the value: S_l(lambda) = S_l(1/2) * sqrt((1/2) / lambda)
(Sec. 5.3, :func:`lambda_scale`).

Algorithm (exact, float64, no SGD)
----------------------------------
In ``x = log a``, ``y = log b`` the objective is convex (Appendix B, eqs. (48)-(58)); its Hessian is
``[[diag(rowsum G), G], [G^T, diag(colsum G)]]`` with ``G_ij = h_ij a_i b_j + w2_ij / (a_i b_j)``
(eqs. (52)-(55)), singular only along the gauge direction ``a -> c a, b -> b / c``.
Each strongly connected "core" (see below) is solved by

1. a few exact block-coordinate sweeps ``a_i = sqrt(sum_j w2_ij / b_j / sum_j h_ij b_j)`` (and the
   same for b), which are cheap and robust far from the optimum, then
2. damped Newton steps in log space: the Newton system is reduced to the smaller side by a Schur
   complement (a weighted graph Laplacian), one node is grounded to remove the gauge null space,
   and the reduced SPD system is solved by a diagonally scaled Cholesky factorisation; a
   backtracking (Armijo) line search keeps every step a descent step. Near the optimum Newton
   converges quadratically (typically 2-3 Newton steps after the sweeps).
3. on very ill-conditioned cores, rows/columns whose terms lie below the rounding level of f
   cannot be steered by f; steps are then accepted when f does not increase beyond rounding and
   the residual (below) decreases, and exact block sweeps are interleaved with Newton steps.

All terms are evaluated in the log domain (``exp(log h + x_i + y_j)``, ``log 0 = -inf``), so zero
entries never produce ``0 * inf``.

After every step the gauge is fixed by making the geometric means of a and b equal
(``mean(x) == mean(y)``) on the core. The data of each core are normalised by their largest
entries before solving (the objective is homogeneous), and rescaled afterwards.

Stopping rule: the *relative objective change* of the last step ``|f_prev - f| / f`` and the
*optimality residual* are both ``<= tol``. The residual is the largest relative imbalance of the
stationarity conditions (the log-space gradient, normalised row/column-wise)::

    residual = max( max_i |P_i - Q_i| / (P_i + Q_i),  max_j |P'_j - Q'_j| / (P'_j + Q'_j) )

with ``P_i = sum_j h_ij a_i b_j``, ``Q_i = sum_j w2_ij / (a_i b_j)`` (row sums) and ``P'_j``, ``Q'_j``
the column sums. It is scale free and lies in [0, 1]; 0 means exactly stationary. For a layer
with several cores the reported residual is the maximum over the cores.
``max_iter`` bounds the iterations (sweeps + Newton steps) per core; if hit, ``converged=False``.

Degenerate input and non-attained infima
----------------------------------------
Consider the directed bipartite graph with an arc row i -> column j for every h_ij > 0 and an arc
column j -> row i for every w2_ij > 0. Number its strongly connected components (SCCs) K in a
topological order t(K) of the condensation and shift the log-variables of each by its own gauge,
``x_i += M t(K), y_j -= M t(K)``. Terms inside an SCC do not change; the term on an arc from K to
K' (t(K) < t(K')) is multiplied by ``exp(-M (t(K') - t(K)))`` (for an h-arc row i in K -> col j in
K', and likewise for a w2-arc), so it vanishes as M -> inf. All terms being >= 0, this gives

    S_l = sum over SCCs K with at least one arc inside of  min over K's block,

and within an SCC every arc lies on a directed cycle, which makes the objective coercive modulo
the gauge (a recession direction would be a potential non-decreasing along every arc, hence
constant on cycles): the minimum there is attained and unique up to the gauge. These SCCs are
the "cores"; each is solved independently (one gauge per core).

This contains the simple rules: a row whose h-row is all zero (w2 row nonzero) has a_i -> inf and
its terms vanish; a row whose w2-row is all zero has a_i -> 0 and its terms vanish; the same for
columns; removing one can make another degenerate (the cores are found with a trimmed
forward-backward SCC search, which removes such rows/columns iteratively first). It also covers
supports that defeat the simple rules, e.g. ``h = [[1, 1], [0, 1]]``, ``w2 = [[1, 0], [0, 1]]``
where every row and column has nonzero h and w2 but the infimum 4 is not attained.
An all-zero layer has value 0.

Sentinel: rows/columns that belong to no core (their optimal variance is a limit, 0 or infinity,
or irrelevant for an all-zero row) get ``sigma = 0`` meaning "undetermined / limit"; they are
counted in ``degenerate_rows`` / ``degenerate_cols``. Each core has its own gauge. The returned
value, sigmas and residual are always finite. ``attained`` is True when every nonzero entry of h or
w2 lies inside a core, i.e. the returned sigmas (ignoring rows/columns with sigma = 0, whose entries
are then all zero) achieve ``value``; when False, ``value`` is the (non-attained) infimum and the
sigmas are the per-core minimisers.

Matrix-normalized sharpness (Sec. 4, eq. (13))
----------------------------------------------
:func:`matrix_normalized_layer` solves the same objective with one shared scalar ``a_i b_j = s``:
``min_s H s + F / s = 2 sqrt(H F)`` with ``H = sum h``, ``F = sum w2``. The paper's (13) drops the
constant factor 2 (it writes sqrt(F H)); we keep it so that ``S_l <= matrix_normalized_layer``
holds for every layer (the shared scalar is a feasible point of the per-row/column problem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nfm_cli.choices import SOLVER_MAX_ITER, SOLVER_TOL

__all__ = [
    "LayerSolution",
    "solve_layer",
    "matrix_normalized_layer",
    "lambda_scale",
    "to_matrix",
]

_DT = torch.float64
_N_SWEEPS = 3          # block-coordinate sweeps before Newton
_MAX_LOG_STEP = 20.0   # trust bound on a Newton step in log space
_QUAD_REGION = 1e-2    # steps smaller than this (in log space) are taken without line search
_ARMIJO = 1e-4


@dataclass(frozen=True)
class LayerSolution:
    """Solution of the per-layer problem (17) with lambda = 1/2 (see module docstring)."""

    value: float             # S_l, the infimum (finite, >= 0)
    sigma_row: torch.Tensor  # float64 [R], sigma_i = sqrt(a_i); 0 = undetermined/limit
    sigma_col: torch.Tensor  # float64 [C], sigma'_j = sqrt(b_j); 0 = undetermined/limit
    iterations: int          # sweeps + Newton steps, summed over cores
    residual: float          # max relative stationarity imbalance over all cores (module doc)
    converged: bool          # every core met the stopping rule within max_iter
    degenerate_rows: int     # rows in no core (sigma = 0)
    degenerate_cols: int     # columns in no core (sigma = 0)
    cores: int = 1           # number of strongly connected cores solved
    attained: bool = True    # every nonzero entry lies inside a core (infimum attained)


# --------------------------------------------------------------------------- validation


def _as_f64(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{name}: cannot convert to a tensor ({exc})") from None
    if t.is_complex():
        raise ValueError(f"{name}: complex input is not supported")
    return t.detach().to(device="cpu", dtype=_DT)


def _check_pair(w2, h) -> tuple[torch.Tensor, torch.Tensor]:
    w2 = _as_f64(w2, "w2")
    h = _as_f64(h, "h")
    if w2.ndim != 2 or h.ndim != 2:
        raise ValueError(f"w2 and h must be 2-D [rows, cols]; got shapes {tuple(w2.shape)} and {tuple(h.shape)}")
    if w2.shape != h.shape:
        raise ValueError(f"shape mismatch: w2 {tuple(w2.shape)} vs h {tuple(h.shape)}")
    if not bool(torch.isfinite(w2).all()):
        raise ValueError("w2 contains NaN or inf")
    if not bool(torch.isfinite(h).all()):
        raise ValueError("h contains NaN or inf")
    if bool((w2 < 0).any()):
        raise ValueError("w2 (squared weights) has negative entries")
    if bool((h < 0).any()):
        raise ValueError("h has negative entries; clip the Hessian diagonal at 0 first")
    return w2, h


def to_matrix(weight: torch.Tensor, hdiag: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(w2, h) as float64 [out, in] matrices for a Linear ``[out, in]`` or Conv ``[out, in / groups, *k]`` weight.

    ``hdiag`` (same shape as ``weight``) is clipped at 0 *before* summing over the kernel positions.
    ``groups`` (a grouped or depthwise conv): row i belongs to group g = i // (out / groups) and its
    column j of the weight is input channel g * (in / groups) + j. The result is the full
    [out, in] matrix, zero outside the groups: every real connection (i, j) shares sigma_i sigma'_j
    (Sec. 5.3) with one sigma' per input channel, and an absent connection has h = w2 = 0, so it
    contributes nothing to (17).
    """
    weight = _as_f64(weight, "weight")
    hdiag = _as_f64(hdiag, "hdiag")
    if weight.shape != hdiag.shape:
        raise ValueError(f"shape mismatch: weight {tuple(weight.shape)} vs hdiag {tuple(hdiag.shape)}")
    if weight.ndim < 2:
        raise ValueError(f"weight must have at least 2 dims [out, in, ...]; got {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()) or not bool(torch.isfinite(hdiag).all()):
        raise ValueError("weight or hdiag contains NaN or inf")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups must divide the {weight.shape[0]} output channels; got {groups}")
    w2 = weight.square()
    h = hdiag.clamp_min(0.0)
    if weight.ndim > 2:
        dims = tuple(range(2, weight.ndim))
        w2 = w2.sum(dim=dims)
        h = h.sum(dim=dims)
    if groups > 1:
        w2, h = _block_diagonal(w2, groups), _block_diagonal(h, groups)
    return w2.contiguous(), h.contiguous()


def _block_diagonal(per_group: torch.Tensor, groups: int) -> torch.Tensor:
    """[out, in / groups] -> [out, in]: row block g placed at column block g, zeros elsewhere."""
    out, width = per_group.shape
    full = per_group.new_zeros(groups, out // groups, groups, width)
    index = torch.arange(groups)
    full[index, :, index, :] = per_group.reshape(groups, out // groups, width)
    return full.reshape(out, groups * width)


# --------------------------------------------------------------------------- closed forms


def matrix_normalized_layer(w2: torch.Tensor, h: torch.Tensor) -> float:
    """``min_s sum_ij h_ij s + w2_ij / s = 2 sqrt(sum h * sum w2)`` (eq. (13) times 2, lambda = 1/2)."""
    w2, h = _check_pair(w2, h)
    return 2.0 * math.sqrt(float(h.sum()) * float(w2.sum()))


def lambda_scale(value: float, lam: float) -> float:
    """Value of (17) at another lambda from the lambda = 1/2 value: ``value * sqrt((1/2) / lam)``."""
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lambda must be a positive finite number, got {lam}")
    return float(value) * math.sqrt(0.5 / lam)


# --------------------------------------------------------------------------- cores (SCCs)


def _trim(hf: torch.Tensor, wf: torch.Tensor, rs: torch.Tensor, cs: torch.Tensor):
    """Iteratively drop rows/cols with no in-arc or no out-arc inside the node set (rs, cs)."""
    while True:
        csf = cs.to(_DT)
        rsf = rs.to(_DT)
        nrs = rs & ((hf @ csf) > 0) & ((wf @ csf) > 0)
        ncs = cs & ((rsf @ hf) > 0) & ((rsf @ wf) > 0)
        if bool((nrs == rs).all()) and bool((ncs == cs).all()):
            return rs, cs
        rs, cs = nrs, ncs


def _reach(hf, wf, rs, cs, pivot: int, forward: bool):
    """Rows/cols reachable from row ``pivot`` (forward) or reaching it (backward) inside (rs, cs)."""
    row_to_col = hf if forward else wf   # [R, C]: arc row i -> col j (or reversed arc)
    col_to_row = wf if forward else hf   # [R, C]: arc col j -> row i (or reversed arc)
    vr = torch.zeros_like(rs)
    vc = torch.zeros_like(cs)
    vr[pivot] = True
    fr, fc = vr.clone(), vc.clone()
    while bool(fr.any()) or bool(fc.any()):
        nc = ((fr.to(_DT) @ row_to_col) > 0) & cs & ~vc
        nr = ((col_to_row @ fc.to(_DT)) > 0) & rs & ~vr
        vr |= nr
        vc |= nc
        fr, fc = nr, nc
    return vr, vc


def _find_cores(hm: torch.Tensor, wm: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Strongly connected components with at least one arc (trimmed forward-backward algorithm)."""
    R, C = hm.shape
    hf = hm.to(_DT)
    wf = wm.to(_DT)
    cores = []
    stack = [(torch.ones(R, dtype=torch.bool), torch.ones(C, dtype=torch.bool))]
    while stack:
        rs, cs = stack.pop()
        rs, cs = _trim(hf, wf, rs, cs)
        if not bool(rs.any()):
            continue  # after trimming, a column without rows cannot remain
        pivot = int(torch.nonzero(rs)[0, 0])
        fr, fc = _reach(hf, wf, rs, cs, pivot, True)
        br, bc = _reach(hf, wf, rs, cs, pivot, False)
        kr, kc = fr & br, fc & bc
        if bool(kc.any()):  # a core has >= 1 row and >= 1 column
            cores.append((torch.nonzero(kr)[:, 0], torch.nonzero(kc)[:, 0]))
        for r_, c_ in ((fr & ~kr, fc & ~kc), (br & ~kr, bc & ~kc), (rs & ~fr & ~br, cs & ~fc & ~bc)):
            if bool(r_.any()) or bool(c_.any()):
                stack.append((r_, c_))
    return cores


def _cores_by_component(hm: torch.Tensor, wm: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``_find_cores`` on each connected component of the support separately (same cores: an SCC
    never spans two components). Block-diagonal supports (grouped convs) are then cheap."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    R, C = hm.shape
    rows, cols = torch.nonzero(hm | wm, as_tuple=True)
    if len(rows) == 0:
        return []
    edges = coo_matrix((torch.ones(len(rows)).numpy(), (rows.numpy(), (cols + R).numpy())), shape=(R + C, R + C))
    count, labels = connected_components(edges, directed=False)
    if count == 1:
        return _find_cores(hm, wm)
    labels = torch.from_numpy(labels)
    cores = []
    for component in range(count):
        r = torch.nonzero(labels[:R] == component)[:, 0]
        c = torch.nonzero(labels[R:] == component)[:, 0]
        if len(r) == 0 or len(c) == 0:
            continue                                   # an isolated row or column: no arc
        if len(r) == 1 and len(c) == 1:                # one entry: a core when both h and w2 are > 0
            if bool(hm[r[0], c[0]]) and bool(wm[r[0], c[0]]):
                cores.append((r, c))
            continue
        cores += [(r[kr], c[kc]) for kr, kc in _find_cores(hm[r][:, c], wm[r][:, c])]
    return cores


# --------------------------------------------------------------------------- core solver


def _terms(lh, lw, x, y):
    """Per-entry terms ``h a b`` and ``w / (a b)`` from log-data (``log 0 = -inf`` gives exact 0)."""
    z = x[:, None] + y[None, :]
    return torch.exp(lh + z), torch.exp(lw - z)


def _sweep(lh, lw, x, y):
    """One exact block-coordinate sweep: x <- argmin_x f(x, y), then y <- argmin_y f(x, y)."""
    x = 0.5 * (torch.logsumexp(lw - y[None, :], dim=1) - torch.logsumexp(lh + y[None, :], dim=1))
    y = 0.5 * (torch.logsumexp(lw - x[:, None], dim=0) - torch.logsumexp(lh + x[:, None], dim=0))
    return _gauge(x, y)


def _residual(p, q):
    pr, qr = p.sum(1), q.sum(1)
    pc, qc = p.sum(0), q.sum(0)
    gx, gy = pr - qr, pc - qc
    rx, ry = pr + qr, pc + qc
    res = max(float((gx.abs() / rx).max()), float((gy.abs() / ry).max()))
    return res, gx, gy, rx, ry


def _schur_solve(g: torch.Tensor, gx, gy, rx, ry) -> torch.Tensor:
    """Solve the Newton system for the column variables after eliminating the rows.

    ``(diag(ry) - G^T diag(1/rx) G) dy = -gy + G^T (gx / rx)`` with one column grounded (dy_k = 0).
    """
    c = g.shape[1]
    dy = torch.zeros(c, dtype=_DT)
    if c == 1:
        return dy
    s = torch.diag(ry) - g.T @ (g / rx[:, None])
    rhs = -gy + g.T @ (gx / rx)
    k = int(torch.argmax(ry))
    keep = torch.ones(c, dtype=torch.bool)
    keep[k] = False
    s = s[keep][:, keep]
    rhs = rhs[keep]
    d = torch.sqrt(torch.clamp(torch.diagonal(s), min=torch.finfo(_DT).tiny))
    ss = s / d[:, None] / d[None, :]
    ss = 0.5 * (ss + ss.T)
    rr = rhs / d
    chol, info = torch.linalg.cholesky_ex(ss)
    if int(info) == 0:
        z = torch.cholesky_solve(rr[:, None], chol)[:, 0]
    else:
        z = torch.linalg.lstsq(ss, rr[:, None], driver="gelsd").solution[:, 0]
    dy[keep] = z / d
    return dy


def _newton_dir(g, gx, gy, rx, ry):
    r, c = g.shape
    if r >= c:
        dy = _schur_solve(g, gx, gy, rx, ry)
        dx = -(gx + g @ dy) / rx
    else:
        dx = _schur_solve(g.T, gy, gx, ry, rx)
        dy = -(gy + g.T @ dx) / ry
    return dx, dy


def _gauge(x, y):
    s = 0.5 * (float(y.mean()) - float(x.mean()))
    return x + s, y - s


def _newton_step(lh, lw, x, y, p, q, f: float, res: float, grad, eps: float):
    """A damped Newton step from (x, y), or None when no step length is accepted: accepted if it satisfies
    Armijo, or is a full step inside the quadratic region, or does not increase f beyond rounding while
    reducing the residual. Returns (x, y, p, q, f) at the new point."""
    gx, gy, rx, ry = grad
    dx, dy = _newton_dir(p + q, gx, gy, rx, ry)
    slope = float(gx @ dx + gy @ dy)
    m = float(dx.abs().max()) + float(dy.abs().max())
    if not (math.isfinite(slope) and math.isfinite(m)) or slope >= 0:
        dx, dy = -gx / rx, -gy / ry  # scaled gradient fallback (should not happen)
        slope = float(gx @ dx + gy @ dy)
        m = float(dx.abs().max()) + float(dy.abs().max())
    if m <= 1e-13:
        return None
    t = 1.0 if m <= _MAX_LOG_STEP else _MAX_LOG_STEP / m
    while t * m > 1e-15:
        xn, yn = _gauge(x + t * dx, y + t * dy)
        pn, qn = _terms(lh, lw, xn, yn)
        fn = float(pn.sum() + qn.sum())
        if math.isfinite(fn):
            if (t == 1.0 and m < _QUAD_REGION) or fn <= f + _ARMIJO * t * slope:
                return xn, yn, pn, qn, fn
            if fn <= f * (1 + eps) and _residual(pn, qn)[0] < res:
                return xn, yn, pn, qn, fn
        t *= 0.5
    return None


def _sweep_step(lh, lw, x, y, f: float, res: float, eps: float):
    """An exact block sweep from (x, y) if it does not increase f beyond rounding and reduces the
    residual, else None. Returns (x, y, p, q, f) at the new point."""
    xn, yn = _sweep(lh, lw, x, y)
    pn, qn = _terms(lh, lw, xn, yn)
    fn = float(pn.sum() + qn.sum())
    res_n = _residual(pn, qn)[0] if math.isfinite(fn) else math.inf
    if not (math.isfinite(fn) and (fn <= f * (1 + eps)) and res_n < res):
        return None
    return xn, yn, pn, qn, fn


def _solve_core(h: torch.Tensor, w: torch.Tensor, tol: float, max_iter: int):
    """Minimise sum h a b + w / (a b) on a strongly connected block. Returns (f, x, y, it, res, ok).

    Block sweeps, then damped Newton. A step is accepted if it satisfies Armijo, or is a full step
    inside the quadratic region, or does not increase f beyond rounding while reducing the residual.
    When the objective no longer changes representably but the residual is still above ``tol``
    (rows/columns whose terms are far below the rounding level of f), an exact block sweep is
    interleaved: it puts every such row/column at its exact minimiser given the others.
    """
    lh, lw = torch.log(h), torch.log(w)
    x = torch.zeros(h.shape[0], dtype=_DT)
    y = torch.zeros(h.shape[1], dtype=_DT)
    it = 0
    for _ in range(min(_N_SWEEPS, max_iter)):
        x, y = _sweep(lh, lw, x, y)
        it += 1

    p, q = _terms(lh, lw, x, y)
    f = float(p.sum() + q.sum())
    res, gx, gy, rx, ry = _residual(p, q)
    f_prev = math.inf
    ok = False
    eps = 8 * torch.finfo(_DT).eps
    swept = False  # the last step was a sweep
    while True:
        rel = abs(f_prev - f) / f if math.isfinite(f_prev) else math.inf
        if rel <= tol and res <= tol:
            ok = True
            break
        if it >= max_iter or res == 0.0:
            ok = res <= tol
            break
        it += 1
        stalled = rel <= eps and not swept  # alternate sweep / Newton while f is at rounding level
        step = None if stalled else _newton_step(lh, lw, x, y, p, q, f, res, (gx, gy, rx, ry), eps)
        stalled = step is None
        if stalled:
            # Newton cannot make representable progress: exact block sweep instead.
            step = _sweep_step(lh, lw, x, y, f, res, eps)
            if step is None:
                ok = res <= tol  # nothing improves any more: report the residual honestly
                break
        xn, yn, pn, qn, fn = step
        swept = stalled
        x, y, p, q = xn, yn, pn, qn
        f_prev, f = f, fn
        res, gx, gy, rx, ry = _residual(p, q)
    return f, x, y, it, res, ok


# --------------------------------------------------------------------------- public solver


def solve_layer(
    w2: torch.Tensor,
    h: torch.Tensor,
    *,
    tol: float = SOLVER_TOL,
    max_iter: int = SOLVER_MAX_ITER,
    num_threads: int | None = 1,
) -> LayerSolution:
    """Solve (17) with lambda = 1/2 for one weight matrix; see the module docstring.

    ``w2``: squared weights ``[R, C]``; ``h``: Hessian diagonal ``[R, C]`` already clipped at 0.
    Raises ValueError on negative, NaN/inf or mismatched input.
    ``num_threads``: torch intra-op threads during the solve (restored afterwards). The matrices
    are small (<= a few hundred per side), so one thread is as fast and avoids the large slowdowns
    of an oversubscribed thread pool on a busy CPU; ``None`` leaves torch's setting alone.
    """
    w2, h = _check_pair(w2, h)
    if not (tol > 0):
        raise ValueError(f"tol must be positive, got {tol}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    prev = torch.get_num_threads()
    if num_threads is None or num_threads == prev:
        return _solve_layer(w2, h, tol, max_iter)
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        return _solve_layer(w2, h, tol, max_iter)
    finally:
        torch.set_num_threads(prev)


def _solve_layer(w2: torch.Tensor, h: torch.Tensor, tol: float, max_iter: int) -> LayerSolution:
    R, C = w2.shape
    sigma_row = torch.zeros(R, dtype=_DT)
    sigma_col = torch.zeros(C, dtype=_DT)
    hm, wm = h > 0, w2 > 0
    cores = _cores_by_component(hm, wm) if R and C else []

    value = 0.0
    iterations = 0
    residual = 0.0
    converged = True
    inside = 0
    for rows, cols in cores:
        hk = h[rows][:, cols]
        wk = w2[rows][:, cols]
        inside += int((hm[rows][:, cols] | wm[rows][:, cols]).sum())
        sh, sw = float(hk.max()), float(wk.max())
        if len(rows) == 1 and len(cols) == 1:   # one entry (e.g. a depthwise conv): min a b + 1/(a b) = 2
            f, x, y, it, res, ok = 2.0, torch.zeros(1, dtype=_DT), torch.zeros(1, dtype=_DT), 0, 0.0, True
        else:
            f, x, y, it, res, ok = _solve_core(hk / sh, wk / sw, tol, max_iter)
        value += math.sqrt(sh * sw) * f
        shift = 0.25 * (math.log(sw) - math.log(sh))  # undo the normalisation of h and w2
        sigma_row[rows] = torch.exp(0.5 * (x + shift))
        sigma_col[cols] = torch.exp(0.5 * (y + shift))
        iterations += it
        residual = max(residual, res)
        converged = converged and ok

    # Keep every output finite (sentinel 0 for anything that under/overflowed: undetermined).
    sigma_row = torch.where(torch.isfinite(sigma_row), sigma_row, torch.zeros_like(sigma_row))
    sigma_col = torch.where(torch.isfinite(sigma_col), sigma_col, torch.zeros_like(sigma_col))
    in_row = torch.zeros(R, dtype=torch.bool)
    in_col = torch.zeros(C, dtype=torch.bool)
    for rows, cols in cores:
        in_row[rows] = True
        in_col[cols] = True
    total_arcs = int((hm | wm).sum())
    if not math.isfinite(residual):
        residual = 1.0
        converged = False
    return LayerSolution(
        value=float(value),
        sigma_row=sigma_row,
        sigma_col=sigma_col,
        iterations=iterations,
        residual=float(residual),
        converged=bool(converged),
        degenerate_rows=int((~in_row).sum()),
        degenerate_cols=int((~in_col).sum()),
        cores=len(cores),
        attained=inside == total_arcs,
    )
