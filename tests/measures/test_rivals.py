"""nfm_cli.measures.rivals against closed forms and brute force on linear models and quadratic losses."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import optimize, special
from torch import nn

from nfm_cli.errors import NfmError
from nfm_cli.measures.rivals import (
    Evaluator,
    RivalOptions,
    adaptive_sharpness,
    box_ascent,
    largest_radius,
    normal_directions,
    pacbayes_sigma,
    rival_measures,
    sharpness_alpha,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_problem(n=160, d=4, k=3, seed=0):
    """A float64 linear classifier with bias on Gaussian blobs, labelled by the classifier itself
    except for a few flipped labels (training accuracy ~0.95)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, k).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(k, d, generator=g, dtype=torch.float64) * 1.5)
        model.bias.copy_(torch.randn(k, generator=g, dtype=torch.float64) * 0.3)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.arange(n) % 20 == 0
    y[flip] = (y[flip] + 1) % k
    return model, x, y


# ---- the bisection ----------------------------------------------------------------------------------

def test_largest_radius_finds_the_crossing_of_a_smooth_curve():
    target = 0.1
    curve = lambda r: 1 - math.exp(-r * r / 0.3)  # noqa: E731
    expected = math.sqrt(-0.3 * math.log(1 - target))
    assert largest_radius(curve, target, depth=60, tolerance=0, resolution=0) == pytest.approx(expected, rel=1e-9)
    # by default the bracket stops at 1%; the deviation tolerance (0.01) stops earlier still
    assert largest_radius(curve, target, tolerance=0) == pytest.approx(expected, rel=1e-2)
    assert abs(curve(largest_radius(curve, target)) - target) < 1e-2
    # a flat start (deviation 0 up to 5) makes hi double past 2 first
    shifted = lambda r: 0.0 if r < 5 else min(1.0, (r - 5) / 10)  # noqa: E731
    assert largest_radius(shifted, target, depth=60, tolerance=0, resolution=0) == pytest.approx(6.0, rel=1e-9)
    # off the scale: even the smallest radius searched deviates too much
    assert largest_radius(lambda r: 0.5, target) == 0.0


# ---- PAC-Bayes sigma: closed-form expectation for a linear model -----------------------------------

def expected_accuracy(model, x, y, sigma, eps=None):
    """E over Gaussian weight noise of the accuracy of a linear model, by Gauss-Hermite quadrature: the
    logits are independent Gaussians z_k ~ N(m_k, s_k^2), s_k^2 = sum_j var(W_kj) x_j^2 + var(b_k), and
    P(correct) = E_t prod_{k != y} Phi((m_y + s_y t - m_k) / s_k), t ~ N(0, 1)."""
    W, b = model.weight.detach().numpy(), model.bias.detach().numpy()
    X, Y = x.numpy(), y.numpy()
    if eps is None:
        var_w, var_b = np.full_like(W, sigma ** 2), np.full_like(b, sigma ** 2)
    else:
        var_w, var_b = sigma ** 2 * W ** 2 + eps ** 2, sigma ** 2 * b ** 2 + eps ** 2
    m = X @ W.T + b                                  # [n, k]
    s = np.sqrt(X ** 2 @ var_w.T + var_b)            # [n, k]
    t, wq = np.polynomial.hermite_e.hermegauss(120)  # nodes and weights for exp(-t^2 / 2)
    rows = np.arange(len(Y))
    my, sy = m[rows, Y][:, None, None], s[rows, Y][:, None, None]
    cdf = special.ndtr((my + sy * t[None, :, None] - m[:, None, :]) / s[:, None, :])  # [n, q, k]
    cdf[rows, :, Y] = 1.0
    return float((cdf.prod(axis=2) @ wq).mean() / math.sqrt(2 * math.pi))


@pytest.mark.parametrize("magnitude", [False, pytest.param(True, marks=pytest.mark.heavy)])
def test_pacbayes_sigma_matches_the_closed_form_expectation(magnitude):
    model, x, y = linear_problem()
    ev = Evaluator(model, x, y)
    base = ev.accuracy()
    eps = 0.2 if magnitude else None  # a large eps tells the variance form from sigma |w| + eps
    exact = optimize.brentq(lambda s: base - expected_accuracy(model, x, y, s, eps) - 0.1, 1e-3, 5.0, xtol=1e-6)
    opts = RivalOptions(mc_samples=400, search_depth=40, tolerance=0.0, resolution=1e-9, magnitude_eps=eps or 1e-3)
    got = pacbayes_sigma(ev, opts, magnitude)
    assert got == pytest.approx(exact, rel=0.05)
    # the std/variance mix-up of the published reimplementations would land far away
    wrong = optimize.brentq(lambda s: base - expected_accuracy(model, x, y, s * s, eps) - 0.1, 1e-3, 5.0)
    assert abs(got - wrong) > 0.15 * exact


def test_pacbayes_sigma_is_a_crossing_of_the_monte_carlo_curve():
    """The same Monte-Carlo directions, the weights perturbed by hand: the result sits on a crossing."""
    model, x, y = linear_problem(seed=1)
    ev = Evaluator(model, x, y)
    opts = RivalOptions(mc_samples=16, search_depth=50, tolerance=0.0, resolution=1e-12, seed=3)
    sigma = pacbayes_sigma(ev, opts, False)
    zs = normal_directions(ev.params, opts.mc_samples, opts.seed, "pacbayes")
    W, b = model.weight.detach(), model.bias.detach()
    base = ((x @ W.T + b).argmax(1) == y).double().mean().item()

    def deviation(s):
        accs = [((x @ (W + s * z["weight"]).T + b + s * z["bias"]).argmax(1) == y).double().mean().item() for z in zs]
        return abs(np.mean(accs) - base)

    # tolerance 0: the bisection ends on a jump of the (piecewise constant) curve from <= 0.1 to > 0.1
    assert deviation(sigma * (1 - 1e-7)) <= 0.1 < deviation(sigma * (1 + 1e-7))


# ---- worst case in a box: exact for separated supports ----------------------------------------------

def separated_problem(n=128, d=6, seed=0):
    """Two classes on disjoint feature supports, x >= 0, no bias: the worst perturbation flips exactly
    the samples whose margin is below the largest margin decrease the box allows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64) + 0.1
    y = torch.arange(n) % 2
    half = d // 2
    x[y == 0, half:] = 0
    x[y == 1, :half] = 0
    model = nn.Linear(d, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.rand(2, d, generator=g, dtype=torch.float64) * 0.5)
        model.weight[0, :half] += 1.0
        model.weight[1, half:] += 1.0
    return model, x, y


@pytest.mark.parametrize("magnitude", [False, True])
def test_sharpness_alpha_matches_the_exact_worst_case(magnitude):
    model, x, y = separated_problem()
    W = model.weight.detach()
    logits = x @ W.T
    assert bool((logits.argmax(1) == y).all())
    margin = (logits[torch.arange(len(y)), y] - logits[torch.arange(len(y)), 1 - y]).numpy()
    eps = 1e-3
    if magnitude:  # max margin decrease: sum_j x_j (alpha (|W_0j| + |W_1j|) + 2 eps)
        slope = (x @ W.abs().sum(0)).numpy()
        thresholds = (margin - 2 * eps * x.sum(1).numpy()) / slope
    else:  # sum_j x_j 2 alpha
        thresholds = margin / (2 * x.sum(1).numpy())
    k = math.floor(0.1 * len(y))  # at most k flips allowed: alpha* is the (k+1)-th smallest threshold
    exact = np.sort(thresholds)[k]
    opts = RivalOptions(search_depth=60, tolerance=0.0, resolution=1e-12, magnitude_eps=eps)
    got = sharpness_alpha(Evaluator(model, x, y), opts, magnitude)
    assert got == pytest.approx(exact, rel=1e-6)


def test_an_eps_box_that_alone_flips_too_much_is_off_the_scale():
    model, x, y = separated_problem()
    ev = Evaluator(model, x, y)
    assert sharpness_alpha(ev, RivalOptions(magnitude_eps=10.0), True) == 0.0
    result = rival_measures(model, x, y, RivalOptions(magnitude_eps=10.0, search_depth=4, mc_samples=2))
    assert result["sharpness_mag_worst"] is None and result["radii"]["sharpness_mag_alpha"] == 0.0


def test_box_ascent_linear_loss_reaches_the_corner():
    g = torch.Generator().manual_seed(0)
    grad = {"a": torch.randn(5, generator=g, dtype=torch.float64), "b": torch.randn(2, 3, generator=g,
                                                                                    dtype=torch.float64)}
    radius = {n: torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.1 for n, t in grad.items()}
    loss = lambda d: sum((grad[n] * d[n]).sum() for n in d)  # noqa: E731
    _, best = box_ascent(lambda d: (loss(d), float(loss(d).detach())), radius, 10, torch.Generator().manual_seed(1))
    assert best == pytest.approx(sum(float((radius[n] * grad[n].abs()).sum()) for n in grad))


def test_box_ascent_convex_quadratic_matches_vertex_enumeration():
    """A convex quadratic's max over a box is at a vertex; with |g_i| > sum_j |A_ij| r_j the ascent's
    fixed point is unique, so the (local) ascent must find the global max."""
    rng = np.random.default_rng(0)
    d = 8
    a = rng.normal(size=(d, d)) * 0.15
    A = torch.tensor(a @ a.T)
    gvec = torch.tensor(np.sign(rng.normal(size=d)) * (1.5 + np.abs(rng.normal(size=d))))
    r = torch.tensor(rng.uniform(0.5, 1.5, size=d))
    assert bool((gvec.abs() > A.abs() @ r).all())
    loss = lambda dd: gvec @ dd["u"] + 0.5 * dd["u"] @ A @ dd["u"]  # noqa: E731
    _, best = box_ascent(lambda d: (loss(d), float(loss(d).detach())), {"u": r}, 30, torch.Generator().manual_seed(2))
    vertices = (np.array(v) * r.numpy() for v in itertools.product((-1.0, 1.0), repeat=d))
    brute = max(float(gvec.numpy() @ v + 0.5 * v @ A.numpy() @ v) for v in vertices)
    assert best == pytest.approx(brute, rel=1e-12)


# ---- adaptive sharpness: closed forms ----------------------------------------------------------------

def test_adaptive_sharpness_of_a_linear_loss():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(7, generator=g, dtype=torch.float64), "v": torch.randn(3, generator=g,
                                                                                      dtype=torch.float64)}
    grad = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    loss = lambda d: sum((grad[n] * (params[n] + d[n])).sum() for n in d)  # noqa: E731
    rho = 0.3
    exact = rho * math.sqrt(sum(float(((grad[n] * params[n].abs()) ** 2).sum()) for n in params))
    got = adaptive_sharpness(loss, params, rho, 200, torch.Generator().manual_seed(1))
    assert got == pytest.approx(exact, rel=1e-6)


def test_adaptive_sharpness_of_a_quadratic_minimum():
    """At a minimum of 1/2 u^T A u the worst case in ||u / |w| || <= rho is rho^2 / 2 lambda_max(D A D)."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    A = torch.tensor(a @ a.T)
    w = torch.tensor(rng.normal(size=6))
    loss = lambda d: 0.5 * d["w"] @ A @ d["w"]  # noqa: E731
    rho = 0.2
    D = torch.diag(w.abs())
    exact = 0.5 * rho ** 2 * float(torch.linalg.eigvalsh(D @ A @ D).max())
    got = adaptive_sharpness(loss, {"w": w}, rho, 300, torch.Generator().manual_seed(0))
    assert got == pytest.approx(exact, rel=1e-6)


# ---- the whole set on a model --------------------------------------------------------------------------

def test_rival_measures_are_deterministic_and_positive():
    model, x, y = linear_problem(n=96)
    opts = RivalOptions(search_depth=8, box_steps=5, ascent_steps=5)
    a = rival_measures(model, x, y, opts)
    b = rival_measures(model, x, y, opts)
    assert a == b
    for key in ("pacbayes_flatness", "pacbayes_mag_flatness", "sharpness_worst", "sharpness_mag_worst"):
        assert a[key] > 0 and math.isfinite(a[key])
    assert a["pacbayes_flatness"] == pytest.approx(1 / a["radii"]["pacbayes_sigma"] ** 2)
    assert a["adaptive_sharpness"] >= 0
    # the seed picks the Monte-Carlo directions (tolerance 0: no early stop on a shared midpoint)
    c0 = rival_measures(model, x, y, RivalOptions(search_depth=20, tolerance=0.0, box_steps=5, ascent_steps=5, seed=0))
    c1 = rival_measures(model, x, y, RivalOptions(search_depth=20, tolerance=0.0, box_steps=5, ascent_steps=5, seed=1))
    assert c0["radii"]["pacbayes_sigma"] != c1["radii"]["pacbayes_sigma"]


@pytest.mark.parametrize("overrides, match", [
    (dict(target_deviation=0.0), "deviation must be in"), (dict(mc_samples=0), "mc_samples"),
    (dict(rho=-1.0), "rho must be"), (dict(tolerance=-1.0), "tolerance"),
])
def test_bad_options(overrides, match):
    model, x, y = linear_problem(n=8)
    with pytest.raises(NfmError, match=match):
        rival_measures(model, x, y, RivalOptions(**overrides))
