"""Shared parameters (``curvature/shared.py``, issue 20 item 9): uses of one parameter whose region has
one way out are summed per sample (ggn equal to the dense float64 Gauss-Newton diagonal; exact refused:
not piecewise linear); uses reaching the logits separately, or a region leaking a value, are refused
naming the layer and why."""
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


class TiedHead(nn.Module):
    """Tied input and output embeddings: the weight enters at the lookup and at the head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)

    def forward(self, tokens):
        return F.linear(self.embed(tokens).mean(1), self.embed.weight)[:, :3]


class ClassTokenTwice(nn.Module):
    """As CaiT's class-attention block: the class token is concatenated with the patches and added back."""

    def __init__(self, dim=4):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        cls = self.cls.expand(x.shape[0], -1, -1)
        u = torch.cat([cls, x], dim=1)
        cls = cls + torch.tanh(self.mix(u)).mean(1, keepdim=True)
        return self.head(cls[:, 0])


class LayerTwice(nn.Module):
    """One Linear module called twice on the same path."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x.mean(1))))


class SeparatePaths(ClassTokenTwice):
    def forward(self, x):
        x = self.embed(x)
        a = x * self.cls
        b = torch.tanh(x) * self.cls
        return self.head(a.mean(1)) + self.head(b.mean(1))


class LeakyRegion(ClassTokenTwice):
    def forward(self, x):
        x = self.embed(x)
        a = x * self.cls
        b = torch.tanh(a) + self.cls
        return self.head(b.mean(1)) + self.mix(a).mean(1)[:, :3]


def _tokens():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 5, (6, 4), generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])


def _patches():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, 3, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("build,data", [(TiedHead, _tokens), (ClassTokenTwice, _patches), (LayerTwice, _patches)])
@pytest.mark.parametrize("loss", ["normalized-ce", "ce"])
def test_uses_of_a_shared_parameter_are_summed_per_sample(build, data, loss):
    torch.manual_seed(0)
    model = build().double().eval()
    x, y = data()
    assert resolve_estimator("auto", model)[0] == "ggn"
    got = estimate_diagonal(model, x, y, loss, "ggn", batch_size=4).diagonal
    reference = dense_gauss_newton_diagonal(model, x, y, loss)
    assert max_relative_error(got, reference) < 1e-10
    shared = {TiedHead: "embed.weight", ClassTokenTwice: "cls", LayerTwice: "fc.weight"}[build]
    assert float((got[shared] - reference[shared]).abs().max()) <= 1e-10 * float(reference[shared].abs().max())


def test_exact_refuses_shared_weights_as_not_piecewise_linear():
    with pytest.raises(NfmError, match=r"uses parameters at several operations \(Embedding \+ linear: shared "
                                       r"weights\), so the logits are not piecewise linear"):
        check_exact_supported(TiedHead().eval())


@pytest.mark.parametrize("build,why", [
    (SeparatePaths, r"does not reach the last one"),
    (LeakyRegion, r"the value mul between them also feeds \w+ outside them"),
])
def test_shared_uses_without_one_way_out_are_refused_with_the_reason(build, why):
    model = build().double().eval()
    for estimator in ("auto", "ggn"):
        with pytest.raises(NfmError, match=r"uses parameter 'cls' already used by operator.mul at '' \(shared "
                                           r"weights\) and .*" + why + r".*--estimator hutchinson"):
            resolve_estimator(estimator, model)
