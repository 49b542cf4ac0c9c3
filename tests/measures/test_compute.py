"""nfm_cli.measures.compute: the measures of one model from its Hessian diagonals, and their invariances."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import nfm_models as models
from nfm_cli.curvature.exact import exact_diagonal
from nfm_cli.measures.compute import compute_measures, spectral_norm
from nfm_cli.measures.fisher_rao import fisher_rao_norm
from nfm_cli.measures.matrices import weight_matrices
from nfm_cli.measures.variance import solve_layer, to_matrix
from nfm_cli.steps.rescale import rescale_model


def _data(shape, n=48, k=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + shape, generator=gen, dtype=torch.float64), torch.randint(k, (n,), generator=gen)


def _model(name, **cfg):
    torch.manual_seed(0)
    model = models.build(name, **cfg).double().eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
    return model


def _all_measures(model, x, y):
    nce = exact_diagonal(model, x, y, "normalized-ce")
    ce = exact_diagonal(model, x, y, "ce")
    return compute_measures(model, nce, ce).summary, fisher_rao_norm(model, x, y)


def test_layer_values_come_from_the_solver():
    model = _model("mlp", width=8, image_size=8)
    x, y = _data((1, 8, 8))
    h = exact_diagonal(model, x, y, "normalized-ce")
    summary = compute_measures(model, h).summary
    total = 0.0
    params = dict(model.named_parameters())
    for name, matrix in weight_matrices(model).items():
        w2, hh = to_matrix(params[matrix.param].detach(), h[name])
        assert summary["layers"][name]["normalized_sharpness"] == pytest.approx(solve_layer(w2, hh).value, rel=1e-12)
        layer = summary["layers"][name]
        assert layer["normalized_sharpness"] <= layer["matrix_normalized_sharpness"] * (1 + 1e-12)
        total += solve_layer(w2, hh).value
    assert summary["normalized_sharpness"] == pytest.approx(total, rel=1e-12)
    assert summary["params_in_matrices"] + summary["params_left_out"] == sum(p.numel() for p in model.parameters())
    assert summary["params_left_out"] == sum(p.numel() for n, p in params.items() if n.endswith(".bias"))
    assert summary["hessian_trace"] == pytest.approx(sum(float(v.sum()) for v in h.values()), rel=1e-12)
    neg = sum(float(h[n].clamp_max(0).abs().sum()) for n in weight_matrices(model))
    mass = sum(float(h[n].abs().sum()) for n in weight_matrices(model))
    assert summary["clipped_fraction"] == pytest.approx(neg / mass)
    assert neg > 0  # normalized-ce's Hessian is indefinite: there is something to clip


@pytest.mark.parametrize("name, cfg, shape, mode", [
    ("mlp", dict(width=8, image_size=8), (1, 8, 8), "layer"),
    ("mlp", dict(width=8, image_size=8), (1, 8, 8), "neuron"),
    ("lenet", dict(), (1, 28, 28), "layer"),
    ("lenet", dict(), (1, 28, 28), "neuron"),
    ("wrn16-4", dict(depth=10, widen_factor=1, image_size=8), (3, 8, 8), "bn"),
])
@pytest.mark.parametrize("factors", ["uniform", "per-unit"])
def test_invariance_under_function_preserving_rescaling(name, cfg, shape, mode, factors):
    """Normalized sharpness (17) is unchanged by every function-preserving rescaling, while the Hessian trace changes.
    Matrix-normalized sharpness (13) is unchanged when each matrix is scaled as a whole (one alpha), but NOT by
    per-unit factors: that is the paper's Sec. 5.1 argument for per-row/column variances, and the test checks it both
    ways."""
    model = _model(name, **cfg)
    x, y = _data(shape, n=16 if name == "lenet" else 32)
    before, _ = _all_measures(model, x, y)
    changed = copy.deepcopy(model)
    kwargs = {"alpha": 3.7} if factors == "uniform" else {"random_range": (0.2, 5.0), "seed": 2}
    rescale_model(changed, mode, **kwargs)
    torch.testing.assert_close(changed(x), model(x), rtol=1e-10, atol=1e-10)
    after, _ = _all_measures(changed, x, y)
    assert after["normalized_sharpness"] == pytest.approx(before["normalized_sharpness"], rel=1e-6)
    matrix_ratio = after["matrix_normalized_sharpness"] / before["matrix_normalized_sharpness"]
    if factors == "uniform" or mode == "layer":
        assert matrix_ratio == pytest.approx(1.0, rel=1e-6)
    else:
        assert abs(matrix_ratio - 1) > 1e-3
    assert abs(after["hessian_trace"] / before["hessian_trace"] - 1) > 1e-3
    assert abs(after["frobenius_norm_sq"] / before["frobenius_norm_sq"] - 1) > 1e-3


class TwoBranches(nn.Module):
    """Sec. 7.3, eq. (26): y = ReLU(W1 x) + ReLU(W2 x)."""

    piecewise_linear = True

    def __init__(self, d_in, d_out):
        super().__init__()
        self.branch1 = nn.Linear(d_in, d_out, bias=False)
        self.branch2 = nn.Linear(d_in, d_out, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.branch1(x)) + self.relu(self.branch2(x))


def test_fisher_rao_example_of_section_7_3():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    x = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(5, (40,), generator=gen)
    halves, whole = TwoBranches(7, 5).double(), TwoBranches(7, 5).double()
    with torch.no_grad():
        halves.branch1.weight.copy_(w / 2)   # (27)
        halves.branch2.weight.copy_(w / 2)
        whole.branch1.weight.copy_(w)        # (29)
        whole.branch2.weight.zero_()         # (30)
    torch.testing.assert_close(halves(x), whole(x))
    a, fr_a = _all_measures(halves, x, y)
    b, fr_b = _all_measures(whole, x, y)
    assert b["normalized_sharpness"] == pytest.approx(a["normalized_sharpness"], rel=1e-8)
    assert b["matrix_normalized_sharpness"] == pytest.approx(a["matrix_normalized_sharpness"], rel=1e-8)
    assert fr_b == pytest.approx(2 * fr_a, rel=1e-8)  # "the Fisher-Rao norm ... becomes half"


def test_fisher_rao_matches_per_sample_gradients():
    """Eq. (25) from per-sample gradients taken one sample at a time with autograd."""
    model = _model("lenet")
    x, y = _data((1, 28, 28), n=6)
    params = list(model.parameters())
    squares = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for s, g in zip(squares, torch.autograd.grad(loss, params), strict=True):
            s += g ** 2
    reference = sum(float((p.detach() ** 2 * s / len(y)).sum()) for p, s in zip(params, squares, strict=True))
    assert fisher_rao_norm(model, x, y) == pytest.approx(reference, rel=1e-10)


def test_degenerate_layers_give_finite_measures():
    model = _model("mlp", width=4, image_size=4)
    with torch.no_grad():
        model[3].weight.zero_()  # a dead layer
    x, y = _data((1, 4, 4))
    h = exact_diagonal(model, x, y, "normalized-ce")
    summary = compute_measures(model, h).summary
    assert all(math.isfinite(v) for k, v in summary.items() if isinstance(v, float))
    assert summary["spectral_norm_product"] == 0.0 and summary["log_spectral_norm_product"] is None
    assert summary["layers"]["3.weight"]["normalized_sharpness"] == 0.0


def test_spectral_norm_equals_the_largest_singular_value_of_an_svd():
    assert spectral_norm(torch.tensor([[3.0, 0.0], [0.0, -4.0]])) == 4.0           # by hand
    assert spectral_norm(torch.zeros(3, 5)) == 0.0 and spectral_norm(torch.zeros(0, 4)) == 0.0
    gen = torch.Generator().manual_seed(0)
    low_rank = torch.randn(40, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 30, generator=gen,
                                                                                   dtype=torch.float64)
    for m in (torch.randn(64, 200, generator=gen, dtype=torch.float64), torch.randn(200, 64, generator=gen),
              low_rank, torch.randn(1, 7, generator=gen, dtype=torch.float64)):
        reference = float(np.linalg.svd(m.double().numpy(), compute_uv=False)[0])
        assert abs(spectral_norm(m) - reference) <= 1e-14 * reference
