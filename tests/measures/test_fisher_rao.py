"""Fisher-Rao norm (eq. 25) from the per-layer rules against torch.func per-sample gradients (the oracle)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import nfm_models as models
from nfm_cli.curvature.losses import LOSS_NAMES
from nfm_cli.errors import NfmError
from nfm_cli.measures.fisher_rao import fisher_rao_norm, squared_gradient_sums
from tests.conftest import MODERN, Functional, gelu_model, modern_case, randomize_batchnorm, tiny_case

pytestmark = pytest.mark.usefixtures("one_thread")


def registered(name, shape, n=9, **config):
    torch.manual_seed(0)
    model = randomize_batchnorm(models.build(name, **config).double()).eval()
    gen = torch.Generator().manual_seed(3)
    return model, torch.randn((n,) + shape, generator=gen, dtype=torch.float64), torch.randint(0, 10, (n,),
                                                                                               generator=gen)


CASES = {
    "mlp": lambda: registered("mlp", (1, 28, 28), width=24),
    "lenet": lambda: registered("lenet", (1, 28, 28)),
    "wrn-bn-residual": lambda: registered("wrn16-4", (3, 8, 8), depth=10, widen_factor=1, image_size=8,
                                          in_channels=3),
    "tiny-bn-residual": lambda: tiny_case("bn-residual", n=9),
    "conv-groups-circular": lambda: tiny_case("conv-avgpool-groups", n=9),
}


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("name", list(CASES))
def test_rules_equal_per_sample_gradients(name, loss):
    model, x, y = CASES[name]()
    rules = squared_gradient_sums(model, x, y, loss, batch_size=4, method="rules")
    oracle = squared_gradient_sums(model, x, y, loss, batch_size=5, method="vmap")
    assert list(rules) == list(oracle) == [n for n, _ in model.named_parameters()]
    for n in oracle:
        assert rules[n].dtype == torch.float64
        torch.testing.assert_close(rules[n], oracle[n], rtol=1e-10, atol=1e-14 * float(oracle[n].abs().max()))
    assert fisher_rao_norm(model, x, y) == pytest.approx(fisher_rao_norm(model, x, y, method="vmap"), rel=1e-11)


def test_functional_forward_with_depthwise_conv_and_relu6():
    torch.manual_seed(0)
    model = randomize_batchnorm(Functional().double()).eval()
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    assert fisher_rao_norm(model, x, y, method="rules") == pytest.approx(
        fisher_rao_norm(model, x, y, method="vmap"), rel=1e-11)


@pytest.mark.parametrize("name", MODERN)
def test_rules_cover_modern_models_with_anything_between_the_parameter_operations(name):
    """ViT, token transformer, ConvNeXt and MobileNetV3-like models: the rules, no vmap (issue 20)."""
    model, x, y = modern_case(name)
    rules = squared_gradient_sums(model, x, y, batch_size=4, method="rules")
    oracle = squared_gradient_sums(model, x, y, batch_size=5, method="vmap")
    for n in oracle:
        torch.testing.assert_close(rules[n], oracle[n], rtol=1e-10, atol=1e-14 * float(oracle[n].abs().max()))


class Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, 4))

    def forward(self, x):
        return torch.nn.functional.bilinear(x, x, self.weight)


def test_a_model_the_rules_cannot_take_falls_back_to_vmap():
    torch.manual_seed(0)
    model = Bilinear().double().eval()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(NfmError, match=r"bilinear"):
        squared_gradient_sums(model, x, y, method="rules")
    assert fisher_rao_norm(model, x, y) == pytest.approx(fisher_rao_norm(model, x, y, method="vmap"), rel=1e-14)
    gelu = gelu_model().double().eval()
    assert fisher_rao_norm(gelu, x, y) == pytest.approx(fisher_rao_norm(gelu, x, y, method="vmap"), rel=1e-11)


def test_unused_layer_and_frozen_parameters():
    """A layer that is never called has zero gradients; frozen parameters still count (eq. 25 is over all)."""

    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.spare = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    model = WithSpare().double().eval()
    model.fc.bias.requires_grad_(False)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    rules = squared_gradient_sums(model, x, y, method="rules")
    oracle = squared_gradient_sums(model, x, y, method="vmap")
    assert torch.equal(rules["spare.weight"], torch.zeros(3, 5, dtype=torch.float64))
    for n in oracle:
        torch.testing.assert_close(rules[n], oracle[n], rtol=1e-11, atol=0)
    assert not model.fc.bias.requires_grad
