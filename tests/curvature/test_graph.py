"""Tracing (``curvature/graph.py``, issue 20 items 1 and 9): a module torch.fx cannot trace because it
branches on a shape is measured as a whole (ggn equal to the dense float64 Gauss-Newton diagonal, exact
refused naming it); branches on values, failures in the model's own forward and value branches met at
run time are refused in one line naming the layer, its class, what failed and the line of code."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfm_cli.curvature.estimators import estimate_diagonal, resolve_estimator
from nfm_cli.curvature.support import check_exact_supported
from nfm_cli.errors import NfmError
from tests.conftest import dense_gauss_newton_diagonal, max_relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


class PadIfSmall(nn.Module):
    """As timm's ConvMlp: pools or pads by the input's size in Python, then a layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if x.shape[-1] < 6:
            x = F.pad(x, (0, 6 - x.shape[-1]))
        return self.fc(torch.tanh(x))


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            x = 2 * x
        return self.fc(x)


class ShapeThenValue(PadIfSmall):
    """fx stops at the shape branch; the value branch after it is met only by the per-sample rule."""

    def forward(self, x):
        if x.shape[-1] < 6:
            x = F.pad(x, (0, 6 - x.shape[-1]))
        if x.max() > 100:
            x = x / 2
        return self.fc(x)


class OwnBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[-1] == 4:
            return self.fc(x)
        return self.fc(x[..., :4])


def _net(head: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), head).double().eval()


def _data(n=5):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0][:n])


@pytest.mark.parametrize("loss", ["normalized-ce", "ce"])
def test_a_module_branching_on_a_shape_is_measured_whole_by_ggn(loss):
    model = _net(PadIfSmall())
    used, why = resolve_estimator("auto", model)
    assert used == "ggn"
    assert "layer '2' (PadIfSmall) cannot be checked piecewise linear" in why
    assert "branches on a tensor's shape" in why and "test_graph.py:" in why and "if x.shape[-1] < 6:" in why
    x, y = _data()
    got = estimate_diagonal(model, x, y, loss, "ggn", batch_size=2).diagonal
    assert max_relative_error(got, dense_gauss_newton_diagonal(model, x, y, loss)) < 1e-10


def test_exact_refuses_a_module_it_cannot_read_naming_it():
    with pytest.raises(NfmError, match=r"layer '2' \(PadIfSmall\) cannot be checked piecewise linear: torch.fx "
                                       r"cannot trace its forward .*--estimator hutchinson"):
        check_exact_supported(_net(PadIfSmall()))


@pytest.mark.parametrize("head,message", [
    (ValueBranch(), r"layer '2' \(ValueBranch\) branches on tensor values in Python, so its graph changes with "
                    r"the input \(.*test_graph.py:\d+: `if x.sum\(\) > 0:`\)"),
    (None, r"the model's own forward \(OwnBranch\) branches on a tensor's shape in Python \(.*test_graph.py:\d+: "
           r"`if x.shape\[-1\] == 4:`\)"),
])
def test_untraceable_models_are_refused_in_one_line_naming_the_part(head, message):
    model = _net(head) if head is not None else OwnBranch().double().eval()
    for estimator in ("auto", "ggn", "exact"):
        with pytest.raises(NfmError, match=r"cannot be traced with torch.fx .*" + message + r".*--estimator "
                                           "hutchinson") as caught:
            resolve_estimator(estimator, model)
        assert "\n" not in str(caught.value)


def test_a_value_branch_met_by_the_per_sample_rule_is_refused_naming_the_layer():
    model = _net(ShapeThenValue())
    assert resolve_estimator("auto", model)[0] == "ggn"
    x, y = _data()
    with pytest.raises(NfmError, match=r"layer '2' \(ShapeThenValue\) branches on tensor values in its forward "
                                       r"\(its graph changes with the input\)"):
        estimate_diagonal(model, x, y, "ce", "ggn", batch_size=2)


class CachedBias(nn.Module):
    """As timm's LeViT attention biases: gathered from a parameter once and kept in a dict in eval mode."""

    def __init__(self, cache: bool = True):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.table = nn.Parameter(torch.randn(5))
        self.register_buffer("index", torch.tensor([0, 2, 4]))
        self.use_cache, self.cache = cache, {}

    def forward(self, x):
        if not self.use_cache:
            return self.fc(x) * self.table[self.index]
        if "bias" not in self.cache:
            self.cache["bias"] = self.table[self.index]
        return self.fc(x) * self.cache["bias"]


def test_a_tensor_cache_filled_before_tracing_does_not_hide_its_parameter():
    model, (x, y) = _net(CachedBias()), _data()
    with torch.no_grad():
        model(x)                                   # fills the cache, as a real forward does
    for _ in range(2):                             # traced twice: no Proxy of the first trace is kept
        got = estimate_diagonal(model, x, y, "ce", "ggn", batch_size=2).diagonal
        model[2].use_cache = False
        reference = dense_gauss_newton_diagonal(model, x, y, "ce")
        model[2].use_cache = True
        assert float(reference["2.table"].abs().max()) > 0
        assert max_relative_error(got, reference) < 1e-10
