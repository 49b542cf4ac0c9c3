"""The ggn estimator (issue 20) against the dense float64 Gauss-Newton diagonal of per-sample Jacobians
(torch.func.jacrev) and autograd logit Hessians, on tiny ViT, token-transformer, ConvNeXt and
MobileNetV3/EfficientNet-like models; ggn == exact on piecewise-linear nets; refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nfm_cli.curvature.estimators import estimate_diagonal, resolve_estimator
from nfm_cli.curvature.exact import check_exact_supported
from nfm_cli.curvature.losses import LOSS_NAMES
from nfm_cli.errors import NfmError
from tests.conftest import (
    dense_diagonal,
    dense_gauss_newton_diagonal,
    max_relative_error,
    randomize_batchnorm,
    tiny_case,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class TinyViT(nn.Module):
    """Patch conv, class token, position embedding, pre-LN block with softmax attention, GELU MLP,
    layer scale (a raw parameter multiplying activations), final LayerNorm, head on the class token."""

    def __init__(self, dim=8, classes=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, dim) * 0.5)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)                       # [B, 4, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.attn(self.norm1(x))
        x = x + self.gamma * self.mlp(self.norm2(x))
        return self.head(self.norm(x)[:, 0])


class TokenClassifier(nn.Module):
    """nn.Embedding + nn.TransformerEncoderLayer on int64 tokens, mean pooling, linear head."""

    def __init__(self, vocab=7, dim=8, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens)).mean(1))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, channels-last LayerNorm, pointwise Linear-GELU-Linear, layer scale, residual."""

    def __init__(self, dim=4):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.act, self.pw2 = nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(self.act(self.pw1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def convnext_like():
    return nn.Sequential(nn.Conv2d(2, 4, 2, stride=2), ConvNeXtBlock(4), nn.GroupNorm(2, 4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class SqueezeExcite(nn.Module):
    def __init__(self, ch, hidden):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(ch, hidden, 1), nn.Conv2d(hidden, ch, 1)

    def forward(self, x):
        gate = F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * gate


def mobilenet_like():
    """Conv-BN-Hardswish stem, depthwise conv with SiLU, squeeze-excitation gate, 1x1 projection."""
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Hardswish(),
                         nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6), nn.SiLU(),
                         SqueezeExcite(6, 2), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _case(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if name == "vit":
        model, x = TinyViT(), torch.randn(6, 3, 4, 4, generator=gen)
    elif name == "tokens":
        model, x = TokenClassifier(), torch.randint(0, 7, (6, 5), generator=gen)
        x[0, :2] = 0                                                      # padding tokens
        x[1] = 3                                                          # one token repeated
    elif name == "convnext":
        model, x = convnext_like(), torch.randn(6, 2, 4, 4, generator=gen)
    else:
        model, x = randomize_batchnorm(mobilenet_like()), torch.randn(6, 2, 4, 4, generator=gen)
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    return model, x, torch.randint(0, 3, (6,), generator=gen)


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("name", ["vit", "tokens", "convnext", "mobilenet"])
def test_ggn_equals_the_dense_gauss_newton_diagonal(name, loss):
    model, x, y = _case(name)
    got = estimate_diagonal(model, x, y, loss, "ggn", batch_size=4).diagonal
    reference = dense_gauss_newton_diagonal(model, x, y, loss)
    assert set(got) == set(reference)
    assert max_relative_error(got, reference) < 1e-10
    for n in reference:        # each tensor on its own scale too (small blocks such as the class token)
        scale = float(reference[n].abs().max())
        assert scale == 0 or float((got[n] - reference[n]).abs().max()) <= 1e-10 * scale, n


@pytest.mark.parametrize("name", ["vit", "tokens", "convnext", "mobilenet"])
def test_auto_picks_ggn_for_non_piecewise_linear_models_and_says_why(name):
    model, _, _ = _case(name)
    with pytest.raises(NfmError, match="piecewise linear"):
        check_exact_supported(model)
    used, why = resolve_estimator("auto", model)
    assert used == "ggn" and "Gauss-Newton" in why and "layer '" in why


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_ggn_equals_exact_on_a_piecewise_linear_net(loss):
    model, x, y = tiny_case("bn-residual")
    assert resolve_estimator("auto", model)[0] == "exact"
    exact = estimate_diagonal(model, x, y, loss, "exact", batch_size=4).diagonal
    ggn = estimate_diagonal(model, x, y, loss, "ggn", batch_size=4).diagonal
    assert max_relative_error(ggn, exact) < 1e-12


class BatchNormAct2d(nn.BatchNorm2d):
    """As timm's: a BatchNorm2d subclass calling F.batch_norm itself, with the activation inside."""

    def __init__(self, ch, act=nn.ReLU):
        super().__init__(ch)
        self.act = act()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


def _bn_act_net(act=nn.ReLU6):
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), BatchNormAct2d(4, act), nn.Conv2d(4, 4, 3, groups=2),
                         BatchNormAct2d(4, act), nn.Flatten(), nn.Linear(16, 3))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_a_batchnorm_subclass_with_its_activation_gets_exact_and_matches_double_backward(loss):
    torch.manual_seed(0)
    model = randomize_batchnorm(_bn_act_net()).double().eval()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert resolve_estimator("auto", model)[0] == "exact"
    got = estimate_diagonal(model, x, y, loss, "exact", batch_size=3).diagonal
    assert max_relative_error(got, dense_diagonal(model, x, y, loss)) < 1e-10


def test_a_batchnorm_subclass_with_a_smooth_activation_is_ggn():
    model = _bn_act_net(nn.SiLU).eval()
    with pytest.raises(NfmError, match=r"layer '1.act' \(SiLU\) is not piecewise linear"):
        check_exact_supported(model)
    assert resolve_estimator("auto", model)[0] == "ggn"


class SquaredLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) ** 2


def test_a_subclass_squaring_its_output_is_refused_by_exact_and_its_square_is_part_of_the_ggn_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), SquaredLinear(5, 3)).double().eval()
    with pytest.raises(NfmError, match=r"layer '2' \(SquaredLinear\) calls operator.pow"):
        check_exact_supported(model)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = estimate_diagonal(model, x, y, "ce", "ggn", batch_size=4).diagonal
    assert max_relative_error(got, dense_gauss_newton_diagonal(model, x, y, "ce")) < 1e-10


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)

    def forward(self, tokens):
        return F.linear(self.embed(tokens).mean(1), self.embed.weight)[:, :3]


class Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.randn(3, 4, 4))

    def forward(self, x):
        h = self.fc(x)
        return F.bilinear(h, h, self.weight)


@pytest.mark.parametrize("model,where", [
    (TiedHead(), r"uses parameter 'embed.weight' already used by Embedding at 'embed' \(shared weights"),
    (Bilinear(), r"the model \(Bilinear\) passes parameters to torch.bilinear, an operation without a rule"),
])
def test_both_refuse_parameters_without_a_rule_or_used_twice_by_name(model, where):
    for name in ("ggn", "auto", "exact"):
        with pytest.raises(NfmError, match=where + ".*--estimator hutchinson"):
            resolve_estimator(name, model.eval())
