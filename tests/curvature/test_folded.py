"""Samples folded into dimension 0 (window attention, ``curvature/folded.py``): sample-major windows get
the ggn diagonal equal to the dense float64 Gauss-Newton diagonal, whatever the batch size, and so does
a conv module on folded image patches; any other row order, and functional convs on folded rows, are
refused naming the layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfm_cli.curvature.estimators import estimate_diagonal, resolve_estimator
from nfm_cli.errors import NfmError
from tests.conftest import dense_diagonal, dense_gauss_newton_diagonal, max_relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


class WindowAttention(nn.Module):
    """Patch embedding, one window-attention block with a relative bias table, mean pool, head.
    ``order="sample"`` stacks the windows sample-major (as timm and torchvision do), ``"window"``
    window-major (rows b + B * w): the same function, rows in another order. Without the ``table``
    every parameter is in a rule module (the forward-hook path)."""

    def __init__(self, order: str = "sample", dim: int = 4, window: int = 2, classes: int = 3, table: bool = True):
        super().__init__()
        self.order, self.dim, self.window = order, dim, window
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(0.3 * torch.randn(window * window, window * window)) if table else None
        self.head = nn.Linear(dim, classes)

    def partition(self, x):
        b, h, w, c = x.shape
        s = self.window
        x = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5)
        if self.order == "window":
            x = x.permute(1, 2, 0, 3, 4, 5)
        return x.reshape(-1, s * s, c)

    def reverse(self, win, b, h, w):
        s, c = self.window, win.shape[-1]
        if self.order == "window":
            x = win.view(h // s, w // s, b, s, s, c).permute(2, 0, 3, 1, 4, 5)
        else:
            x = win.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h, w, c)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        b, h, w, _ = x.shape
        win = self.partition(self.norm(x))
        q, k, v = self.qkv(win).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) * self.dim ** -0.5
        attn = (scores if self.bias is None else scores + self.bias).softmax(dim=-1)
        x = x + self.reverse(self.proj(attn @ v), b, h, w)
        return self.head(x.mean(dim=(1, 2)))


class FoldedConv(nn.Module):
    """Each sample's four image quarters stacked along dimension 0 (sample-major), then a conv on them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        b, c, h, w = x.shape
        quarters = x.view(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, h // 2, w // 2)
        y = torch.relu(self.conv(quarters))
        return self.head(y.view(b, 4, 2, -1).mean(dim=(1, 3)))


def _case(model_class, order=None, seed=0, n=5):
    torch.manual_seed(seed)
    model = (model_class(order) if order else model_class()).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0][:n])


@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("loss", ["normalized-ce", "ce"])
def test_sample_major_windows_get_the_dense_gauss_newton_diagonal(batch_size, loss):
    model, x, y = _case(WindowAttention, "sample")
    assert resolve_estimator("auto", model)[0] == "ggn"
    got = estimate_diagonal(model, x, y, loss, "ggn", batch_size=batch_size).diagonal
    reference = dense_gauss_newton_diagonal(model, x, y, loss)
    assert max_relative_error(got, reference) < 1e-10
    for name in ("qkv.weight", "proj.bias", "bias"):         # the folded uses, each on its own scale
        scale = float(reference[name].abs().max())
        assert float((got[name] - reference[name]).abs().max()) <= 1e-10 * scale, name


def test_window_major_rows_are_refused_naming_the_layer():
    model, x, y = _case(WindowAttention, "window")
    with pytest.raises(NfmError, match=r"layer 'qkv' \(Linear\) folds samples into dimension 0 .*sample-major.*"
                                       r"--estimator hutchinson"):
        estimate_diagonal(model, x, y, "ce", "ggn", batch_size=2)


def test_window_major_rows_in_batches_of_one_are_exact():
    """With one sample per batch every row is that sample's: nothing to refuse, and the result is right."""
    model, x, y = _case(WindowAttention, "window", n=3)
    got = estimate_diagonal(model, x, y, "ce", "ggn", batch_size=1).diagonal
    assert max_relative_error(got, dense_gauss_newton_diagonal(model, x, y, "ce")) < 1e-10


@pytest.mark.parametrize("estimator", ["exact", "ggn"])
def test_a_conv_on_folded_rows_gets_the_per_sample_rule_of_the_module(estimator):
    """As TNT's pixel embedding: a Conv2d on each sample's image quarters stacked along dimension 0;
    piecewise linear, so exact and ggn both equal the dense float64 Hessian diagonal."""
    model, x, y = _case(FoldedConv)
    assert resolve_estimator("auto", model)[0] == "exact"
    got = estimate_diagonal(model, x, y, "ce", estimator, batch_size=2).diagonal
    assert max_relative_error(got, dense_diagonal(model, x, y, "ce")) < 1e-10


class FunctionalFoldedConv(FoldedConv):
    def forward(self, x):
        b, c, h, w = x.shape
        quarters = x.view(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, h // 2, w // 2)
        y = torch.relu(F.conv2d(quarters, self.conv.weight, self.conv.bias, padding=1))
        return self.head(y.view(b, 4, 2, -1).mean(dim=(1, 3)))


def test_a_functional_conv_on_folded_rows_is_refused_naming_the_layer():
    model, x, y = _case(FunctionalFoldedConv)
    with pytest.raises(NfmError, match=r"the model \(FunctionalFoldedConv\) calls conv2d on samples folded into "
                                       r"dimension 0 .*--estimator hutchinson"):
        estimate_diagonal(model, x, y, "ce", "ggn", batch_size=2)


def test_folded_linear_layers_alone_take_the_hook_path_and_match_the_dense_diagonal():
    torch.manual_seed(0)
    model = WindowAttention(table=False).double().eval()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    got = estimate_diagonal(model, x, y, "normalized-ce", "ggn", batch_size=2).diagonal
    assert max_relative_error(got, dense_gauss_newton_diagonal(model, x, y, "normalized-ce")) < 1e-10
