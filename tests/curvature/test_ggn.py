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
    MODERN,
    dense_diagonal,
    dense_gauss_newton_diagonal,
    max_relative_error,
    modern_case,
    randomize_batchnorm,
    tiny_case,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("name", MODERN)
def test_ggn_equals_the_dense_gauss_newton_diagonal(name, loss):
    model, x, y = modern_case(name)
    got = estimate_diagonal(model, x, y, loss, "ggn", batch_size=4).diagonal
    reference = dense_gauss_newton_diagonal(model, x, y, loss)
    assert set(got) == set(reference)
    assert max_relative_error(got, reference) < 1e-10
    for n in reference:        # each tensor on its own scale too (small blocks such as the class token)
        scale = float(reference[n].abs().max())
        assert scale == 0 or float((got[n] - reference[n]).abs().max()) <= 1e-10 * scale, n


@pytest.mark.parametrize("name", MODERN)
def test_auto_picks_ggn_for_non_piecewise_linear_models_and_says_why(name):
    model, _, _ = modern_case(name)
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


class Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.weight = nn.Parameter(torch.randn(3, 4, 4))

    def forward(self, x):
        h = self.fc(x)
        return F.bilinear(h, h, self.weight)


@pytest.mark.parametrize("model,where", [
    (Bilinear(), r"the model \(Bilinear\) passes parameters to torch.bilinear, an operation without a rule"),
])
def test_both_refuse_parameters_without_a_rule_by_name(model, where):
    for name in ("ggn", "auto", "exact"):
        with pytest.raises(NfmError, match=where + ".*--estimator hutchinson"):
            resolve_estimator(name, model.eval())


@pytest.mark.parametrize("version", [1, 2])
def test_torchvision_swin_gets_ggn_equal_to_the_dense_gauss_newton_diagonal(version):
    """torchvision's Swin (v1 and v2: cosine attention, logit scale, continuous position bias MLP), tiny:
    its window attention is one fx-wrapped function taking the parameters, the per-sample rule's."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    torch.manual_seed(0)
    v2 = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if version == 2 else {}
    model = SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=[2, 2],
                            num_classes=3, **v2).double().eval()
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 2, 1])
    assert resolve_estimator("auto", model)[0] == "ggn"
    got = estimate_diagonal(model, x, y, "normalized-ce", "ggn", batch_size=2).diagonal
    assert max_relative_error(got, dense_gauss_newton_diagonal(model, x, y, "normalized-ce")) < 1e-10
