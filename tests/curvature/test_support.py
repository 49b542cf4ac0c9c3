"""Which models the exact estimator accepts (traced graph, exact layer classes) and refuses, against
dense float64 Hessians; grouped convolutions against their dense equivalent (issue 10, items 2-3)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfm_cli.curvature.estimators import estimate_diagonal
from nfm_cli.curvature.exact import check_exact_supported, exact_diagonal
from nfm_cli.curvature.losses import LOSS_NAMES
from nfm_cli.errors import NfmError
from nfm_cli.measures.variance import solve_layer, to_matrix
from tests.conftest import Functional, dense_diagonal, gelu_model, max_relative_error, randomize_batchnorm, relative_l2

pytestmark = pytest.mark.usefixtures("one_thread")


class SquaredLinear(nn.Linear):
    """A subclass overriding forward: the plain Linear rule would be silently wrong for it."""

    def forward(self, x):
        return super().forward(x) ** 2


class ParameterOutsideLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.linear(x, self.fc.weight)


class Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class DividesByInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) / (x.abs() + 1)


class DropoutAlwaysOn(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def squared_model():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), SquaredLinear(6, 3))


@pytest.mark.parametrize("build,where", [
    (squared_model, r"layer '2' \(SquaredLinear\) calls operator.pow"),
    (gelu_model, r"layer '1' \(GELU\) is not piecewise linear"),
    (Tanh, r"the model \(Tanh\) calls torch.tanh"),
    (DividesByInput, r"calls operator.truediv"),
    (DropoutAlwaysOn, r"dropout in training mode"),
    (DataDependent, r"cannot be traced with torch.fx"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), r"layer '1' \(Dropout\).*training mode"),
])
def test_exact_refuses_with_the_module_path_class_and_a_way_out(build, where):
    model = build()
    if not isinstance(model[1] if isinstance(model, nn.Sequential) else model, nn.Dropout):
        model = model.eval()
    with pytest.raises(NfmError, match=where + r".*--estimator hutchinson"):
        check_exact_supported(model)


def test_a_refused_block_is_named_by_its_path():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), Tanh()))
    with pytest.raises(NfmError, match=r"layer '1.1' \(Tanh\) calls torch.tanh"):
        check_exact_supported(model)


@pytest.mark.parametrize("build", [squared_model, pytest.param(gelu_model, marks=pytest.mark.heavy)])
def test_refused_models_are_measured_by_hutchinson(build):
    """SquaredLinear and GELU are not piecewise linear: hutchinson converges to the dense Hessian."""
    torch.manual_seed(0)
    model = build().double().eval()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    reference = dense_diagonal(model, x, y, "normalized-ce")
    few = estimate_diagonal(model, x, y, "normalized-ce", "hutchinson", probes=16, seed=1, batch_size=16)
    many = estimate_diagonal(model, x, y, "normalized-ce", "hutchinson", probes=1024, seed=1, batch_size=16)
    assert relative_l2(many.diagonal, reference) < 0.2
    assert relative_l2(many.diagonal, reference) < relative_l2(few.diagonal, reference) / 3
    for n in reference:           # the error is within 5 reported standard errors
        assert ((many.diagonal[n] - reference[n]).abs() <= 5 * many.stderr[n] + 1e-12).float().mean() > 0.95


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_a_parameter_read_by_a_functional_call_gets_the_rule_of_that_call(loss):
    """F.linear(x, self.fc.weight): the graph, not the module holding the weight, decides (issue 20)."""
    torch.manual_seed(0)
    model = ParameterOutsideLayer().double().eval()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    exact = exact_diagonal(model, x, y, loss, batch_size=4)
    reference = dense_diagonal(model, x, y, loss)
    assert max_relative_error({"fc.weight": exact["fc.weight"]}, {"fc.weight": reference["fc.weight"]}) < 1e-10
    assert float(exact["fc.bias"].abs().max()) == 0.0       # never used: zero, as the dense Hessian


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_functional_forward_is_accepted_and_exact(loss):
    torch.manual_seed(0)
    model = randomize_batchnorm(Functional().double()).eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 2, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    exact = exact_diagonal(model, x, y, loss, batch_size=4)
    assert max_relative_error(exact, dense_diagonal(model, x, y, loss)) < 1e-10


def group_mask(groups: int, cin: int, cout: int) -> torch.Tensor:
    """[out, in, 3, 3]: True where output channel i is connected to input channel j."""
    group_of_out = torch.arange(cout) // (cout // groups)
    group_of_in = torch.arange(cin) // (cin // groups)
    return (group_of_out[:, None] == group_of_in[None, :])[:, :, None, None].expand(cout, cin, 3, 3)


def dense_equivalent(conv: nn.Conv2d) -> nn.Conv2d:
    """The same map as a grouped conv, as an ungrouped conv with zeros outside the groups."""
    g, out, cin = conv.groups, conv.out_channels, conv.in_channels
    dense = nn.Conv2d(cin, out, conv.kernel_size, padding=conv.padding, bias=conv.bias is not None).double()
    with torch.no_grad():
        dense.weight.zero_()
        for i in range(out):
            group = i // (out // g)
            dense.weight[i, group * (cin // g):(group + 1) * (cin // g)] = conv.weight[i]
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    return dense


@pytest.mark.parametrize("groups,cin,cout", [(2, 4, 6), (3, 3, 3), (3, 3, 6)])
def test_grouped_conv_layout_against_its_dense_equivalent(groups, cin, cout):
    """Exact diagonal of a grouped conv = the dense equivalent's on the real connections, and the
    solver's block-diagonal layout gives the dense solve restricted to those connections."""
    torch.manual_seed(groups + cout)
    grouped = nn.Conv2d(cin, cout, 3, padding=1, groups=groups).double()
    head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(cout * 9, 4)).double()
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(6, cin, 3, 3, generator=gen, dtype=torch.float64), torch.randint(0, 4, (6,), generator=gen)
    a = nn.Sequential(grouped, head).eval()
    b = nn.Sequential(dense_equivalent(grouped), head).eval()
    torch.testing.assert_close(a(x), b(x))
    hg = exact_diagonal(a, x, y, "normalized-ce")["0.weight"]
    hd = dense_diagonal(b, x, y, "normalized-ce")["0.weight"]
    mask = group_mask(groups, cin, cout)
    # the grouped diagonal is the dense one on the real connections (in the same row-major order)
    torch.testing.assert_close(hg.reshape(-1), hd[mask], rtol=1e-10, atol=1e-14)
    # solver layout: the block-diagonal matrix equals the dense matrices with h = 0 off the groups
    w2, h = to_matrix(grouped.weight.detach(), hg, groups)
    w2_dense, h_dense = to_matrix(dense_equivalent(grouped).weight.detach(), torch.where(mask, hd, 0.0))
    torch.testing.assert_close(w2, w2_dense)
    torch.testing.assert_close(h, h_dense)
    assert w2.shape == (cout, cin)
    grouped_sol, dense_sol = solve_layer(w2, h), solve_layer(w2_dense, h_dense)
    assert grouped_sol.value == pytest.approx(dense_sol.value, rel=1e-10)
    # independent check: per group, a separate solve of its own [out/g, in/g] block
    per_group = sum(solve_layer(*to_matrix(wg, hgg)).value
                    for wg, hgg in zip(grouped.weight.detach().chunk(groups), hg.chunk(groups), strict=True))
    assert grouped_sol.value == pytest.approx(per_group, rel=1e-9)


def test_depthwise_layout_closed_form():
    """groups = channels: one connection per row, each contributes 2 sqrt(h w2) (min of h s + w2 / s)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64)
    hd = torch.rand(5, 1, 3, 3, generator=gen, dtype=torch.float64)
    w2, h = to_matrix(w, hd, groups=5)
    assert torch.equal(w2, torch.diag((w ** 2).sum((1, 2, 3))))
    sol = solve_layer(w2, h)
    expected = float((2 * ((w ** 2).sum((1, 2, 3)) * hd.sum((1, 2, 3))).sqrt()).sum())
    assert sol.value == pytest.approx(expected, rel=1e-12) and sol.cores == 5 and sol.converged


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_upsampling_is_linear_in_its_input_and_gets_exact(mode):
    """As HRNet's fuse layers: upsampled branches summed; any fixed interpolation is linear in its input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2, mode=mode),
                          nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double().eval()
    check_exact_supported(model)
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    got = exact_diagonal(model, x, y, "ce")
    assert max_relative_error(got, dense_diagonal(model, x, y, "ce")) < 1e-10
