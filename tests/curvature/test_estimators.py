"""Hessian-diagonal estimators against dense float64 references (torch.func.hessian on tiny nets)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import nfm_models as models
from nfm_cli.curvature.estimators import estimate_diagonal
from nfm_cli.curvature.exact import check_exact_supported, exact_diagonal
from nfm_cli.curvature.losses import LOSS_NAMES
from nfm_cli.curvature.stochastic import finite_difference_radii
from nfm_cli.errors import NfmError
from tests.conftest import (
    TINY,
    dense_diagonal,
    max_relative_error,
    randomize_batchnorm,
    relative_l2,
    spot_diagonal,
    tiny_case,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("name", list(TINY))
def test_exact_equals_dense_hessian_diagonal(name, loss):
    model, x, y = tiny_case(name)
    exact = exact_diagonal(model, x, y, loss, batch_size=4)
    reference = dense_diagonal(model, x, y, loss)
    assert list(exact) == [n for n, _ in model.named_parameters()]
    assert all(exact[n].dtype == torch.float64 and exact[n].shape == reference[n].shape for n in reference)
    assert max_relative_error(exact, reference) < 1e-10
    if loss == "normalized-ce":                  # indefinite loss Hessian: negative diagonal entries occur
        assert any((r < -1e-6).any() for r in reference.values())


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("model_name,config,shape", [
    ("lenet", {}, (1, 28, 28)),
    ("wrn16-4", {"depth": 10, "widen_factor": 1, "image_size": 8, "in_channels": 3}, (3, 8, 8)),
])
def test_exact_matches_spot_checks_on_registered_models(model_name, config, shape, loss):
    torch.manual_seed(0)
    model = randomize_batchnorm(models.build(model_name, **config).double()).eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((6,) + shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=gen)
    exact = exact_diagonal(model, x, y, loss, batch_size=4)
    for name, (idx, entries) in spot_diagonal(model, x, y, loss).items():
        got = exact[name].reshape(-1)[idx]
        assert torch.allclose(got, entries, rtol=1e-9, atol=1e-12 * max(1.0, float(entries.abs().max()))), name


def test_exact_does_not_depend_on_batch_size_and_handles_frozen_parameters():
    model, x, y = tiny_case("bn-residual", n=13)
    whole = exact_diagonal(model, x, y, "normalized-ce", batch_size=13)
    for p in model[0].parameters():
        p.requires_grad_(False)
    pieces = exact_diagonal(model, x, y, "normalized-ce", batch_size=3)
    assert max_relative_error(pieces, whole) < 1e-13
    assert all(not p.requires_grad for p in model[0].parameters())


class Product(nn.Module):
    """Its forward multiplies two layer outputs: quadratic in the input, refused on the traced graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * x


class SharedTwice(nn.Module):
    piecewise_linear = True

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


@pytest.mark.parametrize("model,where", [
    (nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)), r"layer '1' \(Tanh\)"),
    (nn.Sequential(nn.Linear(4, 4), Product()), r"layer '1' \(Product\) calls operator.mul"),
    (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), r"layer '1' \(LayerNorm\)"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4).train()), r"layer '1' \(BatchNorm1d\).*training mode"),
])
def test_exact_refuses_unsupported_layers_by_name(model, where):
    with pytest.raises(NfmError, match=where + ".*--estimator hutchinson"):
        check_exact_supported(model)


def test_exact_refuses_a_layer_called_twice():
    model = nn.Sequential(SharedTwice(), nn.Linear(4, 3)).double().eval()
    with pytest.raises(NfmError, match=r"layer '0.fc' \(Linear\).*more than once"):
        exact_diagonal(model, torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.int64), "ce")


@pytest.mark.heavy
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_hutchinson_converges_to_exact(loss):
    model, x, y = tiny_case("mlp", n=32)
    exact = exact_diagonal(model, x, y, loss)
    few = estimate_diagonal(model, x, y, loss, "hutchinson", probes=8, seed=1, batch_size=32)
    many = estimate_diagonal(model, x, y, loss, "hutchinson", probes=1024, seed=1, batch_size=32)
    assert relative_l2(many.diagonal, exact) < 0.08
    assert relative_l2(many.diagonal, exact) < relative_l2(few.diagonal, exact) / 3
    # the reported standard error describes the actual error: |error| within 5 standard errors
    for n in exact:
        assert ((many.diagonal[n] - exact[n]).abs() <= 5 * many.stderr[n] + 1e-12).float().mean() > 0.99
    assert set(many.metrics["trace_stderr"]) == set(exact)


@pytest.mark.heavy
def test_finite_differences_converge_to_exact_without_kinks():
    """Algorithm 1 (eq. 61). Its radius must be small enough not to cross ReLU kinks (see stochastic.py)."""
    model, x, y = tiny_case("mlp", n=32)
    exact = exact_diagonal(model, x, y, "normalized-ce")
    few = estimate_diagonal(model, x, y, "normalized-ce", "finite-diff", probes=8, seed=1, batch_size=32,
                            finite_diff_scale=1e-5)
    many = estimate_diagonal(model, x, y, "normalized-ce", "finite-diff", probes=1024, seed=1, batch_size=32,
                             finite_diff_scale=1e-5)
    assert relative_l2(many.diagonal, exact) < 0.15   # Gaussian probes: more variance than Rademacher
    assert relative_l2(many.diagonal, exact) < relative_l2(few.diagonal, exact) / 3


def test_finite_differences_with_default_radius_on_a_smooth_network():
    """A deep linear network has no kinks: the default radius (0.1 rms per tensor) converges too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double().eval()
    x, y = torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 4, (24,))
    exact = exact_diagonal(model, x, y, "ce")
    many = estimate_diagonal(model, x, y, "ce", "finite-diff", probes=1024, seed=2, batch_size=24)
    assert relative_l2(many.diagonal, exact) < 0.12


def test_finite_difference_radius_rule():
    params = {"w": torch.full((2, 8), 3.0), "b": torch.zeros(5)}
    radii = finite_difference_radii(params, 1e-2)
    assert radii["w"] == pytest.approx(3e-2)
    rms_all = (16 * 9.0 / 21) ** 0.5
    assert radii["b"] == pytest.approx(1e-2 * rms_all)     # all-zero tensor: rms of all parameters


def test_probes_are_keyed_by_seed_and_index():
    model, x, y = tiny_case("mlp", n=16)
    a = estimate_diagonal(model, x, y, "ce", "hutchinson", probes=3, seed=5, batch_size=8)
    b = estimate_diagonal(model, x, y, "ce", "hutchinson", probes=3, seed=5, batch_size=16)
    c = estimate_diagonal(model, x, y, "ce", "hutchinson", probes=3, seed=6, batch_size=8)
    assert max_relative_error(a.diagonal, b.diagonal) < 1e-12      # same probes, other batching
    assert max_relative_error(a.diagonal, c.diagonal) > 1e-3


class InPlaceResidual(nn.Module):
    """In-place operations on layer outputs: ``out += skip`` and ReLU(inplace=True)."""

    piecewise_linear = True

    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(5, 5), nn.ReLU(inplace=True), nn.Linear(5, 5)

    def forward(self, x):
        out = self.fc2(self.relu(self.fc1(x)))
        out += x
        return out


def test_exact_handles_in_place_operations_and_shared_time_axis():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    cases = [
        (nn.Sequential(nn.Linear(6, 5), InPlaceResidual(), nn.ReLU(inplace=True), nn.Linear(5, 4)), (6,)),
        # a Linear applied along a sequence axis shares its weight over the 3 positions
        (nn.Sequential(nn.Unflatten(1, (3, 4)), nn.Linear(4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(15, 4)), (12,)),
    ]
    for build, shape in cases:
        model = build.double().eval()
        x = torch.randn((9,) + shape, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (9,), generator=gen)
        for loss in LOSS_NAMES:
            exact = exact_diagonal(model, x, y, loss, batch_size=5)
            assert max_relative_error(exact, dense_diagonal(model, x, y, loss)) < 1e-10
