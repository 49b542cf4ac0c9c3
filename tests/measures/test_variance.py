"""Tests for the per-layer variance solver (nfm_cli.measures.variance): eq. (17) with lambda = 1/2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nfm_cli.measures.variance import (
    LayerSolution,
    lambda_scale,
    matrix_normalized_layer,
    solve_layer,
    to_matrix,
)

optimize = pytest.importorskip("scipy.optimize")

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


def make_instance(shape, seed, *, decades=3.0, zero_frac=0.1, zero_rows_h=(), zero_rows_w=(),
                  zero_cols_h=(), zero_cols_w=()):
    """Random (w2, h): log-uniform entries over `decades` decades each side, some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    R, C = shape
    w2 = 10.0 ** ((torch.rand(R, C, generator=g, dtype=F64) * 2 - 1) * decades)
    h = 10.0 ** ((torch.rand(R, C, generator=g, dtype=F64) * 2 - 1) * decades)
    if R * C >= 8:  # sprinkle zeros (keep tiny shapes dense so they stay non-degenerate)
        w2[torch.rand(R, C, generator=g) < zero_frac] = 0.0
        h[torch.rand(R, C, generator=g) < zero_frac] = 0.0
    for i in zero_rows_h:
        h[i] = 0.0
    for i in zero_rows_w:
        w2[i] = 0.0
    for j in zero_cols_h:
        h[:, j] = 0.0
    for j in zero_cols_w:
        w2[:, j] = 0.0
    return w2, h


def reduce_degenerate(w2, h):
    """Iteratively drop rows/cols whose h or w2 is all zero (the brief's rule), return the core."""
    rows = np.arange(w2.shape[0])
    cols = np.arange(w2.shape[1])
    W, H = w2.numpy(), h.numpy()
    while True:
        sw, sh = W[np.ix_(rows, cols)], H[np.ix_(rows, cols)]
        keep_r = (sw.sum(1) > 0) & (sh.sum(1) > 0)
        keep_c = (sw.sum(0) > 0) & (sh.sum(0) > 0)
        if keep_r.all() and keep_c.all():
            return torch.from_numpy(sw.copy()), torch.from_numpy(sh.copy()), rows, cols
        rows, cols = rows[keep_r], cols[keep_c]


def objective_np(W, H, x, y):
    z = x[:, None] + y[None, :]
    return float((H * np.exp(z)).sum() + (W * np.exp(-z)).sum())


def lbfgs_reference(w2, h):
    """Independent solve: L-BFGS-B on (x, y) = (log a, log b) with the analytic gradient."""
    W, H = w2.numpy(), h.numpy()
    R, C = W.shape
    scale = math.sqrt(W.sum() * H.sum())  # keeps the objective O(1) for the tolerances below

    def fun(v):
        x, y = v[:R], v[R:]
        z = x[:, None] + y[None, :]
        p = H * np.exp(z)
        q = W * np.exp(-z)
        g = p - q
        return (p.sum() + q.sum()) / scale, np.concatenate([g.sum(1), g.sum(0)]) / scale

    v0 = np.full(R + C, 0.25 * math.log(W.sum() / H.sum()))
    best = None
    for _ in range(3):  # restarts polish the final digits
        res = optimize.minimize(fun, v0, jac=True, method="L-BFGS-B",
                                options={"maxiter": 20000, "maxcor": 50, "ftol": 1e-16, "gtol": 1e-13})
        v0 = res.x
        best = res.fun * scale
    return best


def sol_objective(w2, h, sol: LayerSolution):
    """Objective at the returned sigmas over rows/cols with sigma > 0."""
    r = sol.sigma_row > 0
    c = sol.sigma_col > 0
    a = sol.sigma_row[r] ** 2
    b = sol.sigma_col[c] ** 2
    ab = a[:, None] * b[None, :]
    return float((h[r][:, c] * ab).sum() + (w2[r][:, c] / ab).sum())


def assert_finite(sol: LayerSolution):
    assert math.isfinite(sol.value) and sol.value >= 0
    assert math.isfinite(sol.residual)
    assert torch.isfinite(sol.sigma_row).all() and torch.isfinite(sol.sigma_col).all()
    assert (sol.sigma_row >= 0).all() and (sol.sigma_col >= 0).all()
    assert sol.sigma_row.dtype == F64 and sol.sigma_col.dtype == F64


# The instance set: shapes, magnitudes, zeros, zero rows/cols in h and in w2.
INSTANCES = [
    dict(shape=(1, 9), seed=1),
    dict(shape=(9, 1), seed=2),
    dict(shape=(1, 1), seed=3),
    dict(shape=(2, 2), seed=4),
    dict(shape=(5, 7), seed=5),
    dict(shape=(5, 7), seed=6, decades=4.0),
    dict(shape=(30, 20), seed=7),
    dict(shape=(30, 20), seed=8, decades=4.0, zero_frac=0.3),
    dict(shape=(20, 30), seed=9, zero_rows_h=(0, 3), zero_cols_w=(5,)),
    dict(shape=(30, 20), seed=10, zero_rows_w=(2,), zero_cols_h=(1, 7), zero_rows_h=(11,)),
    dict(shape=(12, 40), seed=11, zero_frac=0.5),
]


def _id(inst):
    return "x".join(map(str, inst["shape"])) + f"-s{inst['seed']}"


@pytest.fixture(scope="module", params=INSTANCES, ids=_id)
def solved(request):
    inst = dict(request.param)
    shape, seed = inst.pop("shape"), inst.pop("seed")
    w2, h = make_instance(shape, seed, **inst)
    return w2, h, solve_layer(w2, h)


# ----------------------------------------------------------------------------- reference solves


def test_matches_lbfgs_reference(solved):
    w2, h, sol = solved
    assert sol.converged and sol.residual <= 1e-10
    assert_finite(sol)
    w2r, hr, _, _ = reduce_degenerate(w2, h)
    ref = lbfgs_reference(w2r, hr)
    assert sol.value == pytest.approx(ref, rel=1e-8)
    # a local optimiser can only be above the infimum (up to rounding)
    assert sol.value <= ref * (1 + 1e-12)


def test_value_equals_objective_at_sigmas(solved):
    w2, h, sol = solved
    if sol.attained:
        assert sol_objective(w2, h, sol) == pytest.approx(sol.value, rel=1e-12)


def test_stationarity(solved):
    w2, h, sol = solved
    r = sol.sigma_row > 0
    c = sol.sigma_col > 0
    a = sol.sigma_row[r] ** 2
    b = sol.sigma_col[c] ** 2
    ab = a[:, None] * b[None, :]
    p = h[r][:, c] * ab
    q = w2[r][:, c] / ab
    assert torch.allclose(p.sum(1), q.sum(1), rtol=1e-8, atol=0)
    assert torch.allclose(p.sum(0), q.sum(0), rtol=1e-8, atol=0)


def test_bounds(solved):
    w2, h, sol = solved
    mn = matrix_normalized_layer(w2, h)
    entrywise = float((2 * torch.sqrt(h * w2)).sum())  # each entry's own optimum
    assert entrywise * (1 - 1e-12) <= sol.value <= mn * (1 + 1e-12)


def test_gauge_fixed_geometric_means(solved):
    w2, h, sol = solved
    if sol.cores == 1 and sol.degenerate_rows == 0 and sol.degenerate_cols == 0:
        gx = torch.log(sol.sigma_row).mean()
        gy = torch.log(sol.sigma_col).mean()
        assert float(gx) == pytest.approx(float(gy), abs=1e-9)


def test_two_by_two_brute_force():
    # f = min_{u,v} 2 sqrt(A B) with u = x1 - x0, v = y1 - y0 (the overall scale s is closed form):
    # A = h00 + h01 e^v + h10 e^u + h11 e^{u+v},  B = w00 + w01 e^-v + w10 e^-u + w11 e^{-u-v}.
    # log(AB) is convex in (u, v), so a zooming grid search converges to the global minimum.
    g = torch.Generator().manual_seed(123)
    for _ in range(3):
        w2 = 10.0 ** ((torch.rand(2, 2, generator=g, dtype=F64) * 2 - 1) * 2)
        h = 10.0 ** ((torch.rand(2, 2, generator=g, dtype=F64) * 2 - 1) * 2)
        H, W = h.numpy(), w2.numpy()
        cu, cv, half = 0.0, 0.0, 12.0
        best = math.inf
        for _level in range(12):
            u = cu + np.linspace(-half, half, 201)[:, None]
            v = cv + np.linspace(-half, half, 201)[None, :]
            A = H[0, 0] + H[0, 1] * np.exp(v) + H[1, 0] * np.exp(u) + H[1, 1] * np.exp(u + v)
            B = W[0, 0] + W[0, 1] * np.exp(-v) + W[1, 0] * np.exp(-u) + W[1, 1] * np.exp(-u - v)
            f = 2 * np.sqrt(A * B)
            k = np.unravel_index(np.argmin(f), f.shape)
            best = min(best, float(f[k]))
            cu, cv = float(u[k[0], 0]), float(v[0, k[1]])
            half /= 8
        assert solve_layer(w2, h).value == pytest.approx(best, rel=1e-10)


# ----------------------------------------------------------------------------- closed forms


def test_rank_one_closed_form():
    # h = u v^T, w2 = p q^T:  f = (u.a)(v.b) + (p.(1/a))(q.(1/b)).  Optimising the scale of a gives
    # 2 sqrt((u.a)(p.(1/a)) (v.b)(q.(1/b))) and Cauchy-Schwarz (u.a)(p.(1/a)) >= (sum_i sqrt(u_i p_i))^2
    # with equality at a_i ~ sqrt(p_i/u_i). Hence S = 2 (sum_i sqrt(u_i p_i)) (sum_j sqrt(v_j q_j)).
    g = torch.Generator().manual_seed(7)
    for R, C in [(1, 4), (4, 1), (6, 5), (17, 9)]:
        u, p = torch.rand(R, generator=g, dtype=F64) * 10, torch.rand(R, generator=g, dtype=F64)
        v, q = torch.rand(C, generator=g, dtype=F64), torch.rand(C, generator=g, dtype=F64) * 100
        h, w2 = torch.outer(u, v), torch.outer(p, q)
        expected = 2 * float(torch.sqrt(u * p).sum()) * float(torch.sqrt(v * q).sum())
        sol = solve_layer(w2, h)
        assert sol.value == pytest.approx(expected, rel=1e-10)
        # optimum a_i ~ sqrt(p_i / u_i), b_j ~ sqrt(q_j / v_j)
        ra = sol.sigma_row**2 / torch.sqrt(p / u)
        rb = sol.sigma_col**2 / torch.sqrt(q / v)
        assert torch.allclose(ra, ra[0].expand_as(ra), rtol=1e-8)
        assert torch.allclose(rb, rb[0].expand_as(rb), rtol=1e-8)


def test_rank_one_with_zeros_infimum():
    # Same formula holds as an infimum when u_i p_i = 0 for some i (those rows drop out).
    u = torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=F64)
    p = torch.tensor([4.0, 5.0, 0.0, 1.0], dtype=F64)
    v = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    q = torch.tensor([2.0, 1.0, 3.0], dtype=F64)
    sol = solve_layer(torch.outer(p, q), torch.outer(u, v))
    expected = 2 * float(torch.sqrt(u * p).sum()) * float(torch.sqrt(v * q).sum())
    assert sol.value == pytest.approx(expected, rel=1e-10)
    assert sol.degenerate_rows == 2 and sol.degenerate_cols == 0
    assert_finite(sol)


def test_matrix_normalized_equality_when_proportional():
    # Cauchy-Schwarz is tight iff u ~ p and v ~ q, i.e. h = c * w2 entrywise; more generally
    # for any h = c * w2 the uniform a_i b_j = 1/sqrt(c) is stationary, so S = 2 sqrt(H F).
    g = torch.Generator().manual_seed(11)
    u, v = torch.rand(7, generator=g, dtype=F64), torch.rand(5, generator=g, dtype=F64)
    w2 = torch.outer(u, v)
    h = 3.7 * w2
    assert solve_layer(w2, h).value == pytest.approx(matrix_normalized_layer(w2, h), rel=1e-12)
    w2 = torch.rand(8, 6, generator=g, dtype=F64)  # full rank, still proportional
    h = 0.01 * w2
    assert solve_layer(w2, h).value == pytest.approx(matrix_normalized_layer(w2, h), rel=1e-12)
    # not proportional -> strictly below
    h = torch.rand(8, 6, generator=g, dtype=F64)
    assert solve_layer(w2, h).value < matrix_normalized_layer(w2, h) * (1 - 1e-6)


def test_matrix_normalized_closed_form():
    w2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    h = torch.tensor([[0.5, 0.0], [0.25, 0.25]], dtype=F64)
    assert matrix_normalized_layer(w2, h) == pytest.approx(2 * math.sqrt(10.0 * 1.0))


def test_lambda_scale():
    # sum h ab + w2 / (2 lam ab) is the lambda = 1/2 problem for w2 / (2 lam)
    w2, h = make_instance((6, 4), 3)
    base = solve_layer(w2, h).value
    for lam in (0.1, 0.5, 2.0, 10.0):
        direct = solve_layer(w2 / (2 * lam), h).value
        assert lambda_scale(base, lam) == pytest.approx(direct, rel=1e-10)
    with pytest.raises(ValueError):
        lambda_scale(1.0, 0.0)


# ----------------------------------------------------------------------------- invariance


def test_neuron_rescaling_invariance():
    # Sec. 5.1: scaling row i of W by alpha scales W^2 row i by alpha^2 and h row i by 1/alpha^2.
    w2, h = make_instance((15, 11), 21)
    base = solve_layer(w2, h).value
    g = torch.Generator().manual_seed(5)
    alpha_r = 10.0 ** ((torch.rand(15, generator=g, dtype=F64) * 2 - 1) * 2)
    alpha_c = 10.0 ** ((torch.rand(11, generator=g, dtype=F64) * 2 - 1) * 2)
    w2s = w2 * alpha_r[:, None] ** 2 * alpha_c[None, :] ** 2
    hs = h / alpha_r[:, None] ** 2 / alpha_c[None, :] ** 2
    assert solve_layer(w2s, hs).value == pytest.approx(base, rel=1e-9)
    # a single row
    w2s, hs = w2.clone(), h.clone()
    w2s[3] *= 1e3**2
    hs[3] /= 1e3**2
    assert solve_layer(w2s, hs).value == pytest.approx(base, rel=1e-9)


def test_matrix_rescaling_invariance():
    w2, h = make_instance((9, 13), 22)
    base = solve_layer(w2, h).value
    mn = matrix_normalized_layer(w2, h)
    for c in (1e-3, 0.5, 7.0, 1e4):
        assert solve_layer(w2 * c**2, h / c**2).value == pytest.approx(base, rel=1e-9)
        assert matrix_normalized_layer(w2 * c**2, h / c**2) == pytest.approx(mn, rel=1e-12)


def test_ill_conditioned_converges():
    w2, h = make_instance((64, 48), 31, decades=8.0, zero_frac=0.2)
    sol = solve_layer(w2, h)
    assert sol.converged and sol.residual <= 1e-10 and sol.iterations < 200
    assert_finite(sol)


# ----------------------------------------------------------------------------- degenerate input


def test_all_zero_layer():
    sol = solve_layer(torch.zeros(4, 3), torch.zeros(4, 3))
    assert sol.value == 0.0 and sol.converged
    assert sol.degenerate_rows == 4 and sol.degenerate_cols == 3
    assert_finite(sol)
    for w2, h in [(torch.zeros(3, 5), torch.rand(3, 5)), (torch.rand(3, 5), torch.zeros(3, 5))]:
        sol = solve_layer(w2, h)
        assert sol.value == 0.0
        assert_finite(sol)


def test_zero_rows_cols_equal_reduced_solve():
    w2, h = make_instance((25, 18), 41, zero_rows_h=(0, 7), zero_rows_w=(3,), zero_cols_h=(2,), zero_cols_w=(9, 10))
    # Second-order degeneracy: column 4's h-support lies only in row 3 (w2-zero, removed first) and
    # column 12's w2-support only in row 0 (h-zero, removed first); both columns then drop out.
    h[:, 4] = 0.0
    h[3, 4] = 1.0
    w2[:, 12] = 0.0
    w2[0, 12] = 2.0
    sol = solve_layer(w2, h)
    w2r, hr, rows, cols = reduce_degenerate(w2, h)
    red = solve_layer(w2r, hr)
    assert sol.value == pytest.approx(red.value, rel=1e-12)
    assert_finite(sol)
    assert sol.degenerate_rows == 25 - len(rows) and sol.degenerate_cols == 18 - len(cols)
    assert 4 not in cols and 12 not in cols
    mask_r = torch.zeros(25, dtype=torch.bool)
    mask_r[torch.from_numpy(rows)] = True
    mask_c = torch.zeros(18, dtype=torch.bool)
    mask_c[torch.from_numpy(cols)] = True
    assert (sol.sigma_row[~mask_r] == 0).all() and (sol.sigma_row[mask_r] > 0).all()
    assert (sol.sigma_col[~mask_c] == 0).all() and (sol.sigma_col[mask_c] > 0).all()
    # the products a_i b_j on the core are gauge invariant and must agree with the reduced solve
    ab = torch.outer(sol.sigma_row[mask_r] ** 2, sol.sigma_col[mask_c] ** 2)
    ab_red = torch.outer(red.sigma_row**2, red.sigma_col**2)
    assert torch.allclose(ab, ab_red, rtol=1e-8)


def test_disjoint_supports_without_cycle():
    # h = [[1,0],[0,1]], w2 = [[0,1],[0,0]]: f = a0 b0 + a1 b1 + 1/(a0 b1).
    # a1 -> 0, b0 -> 0, a0 b1 -> inf drives every term to 0: the infimum 0 is not attained.
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w2 = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    sol = solve_layer(w2, h)
    assert sol.value == 0.0 and not sol.attained
    assert_finite(sol)


def test_non_attained_infimum_hand_derived():
    # h = [[h00, h01], [0, h11]], w2 = diag(w00, w11): every row/col has nonzero h and w2, but
    # f = h00 a0 b0 + h01 a0 b1 + h11 a1 b1 + w00/(a0 b0) + w11/(a1 b1)
    #   >= 2 sqrt(h00 w00) + 2 sqrt(h11 w11), and the bound is approached with a0 b0, a1 b1 fixed
    # at their optima and a0 = e^-M, b1 = e^-M, b0 = e^M, a1 = e^M (M -> inf) so a0 b1 -> 0.
    h = torch.tensor([[2.0, 5.0], [0.0, 3.0]], dtype=F64)
    w2 = torch.tensor([[8.0, 0.0], [0.0, 12.0]], dtype=F64)
    sol = solve_layer(w2, h)
    assert sol.value == pytest.approx(2 * math.sqrt(16.0) + 2 * math.sqrt(36.0), rel=1e-12)  # = 20
    assert not sol.attained and sol.cores == 2
    assert sol.degenerate_rows == 0 and sol.degenerate_cols == 0
    assert_finite(sol)
    # a larger instance: two dense blocks coupled by h only (block upper triangular support)
    w2a, ha = make_instance((6, 5), 51, zero_frac=0.0)
    w2b, hb = make_instance((4, 7), 52, zero_frac=0.0)
    w2 = torch.zeros(10, 12, dtype=F64)
    h = torch.zeros(10, 12, dtype=F64)
    w2[:6, :5], h[:6, :5] = w2a, ha
    w2[6:, 5:], h[6:, 5:] = w2b, hb
    h[:6, 5:] = 1e3  # coupling arcs leaving the first block only: their terms vanish in the limit
    sol = solve_layer(w2, h)
    expected = solve_layer(w2a, ha).value + solve_layer(w2b, hb).value
    assert sol.value == pytest.approx(expected, rel=1e-12)
    assert not sol.attained and sol.cores == 2 and sol.converged


# ----------------------------------------------------------------------------- input handling


def test_bad_input():
    good = torch.ones(3, 4)
    with pytest.raises(ValueError):
        solve_layer(good, -good)
    bad = good.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError):
        solve_layer(bad, good)
    with pytest.raises(ValueError):
        solve_layer(good, bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError):
        solve_layer(good, bad)
    with pytest.raises(ValueError):
        solve_layer(torch.ones(3, 4), torch.ones(4, 3))
    with pytest.raises(ValueError):
        solve_layer(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError):
        solve_layer(-good, good)
    with pytest.raises(ValueError):
        matrix_normalized_layer(good, -good)
    with pytest.raises(ValueError):
        matrix_normalized_layer(torch.ones(2, 2), torch.ones(2, 3))


def test_accepts_float32_and_returns_float64():
    w2, h = make_instance((5, 6), 61)
    sol32 = solve_layer(w2.float(), h.float())
    sol64 = solve_layer(w2.float().double(), h.float().double())
    assert sol32.value == pytest.approx(sol64.value, rel=1e-14)
    assert sol32.sigma_row.dtype == F64


def test_to_matrix_linear_and_conv():
    g = torch.Generator().manual_seed(71)
    wl = torch.randn(4, 3, generator=g)
    hl = torch.randn(4, 3, generator=g)
    w2, h = to_matrix(wl, hl)
    assert torch.allclose(w2, wl.double() ** 2) and torch.allclose(h, hl.double().clamp_min(0))
    wc = torch.randn(5, 2, 3, 3, generator=g, dtype=F64)
    hc = torch.randn(5, 2, 3, 3, generator=g, dtype=F64)
    w2, h = to_matrix(wc, hc)
    assert w2.shape == (5, 2) and h.dtype == F64
    assert torch.allclose(w2, (wc**2).sum((2, 3)))
    assert torch.allclose(h, hc.clamp_min(0).sum((2, 3)))  # clipped BEFORE summing
    assert not torch.allclose(h, hc.sum((2, 3)).clamp_min(0))
    with pytest.raises(ValueError):
        to_matrix(wc, hc[:, :1])
    # the conv problem equals sum over kernel positions sharing sigma_i sigma'_j
    sol = solve_layer(*to_matrix(wc, hc))
    assert sol.converged


def test_max_iter_reports_not_converged():
    w2, h = make_instance((30, 20), 81, decades=4.0)
    sol = solve_layer(w2, h, max_iter=1)
    assert not sol.converged and sol.iterations <= 1
    assert_finite(sol)
    assert sol.value >= solve_layer(w2, h).value * (1 - 1e-12)


def test_sparse_supports_against_scipy_scc():
    # Independent decomposition: SCCs of the arc graph (row i -> col j if h_ij > 0, col j -> row i
    # if w2_ij > 0) from scipy; the infimum is the sum of the minima over the SCC blocks.
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    g = torch.Generator().manual_seed(91)
    n_not_attained = 0
    for _trial in range(25):
        R, C = int(torch.randint(2, 14, (1,), generator=g)), int(torch.randint(2, 14, (1,), generator=g))
        dens = 0.08 + 0.3 * float(torch.rand(1, generator=g))
        w2 = torch.rand(R, C, generator=g, dtype=F64) * (torch.rand(R, C, generator=g) < dens)
        h = torch.rand(R, C, generator=g, dtype=F64) * (torch.rand(R, C, generator=g) < dens)
        adj = np.zeros((R + C, R + C))
        adj[:R, R:] = h.numpy() > 0
        adj[R:, :R] = (w2.numpy() > 0).T
        _, labels = connected_components(csr_matrix(adj), directed=True, connection="strong")
        expected = 0.0
        for lab in np.unique(labels):
            rows = np.nonzero(labels[:R] == lab)[0]
            cols = np.nonzero(labels[R:] == lab)[0]
            if len(rows) and len(cols):
                blk_w, blk_h = w2[rows][:, cols], h[rows][:, cols]
                expected += lbfgs_reference(blk_w, blk_h)
        sol = solve_layer(w2, h)
        assert_finite(sol)
        assert sol.converged
        assert sol.value == pytest.approx(expected, rel=1e-8, abs=1e-300)
        n_not_attained += not sol.attained
    assert n_not_attained > 0  # the trials do exercise non-attained infima


@pytest.mark.slow
def test_stress_wide_dynamic_range():
    # Random sparse supports with entries over up to 60 decades: always finite, always converged.
    g = torch.Generator().manual_seed(101)
    for _ in range(200):
        R, C = (int(v) for v in torch.randint(1, 100, (2,), generator=g))
        dec = float(torch.rand(1, generator=g)) * 30
        dens = float(torch.rand(1, generator=g))
        w2 = 10 ** ((torch.rand(R, C, generator=g, dtype=F64) * 2 - 1) * dec) * (torch.rand(R, C, generator=g) < dens)
        h = 10 ** ((torch.rand(R, C, generator=g, dtype=F64) * 2 - 1) * dec) * (torch.rand(R, C, generator=g) < dens)
        sol = solve_layer(w2, h)
        assert_finite(sol)
        assert sol.converged and sol.residual <= 1e-10
        assert sol.value <= matrix_normalized_layer(w2, h) * (1 + 1e-12)
